"""LLM.generate / stream: sampling, stop conditions, streaming, bad arguments."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn import LLM
from jattn.decoding import Continuation
from jattn.engine import InvalidRequest
from jattn.generation import Generation
from jattn.sampling import SamplingParams, draw_arguments, draw_tokens, sample_rows, seed_key_data


@pytest.fixture(scope="module")
def llm():
    return LLM()


def test_stream_yields_the_generated_tokens_and_text(llm):
    streamed = list(llm.stream("Once upon a time", max_tokens=20))
    generation = llm.generate("Once upon a time", max_tokens=20)
    assert [t.id for t in streamed] == generation.token_ids
    assert "".join(t.text for t in streamed) == generation.text
    assert generation.finish_reason == "length" and len(generation.token_ids) == 20
    assert generation.ttft_s > 0


def test_stop_string_cuts_text(llm):
    generation = llm.generate("Once upon a time", max_tokens=60, stop=["park"])
    assert generation.finish_reason == "stop"
    assert generation.text.endswith("outside in the ")
    assert "park" not in generation.text


def test_end_of_sequence_stops_unless_ignored():
    llm = LLM()
    greedy = llm.generate("Once upon a time", max_tokens=20).token_ids
    eos = greedy[6]
    first = greedy.index(eos)
    llm.chats.eos_ids = (eos,)  # as if the model's end-of-sequence token were `eos`
    stopped = llm.generate("Once upon a time", max_tokens=20)
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy[:first]  # the end token itself is not returned
    ignored = llm.generate("Once upon a time", max_tokens=20, ignore_eos=True)
    assert ignored.finish_reason == "length" and ignored.token_ids == greedy


def test_context_window_limits_new_tokens(llm):
    prompt = [1] + [400] * 505
    generation = llm.generate(prompt, max_tokens=64, ignore_eos=True)
    assert len(generation.token_ids) == llm.max_context - len(prompt)
    assert generation.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_varies(llm):
    a = llm.generate("Once upon a time", max_tokens=30, temperature=1.0, seed=7)
    b = llm.generate("Once upon a time", max_tokens=30, temperature=1.0, seed=7)
    others = {tuple(llm.generate("Once upon a time", max_tokens=30, temperature=1.0,
                                 seed=s).token_ids) for s in range(8, 12)}
    assert a.token_ids == b.token_ids
    assert len(others | {tuple(a.token_ids)}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = llm.generate("The little dog", max_tokens=20).token_ids
    assert llm.generate("The little dog", max_tokens=20, temperature=1.5, top_k=1,
                        seed=3).token_ids == greedy
    assert llm.generate("The little dog", max_tokens=20, temperature=1.5, top_p=1e-6,
                        seed=3).token_ids == greedy


def test_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    """float32 rounds 1e-50 to 0; the nucleus still holds the argmax (greedy), as at any
    other small top_p, where before it filtered nothing."""
    logits = np.log([0.2, 0.5, 0.3])
    assert set(draws_of(logits, 400, temperature=2.0, top_p=1e-50)) == {1}
    assert set(draws_of(logits, 400, temperature=2.0, top_p=1e-6)) == {1}


def test_top_k_past_the_vocabulary_keeps_it_all():
    """A top_k beyond the vocabulary (even past int32) filters nothing: the frequencies
    are the plain softmax's."""
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    continuations = [Continuation(SamplingParams(temperature=1.0, top_k=2**40, seed=s),
                                  budget=1, eos=set(), tokenizer=None,
                                  result=Generation("", [], "length"), start_time=0.0)
                     for s in range(2000)]
    rows = np.repeat(logits[None].astype(np.float32), len(continuations), axis=0)
    drawn = sample_rows(rows, *draw_arguments([c.draw() for c in continuations], len(rows)))
    freq = np.bincount(np.asarray(drawn), minlength=4) / len(continuations)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.035)


def test_every_64_bit_seed_is_its_own_stream():
    """Seeds that agree in their low 32 bits, or sit past 2**63, give different and
    reproducible streams; below 2**32 a seed's key is `jax.random.key(seed)`'s."""
    seeds = [5, 2**32 + 5, 2**63, 2**64 - 1]
    datas = [seed_key_data(s) for s in seeds]
    assert len({d.tobytes() for d in datas}) == len(seeds)
    np.testing.assert_array_equal(seed_key_data(5),
                                  jax.random.key_data(jax.random.key(5)))
    assert seed_key_data(2**64 - 1).tolist() == [2**32 - 1, 2**32 - 1]
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(InvalidRequest, match="seed"):
            SamplingParams(seed=bad)


