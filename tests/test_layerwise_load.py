"""Layer-wise pre-loading: what arrives per layer, and a prefill that consumes it layer by
layer gives the logits and the KV of a prefill over a pool that already held the blocks."""

import concurrent.futures

import numpy as np
import pytest

from jattn import LLM
from jattn.model.kv_cache import KVPool, blocks_for
from jattn.model.step_plan import LOADING_CHUNK, Arrival, Segment, StepPlan
from jattn.store import BlockKV
from jattn.store.layer_load import LayerwiseLoad, StagingPool, _runs, _stage
from model_references import model_dir


def random_blocks(count, seed, layers=3, shape=(4, 2, 8)):
    rng = np.random.default_rng(seed)
    return [BlockKV(rng.standard_normal((layers, *shape)).astype(np.float32),
                    rng.standard_normal((layers, *shape)).astype(np.float32))
            for _ in range(count)]


def test_each_layer_arrives_stacked_in_order_with_zero_padding():
    blocks = random_blocks(5, seed=0)
    finished = []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(blocks, rows=8, executor=executor, on_finish=finished.append)
        with pytest.raises(ValueError, match="in order: expected 0, got 1"):
            load.layer(1)
        for layer in range(3):
            k, v = load.layer(layer)
            assert k.shape == (8, 4, 2, 8)
            np.testing.assert_array_equal(np.asarray(k)[:5], [b.k[layer] for b in blocks])
            np.testing.assert_array_equal(np.asarray(v)[:5], [b.v[layer] for b in blocks])
            assert not np.asarray(k)[5:].any() and not np.asarray(v)[5:].any()
    (timing,) = finished
    assert timing.transfer > 0 and 0 <= timing.hidden <= timing.transfer


def turn_blocks(count, seed, layers=3, shape=(4, 2, 8)):
    """`count` blocks saved as one turn: views of one layer-major `[L, count, ...]` array
    each for keys and values, as the chat engine files them."""
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((layers, count, *shape)).astype(np.float32) for _ in "kv")
    return [BlockKV(k[:, i], v[:, i]) for i in range(count)]


@pytest.mark.parametrize("seed", range(6))
def test_runs_of_a_turns_blocks_stage_like_a_stack(seed):
    """Blocks of several turns and single blocks, in any order, with gaps: each layer
    stages exactly as `np.stack`, and back-to-back blocks of a turn are one copy."""
    rng = np.random.default_rng(seed)
    pieces = turn_blocks(7, seed) + random_blocks(3, seed + 50) + turn_blocks(5, seed + 99)
    order = list(range(len(pieces)))
    if seed % 2:
        order = sorted(rng.choice(len(pieces), size=11, replace=False).tolist())
    if seed % 3 == 2:
        rng.shuffle(order)
    blocks = [pieces[i] for i in order]
    pool = StagingPool(capacity=4)
    runs = _runs([b.v for b in blocks])
    adjacent = sum(1 for a, b in zip(order, order[1:]) if b == a + 1 and
                   (a < 6 or 10 <= a < 14))  # neighbours inside one turn
    assert len(runs) == len(blocks) - adjacent
    assert sum(count for _, count in runs) == len(blocks)
    for layer in range(3):
        staged = _stage(runs, layer, 16, pool)
        np.testing.assert_array_equal(staged[:len(blocks)],
                                      np.stack([b.v[layer] for b in blocks]))
        assert not staged[len(blocks):].any()


def test_a_failed_staging_reaches_the_engine():
    blocks = random_blocks(2, seed=1) + [BlockKV(np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))]
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(blocks, rows=4, executor=executor)
        load.layer(0)
        with pytest.raises(IndexError):
            load.layer(1)


@pytest.mark.parametrize("name,seed,new_tokens", [("stories260K", 0, 23),
                                                  ("tiny-qwen2-random", 1, 600)])
def test_a_step_with_kv_arriving_equals_prefill_over_resident_blocks(name, seed, new_tokens):
    llm = LLM(model_dir(name), store=None, prefill_chunk=256)
    runner = llm.runner
    allocator = runner.new_allocator()
    rng = np.random.default_rng(seed)
    history = rng.integers(3, llm.config.vocab_size, size=4 * runner.block_size).tolist()
    turn = rng.integers(3, llm.config.vocab_size, size=new_tokens).tolist()
    total = blocks_for(len(history) + len(turn), runner.block_size)

    blocks = allocator.allocate(total)
    runner.prefill(history, 0, blocks)
    expected_logits = np.asarray(runner.prefill(turn, len(history), blocks))
    expected_kv = [np.asarray(p[np.asarray(blocks)]) for p in runner.pool.k + runner.pool.v]
    history_blocks = [BlockKV(np.stack([np.asarray(p[b]) for p in runner.pool.k]),
                              np.stack([np.asarray(p[b]) for p in runner.pool.v]))
                      for b in blocks[:4]]

    # The same blocks land elsewhere in a pool poisoned with NaN, layer by layer.
    moved = allocator.allocate(total)
    runner.pool = KVPool(tuple(p.at[np.asarray(moved)].set(np.nan) for p in runner.pool.k),
                         tuple(p.at[np.asarray(moved)].set(np.nan) for p in runner.pool.v))
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(history_blocks, rows=8, executor=executor)
        opening = turn[:LOADING_CHUNK]
        plan = StepPlan(segments=(Segment(tuple(opening), len(history), tuple(moved)),),
                        sampled=(len(opening) == len(turn),),
                        arrival=Arrival(tuple(moved[:4]), load))
        logits = np.asarray(runner.execute(plan).logits[0])
    if len(turn) > len(opening):  # the rest as the engine runs it: packed steps
        logits = np.asarray(runner.prefill(turn[len(opening):], len(history) + len(opening),
                                           moved))
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    got_kv = [np.asarray(p[np.asarray(moved)]) for p in runner.pool.k + runner.pool.v]
    written = len(history) + len(turn)  # slots past it were never written
    for got, want in zip(got_kv, expected_kv):
        np.testing.assert_allclose(got.reshape(-1, *got.shape[2:])[:written],
                                   want.reshape(-1, *want.shape[2:])[:written],
                                   atol=1e-5, rtol=1e-5)


def test_staging_buffers_are_reused_only_when_nothing_refers_to_them():
    import jax

    from jattn.store.layer_load import StagingPool

    pool = StagingPool(capacity=4)
    first = pool.take(4096)
    held = jax.device_put(first.view(np.float32))  # may alias the buffer (CPU)
    del first
    second = pool.take(4096)
    assert second.ctypes.data % 64 == 0
    assert second.ctypes.data != held.unsafe_buffer_pointer()  # still aliased: not reused
    address = second.ctypes.data
    del second
    assert pool.take(4096).ctypes.data == address  # free again: reused
