"""Greedy tokens and logits equal transformers' for every reference prompt."""

import numpy as np
import pytest

from jattn import LLM
from model_references import full_sequence_logits, model_dir, reference_cases


@pytest.fixture(scope="module")
def stories():
    return LLM(store=None)  # the package's embedded copy


def check_logits(logits, case, sums_key):
    """Last-position logits within 1e-4; per-position logit sums to float32 rounding."""
    for token, value in case["last_logits_top8"]:
        assert abs(logits[-1, token] - value) < 1e-4, (token, logits[-1, token], value)
    sums = logits.sum(axis=-1)
    want = np.asarray(case[sums_key])
    np.testing.assert_allclose(sums[-len(want):], want, rtol=1e-5, atol=5e-3)


@pytest.mark.parametrize("index", range(4))
def test_stories260k_matches_transformers(stories, index):
    case = reference_cases("stories260K")[index]
    assert stories.tokenizer.encode(case["prompt"]) == case["prompt_ids"]
    generation = stories.generate(case["prompt"], max_tokens=64, ignore_eos=True)
    assert generation.token_ids == case["greedy_ids"]
    assert stories.tokenizer.decode(case["prompt_ids"] + generation.token_ids) == \
        case["greedy_text"]
    check_logits(full_sequence_logits(stories, case["prompt_ids"] + case["greedy_ids"]),
                 case, "logits_sum_per_position")


def test_stories260k_once_upon_a_time(stories):
    text = stories.generate("Once upon a time", max_tokens=40).text
    assert ("Once upon a time" + text).startswith(
        "Once upon a time, there was a little girl named Lily. She loved to play outside in "
        "the park. One day, she saw a big, red ball.")


@pytest.mark.parametrize("name", ["tiny-qwen2-random", "tiny-llama3-random"])
def test_tiny_models_match_transformers(name):
    llm = LLM(model_dir(name), store=None)
    assert llm.tokenizer is None
    for case in reference_cases(name):
        generation = llm.generate(case["prompt_ids"], max_tokens=len(case["greedy_ids"]),
                                  ignore_eos=True)
        assert generation.token_ids == case["greedy_ids"], len(case["prompt_ids"])
        check_logits(full_sequence_logits(llm, case["prompt_ids"] + case["greedy_ids"]),
                     case, "logits_sum_per_position_tail")


def test_bfloat16_model_tracks_float32(stories):
    """bfloat16 weights and cache: logits stay near transformers' float32 ones and the
    greedy story starts the same."""
    bf16 = LLM(dtype="bfloat16", store=None)
    case = reference_cases("stories260K")[1]
    logits = full_sequence_logits(bf16, case["prompt_ids"] + case["greedy_ids"])
    for token, value in case["last_logits_top8"]:
        assert abs(logits[-1, token] - value) < 0.25, (token, logits[-1, token], value)
    assert bf16.generate(case["prompt"], max_tokens=8).token_ids == case["greedy_ids"][:8]


@pytest.mark.parametrize("name, sums_key", [("stories260K", "logits_sum_per_position"),
                                            ("tiny-qwen2-random", "logits_sum_per_position_tail")])
def test_training_forward_matches_transformers(name, sums_key):
    """`sequence_logits` (whole sequences, no cache, the pass training differentiates)
    over a batch of two reference sequences cut to one length."""
    import jax.numpy as jnp

    from jattn.model.config import ModelConfig
    from jattn.model.weights import load_safetensors
    from pallas_kernels import flash_attention

    model = load_safetensors(model_dir(name), ModelConfig.from_dir(model_dir(name)),
                             progress=False)
    cases = reference_cases(name)[:2]
    rows = [case["prompt_ids"] + case["greedy_ids"] for case in cases]
    length = min(len(row) for row in rows)
    logits = np.asarray(model.sequence_logits(
        jnp.asarray([row[:length] for row in rows], jnp.int32),
        lambda q, k, v: flash_attention(q, k, v, causal=True)[0]))
    for case, row, row_logits in zip(cases, rows, logits):
        if len(row) == length:
            check_logits(row_logits, case, sums_key)
        else:  # cut short: its positions' sums, as far as they reach
            want = np.asarray(case[sums_key])
            first = len(row) - len(want)
            np.testing.assert_allclose(row_logits.sum(axis=-1)[first:], want[:length - first],
                                       rtol=1e-5, atol=5e-3)