def test_seeds_past_2_63_sample_reproducibly(llm):
    a = llm.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=2**63)
    b = llm.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=2**63)
    c = llm.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=2**64 - 1)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12 and len(c.token_ids) == 12


def draws_of(logits, n, temperature=1.0, top_k=0, top_p=1.0):
    """`n` draws from one row of logits, each with its own key, in one batch."""
    rows = jnp.repeat(jnp.asarray(logits, jnp.float32)[None], n, axis=0)
    key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), n)))
    return np.asarray(sample_rows(rows, key_data, np.zeros(n, np.int32),
                                  np.full(n, temperature, np.float32),
                                  np.full(n, top_k, np.int32), np.full(n, top_p, np.float32)))


def test_sampling_follows_the_softmax():
    logits = np.log([0.5, 0.3, 0.15, 0.05])
    freq = np.bincount(draws_of(logits, 4000), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    top2 = draws_of(logits, 4000, top_k=2)
    np.testing.assert_allclose(np.bincount(top2, minlength=4) / 4000,
                               [0.625, 0.375, 0, 0], atol=0.03)
    nucleus = draws_of(logits, 4000, top_p=0.7)
    np.testing.assert_allclose(np.bincount(nucleus, minlength=4) / 4000,
                               [0.625, 0.375, 0, 0], atol=0.03)
    assert set(draws_of(logits + 5.0, 50, temperature=0.0)) == {0}


def test_a_batch_samples_each_row_as_it_would_alone():
    """Rows of one `draw_tokens` call, each with its own parameters and key, give the
    tokens each continuation draws on its own, whatever the padding rows hold; the
    tokens come padded to the width asked for."""
    rng = np.random.default_rng(7)
    settings = [SamplingParams(), SamplingParams(temperature=0.9, seed=1),
                SamplingParams(temperature=1.3, top_k=5, seed=2),
                SamplingParams(temperature=0.7, top_p=0.8, seed=3),
                SamplingParams(temperature=1.0, top_k=3, top_p=0.5, seed=4)]
    logits = rng.normal(0, 3, (8, 64)).astype(np.float32)
    logits[len(settings):] = np.nan  # padding rows must not matter

    def continuation(params):
        return Continuation(params, budget=10, eos=set(), tokenizer=None,
                            result=Generation("", [], "length"), start_time=0.0)

    together = [continuation(p) for p in settings]
    alone = [continuation(p) for p in settings]
    for _ in range(3):
        draws = [c.draw() for c in together]
        batch = np.asarray(draw_tokens(jnp.asarray(logits), *draw_arguments(draws, 8),
                                       width=16))
        assert batch.shape == (16,)
        for i, c in enumerate(alone):
            row = jnp.asarray(logits[i:i + 1])
            assert batch[i] == int(sample_rows(row, *draw_arguments([c.draw()], 1))[0])
    assert batch[0] == int(np.argmax(logits[0]))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(max_tokens=0), r"max_tokens must be an integer >= 1, got 0"),
    (dict(temperature=-1.0), r"temperature must be a finite number >= 0, got -1.0"),
    (dict(temperature=float("nan")), r"temperature must be a finite number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_k=-2), r"top_k must be an integer >= 0, got -2"),
    (dict(stop=[""]), r"stop must be non-empty strings"),
])
def test_bad_sampling_parameters_are_named(kwargs, pattern):
    with pytest.raises(InvalidRequest, match=pattern):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("prompt,pattern", [
    ([], r"prompt is empty"),
    ([1, 512], r"token ids must be integers in \[0, 512\), got \[512\]"),
    ([1, -3], r"got \[-3\]"),
    ([1] * 512, r"prompt has 512 tokens; the context holds 512"),
])
def test_bad_prompts_are_named_and_free_nothing(llm, prompt, pattern):
    free = llm.engine.block_census().free
    with pytest.raises(InvalidRequest, match=pattern):
        llm.generate(prompt)
    assert llm.engine.block_census().free == free


def test_blocks_return_to_the_pool(llm):
    free = llm.engine.block_census().free
    stream = llm.stream("Once upon a time", max_tokens=50)
    next(stream)
    assert llm.engine.block_census().free < free
    stream.close()  # a consumer that goes away frees the sequence's blocks
    assert llm.engine.block_census().free == free
