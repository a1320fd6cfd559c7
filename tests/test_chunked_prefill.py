"""Prefill in random chunk sizes, then decode, gives the logits of a one-shot prefill."""

import numpy as np
import pytest

from jattn import LLM
from jattn.model.kv_cache import blocks_for
from model_references import model_dir


@pytest.mark.parametrize("name,seed", [("stories260K", 0), ("tiny-qwen2-random", 1),
                                       ("tiny-llama3-random", 2)])
def test_chunks_then_decode_equal_one_shot(name, seed):
    llm = LLM(model_dir(name))
    runner = llm.runner
    allocator = runner.new_allocator()
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, llm.config.vocab_size, size=200).tolist()
    decoded = 6
    prefix = len(ids) - decoded

    blocks = allocator.allocate(blocks_for(len(ids), runner.block_size))
    one_shot = np.asarray(runner.prefill(ids, 0, blocks, all_logits=True))
    allocator.free(blocks)

    blocks = allocator.allocate(blocks_for(len(ids), runner.block_size))
    # Poison the blocks first: nothing may read slots the sequence has not written.
    runner.pool = type(runner.pool)(
        tuple(p.at[np.asarray(blocks)].set(np.nan) for p in runner.pool.k),
        tuple(p.at[np.asarray(blocks)].set(np.nan) for p in runner.pool.v))
    cuts = sorted(rng.choice(np.arange(1, prefix), size=5, replace=False).tolist())
    pieces = []
    for start, end in zip([0] + cuts, cuts + [prefix]):
        pieces.append(np.asarray(runner.prefill(ids[start:end], start, blocks,
                                                all_logits=True)))
    for position in range(prefix, len(ids)):
        pieces.append(np.asarray(runner.decode([ids[position]], [position], [blocks]))[:1])
    allocator.free(blocks)
    chunked = np.concatenate(pieces)
    assert not np.isnan(chunked).any()
    np.testing.assert_allclose(chunked, one_shot, atol=2e-4, rtol=1e-4)
