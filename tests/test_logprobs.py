"""Log-probabilities are the model's own distribution: each drawn token's, and its k
most likely alternatives', equal a float64 log-softmax of the logits of one stateless
prefill over the prompt and the tokens before it (those logits are checked against
transformers in test_model_references), however the token was drawn (greedy, or with
temperature, top-k and top-p, which do not change them) and whether the prompt's KV
was computed or reused from the store."""

import numpy as np
import pytest

from jattn import LLM
from jattn.engine import InvalidRequest
from model_references import full_sequence_logits

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
          "in the park with her dog Max, who liked to run after a big red ball all day")


@pytest.fixture(scope="module")
def llms():
    """The library with its store, and one without (whose pool the reference uses)."""
    stored, bare = LLM(), LLM(store=None)
    yield stored, bare
    stored.close()
    bare.close()


def reference_logprobs(llm: LLM, prompt_ids: list[int], token_ids: list[int]) -> np.ndarray:
    """`[len(token_ids), V]` float64: the log-softmax before each of `token_ids`."""
    logits = full_sequence_logits(llm, prompt_ids + token_ids).astype(np.float64)
    rows = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(token_ids)]
    peak = rows.max(axis=-1, keepdims=True)
    return rows - peak - np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("draw", [dict(), dict(temperature=0.9, seed=7),
                                  dict(temperature=1.4, top_k=40, top_p=0.9, seed=11)])
@pytest.mark.parametrize("alternatives", [0, 5, 20])
def test_logprobs_equal_a_float64_log_softmax_of_the_model(llms, draw, alternatives):
    stored, bare = llms
    prompt_ids = list(stored.encode_prompt(PROMPT))
    first = stored.generate(PROMPT, max_tokens=10, ignore_eos=True, logprobs=alternatives,
                            **draw)
    again = stored.generate(PROMPT, max_tokens=10, ignore_eos=True, logprobs=alternatives,
                            **draw)  # the prompt's KV reused from the store this time
    assert again.cached_tokens > 0 and again.token_ids == first.token_ids
    want = reference_logprobs(bare, prompt_ids, first.token_ids)
    for result in (first, again):
        assert len(result.logprobs) == len(result.token_ids)
        for i, (token, got) in enumerate(zip(result.token_ids, result.logprobs)):
            assert abs(got.logprob - want[i, token]) < 1e-4, (i, got.logprob, want[i, token])
            assert len(got.top) == alternatives
            ids = [other for other, _ in got.top]
            assert len(set(ids)) == alternatives
            np.testing.assert_allclose([value for _, value in got.top], want[i, ids],
                                       atol=1e-4)
            # The k largest, largest first (ties within float32 rounding in any order).
            np.testing.assert_allclose([value for _, value in got.top],
                                       np.sort(want[i])[::-1][:alternatives], atol=1e-4)
    if not draw:  # greedy: each token is its row's most likely
        assert all(got.top[0][0] == token for token, got in
                   zip(first.token_ids, first.logprobs) if alternatives)


def test_without_logprobs_none_are_computed_and_bad_counts_are_refused(llms):
    stored, _ = llms
    assert stored.generate(PROMPT, max_tokens=3).logprobs is None
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(InvalidRequest, match="logprobs"):
            stored.generate(PROMPT, max_tokens=3, logprobs=bad)
