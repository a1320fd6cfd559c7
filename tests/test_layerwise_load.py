"""Layer-wise pre-loading: what arrives per layer, and a prefill that consumes it layer by
layer gives the logits and the KV of a prefill over a pool that already held the blocks."""

import concurrent.futures

import numpy as np
import pytest

from jattn import LLM
from jattn.model.kv_cache import KVPool, blocks_for
from jattn.model.step_plan import LOADING_CHUNK, Arrival, Segment, StepPlan
from jattn.store import BlockKV
from jattn.store.layer_load import MIN_ROWS, HostBuffers, LayerwiseLoad, empty_run, saved_run
from model_references import model_dir


def random_blocks(count, seed, layers=3, shape=(4, 2, 8)):
    rng = np.random.default_rng(seed)
    return [BlockKV(rng.standard_normal((layers, *shape)).astype(np.float32),
                    rng.standard_normal((layers, *shape)).astype(np.float32))
            for _ in range(count)]


def assembled(pieces, count):
    """The arriving blocks' keys and values `[count, ...]` put together from a layer's
    pieces, each block exactly once."""
    indices = [i for piece in pieces for i in piece.indices]
    assert sorted(indices) == list(range(count))
    for piece in pieces:
        rows = piece.k.shape[0]
        assert rows >= len(piece.indices) and rows & (rows - 1) == 0 and rows >= MIN_ROWS
    k = np.empty((count, *pieces[0].k.shape[1:]), pieces[0].k.dtype)
    v = np.empty_like(k)
    for piece in pieces:
        k[list(piece.indices)] = np.asarray(piece.k)[:len(piece.indices)]
        v[list(piece.indices)] = np.asarray(piece.v)[:len(piece.indices)]
    return k, v


def test_each_layer_arrives_in_order_with_every_block_once():
    blocks = random_blocks(5, seed=0)
    finished = []
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(blocks, executor=executor, on_finish=finished.append)
        with pytest.raises(ValueError, match="in order: expected 0, got 1"):
            load.layer(1)
        for layer in range(3):
            pieces = load.layer(layer)
            assert len(pieces) == 1 and pieces[0].k.shape == (8, 4, 2, 8)  # one staged
            k, v = assembled(pieces, 5)
            np.testing.assert_array_equal(k, [b.k[layer] for b in blocks])
            np.testing.assert_array_equal(v, [b.v[layer] for b in blocks])
    (timing,) = finished
    assert timing.transfer > 0 and 0 <= timing.hidden <= timing.transfer


def turn_blocks(count, seed, layers=3, shape=(4, 2, 8)):
    """`count` blocks saved as one turn: views of one layer-major `[L, count, ...]` array
    each for keys and values, as the chat engine files them (`saved_run`)."""
    rng = np.random.default_rng(seed)
    k, v = (saved_run(rng.standard_normal((layers, count, *shape)).astype(np.float32))
            for _ in "kv")
    return [BlockKV(k[:, i], v[:, i]) for i in range(count)]


def pointer(array) -> int:
    return array.__array_interface__["data"][0]


@pytest.mark.parametrize("seed", range(6))
def test_runs_of_a_turns_blocks_move_as_they_are_and_the_rest_is_staged(seed):
    """Blocks of several turns and single blocks, in any order, with gaps: each layer
    arrives as `np.stack` of the blocks; a run of a turn's back-to-back blocks of at
    least `MIN_ROWS` goes to the device from the turn's own array (on CPU the device
    array is that memory: no copy), the rest in one staged piece."""
    rng = np.random.default_rng(seed)
    pieces = turn_blocks(13, seed) + random_blocks(3, seed + 50) + turn_blocks(5, seed + 99)
    order = list(range(len(pieces)))
    if seed % 2:
        order = sorted(rng.choice(len(pieces), size=15, replace=False).tolist())
    if seed % 3 == 2:
        rng.shuffle(order)
    blocks = [pieces[i] for i in order]
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(blocks, executor=executor, staging=HostBuffers(capacity_bytes=1 << 20))
        for layer in range(3):
            arrived = load.layer(layer)
            k, v = assembled(arrived, len(blocks))
            np.testing.assert_array_equal(k, np.stack([b.k[layer] for b in blocks]))
            np.testing.assert_array_equal(v, np.stack([b.v[layer] for b in blocks]))
            direct = [p for p in arrived if p.k.unsafe_buffer_pointer() == pointer(
                blocks[p.indices[0]].k[layer])]
            staged = [p for p in arrived if p not in direct]
            assert len(staged) <= 1
            for piece in direct:  # back-to-back blocks of one turn, from its own memory
                first = piece.indices[0]
                assert piece.indices == tuple(range(first, first + len(piece.indices)))
                assert len(piece.indices) >= MIN_ROWS
                assert piece.v.unsafe_buffer_pointer() == pointer(blocks[first].v[layer])
            if seed == 0:  # in order: each turn one piece, the three single blocks staged
                assert sorted((p.indices, p.k.shape[0]) for p in direct) == [
                    (tuple(range(13)), 16), (tuple(range(16, 21)), 8)]
                assert staged[0].indices == (13, 14, 15) and staged[0].k.shape[0] == 4


def test_a_failed_staging_reaches_the_engine():
    blocks = random_blocks(2, seed=1) + [BlockKV(np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))]
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(blocks, executor=executor)
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
    history = rng.integers(3, llm.config.vocab_size, size=6 * runner.block_size).tolist()
    turn = rng.integers(3, llm.config.vocab_size, size=new_tokens).tolist()
    total = blocks_for(len(history) + len(turn), runner.block_size)

    blocks = allocator.allocate(total)
    runner.prefill(history, 0, blocks)
    expected_logits = np.asarray(runner.prefill(turn, len(history), blocks))
    expected_kv = [np.asarray(p[np.asarray(blocks)]) for p in runner.pool.k + runner.pool.v]
    # Blocks 0-4 saved as one turn (they move as they are), block 5 alone (staged).
    turn_k, turn_v = (saved_run(np.stack([np.asarray(p[np.asarray(blocks[:5])]) for p in pool]))
                      for pool in (runner.pool.k, runner.pool.v))
    history_blocks = [BlockKV(turn_k[:, i], turn_v[:, i]) for i in range(5)] + [
        BlockKV(np.stack([np.asarray(p[blocks[5]]) for p in runner.pool.k]),
                np.stack([np.asarray(p[blocks[5]]) for p in runner.pool.v]))]
    # The same blocks land elsewhere in a pool poisoned with NaN, layer by layer.
    moved = allocator.allocate(total)
    runner.pool = KVPool(tuple(p.at[np.asarray(moved)].set(np.nan) for p in runner.pool.k),
                         tuple(p.at[np.asarray(moved)].set(np.nan) for p in runner.pool.v))
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        load = LayerwiseLoad(history_blocks, executor=executor)
        opening = turn[:LOADING_CHUNK]
        plan = StepPlan(segments=(Segment(tuple(opening), len(history), tuple(moved)),),
                        sampled=(len(opening) == len(turn),),
                        arrival=Arrival(tuple(moved[:6]), load))
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


def test_host_buffers_are_reused_only_when_nothing_refers_to_them():
    import jax

    buffers = HostBuffers(capacity_bytes=3 * 4096 + 64)
    first = buffers.take(4096)
    held = jax.device_put(first.view(np.float32))  # may alias the buffer (CPU)
    del first
    second = buffers.take(4096)
    assert second.ctypes.data % 64 == 0
    assert second.ctypes.data != held.unsafe_buffer_pointer()  # still aliased: not reused
    address = second.ctypes.data
    del second
    assert buffers.take(4000).ctypes.data == address  # free again and big enough: reused
    assert buffers.take(2048).ctypes.data != address  # would waste more than SLACK
    assert buffers.take(8192).ctypes.data != address  # too small


def test_host_buffers_keep_at_most_their_capacity_dropping_the_oldest_unused():
    buffers = HostBuffers(capacity_bytes=2 * (4096 + 64))
    a, b = buffers.take(4096), buffers.take(4096)
    addresses = {a.ctypes.data, b.ctypes.data}
    del a
    c = buffers.take(4096)  # reuses a's
    assert c.ctypes.data in addresses
    d = buffers.take(4096)  # both kept are in use and no room: new, not kept
    del d
    assert buffers.take(4096).ctypes.data not in addresses | {c.ctypes.data}
    del b, c
    e = buffers.take(8192)  # the kept ones are too small: the oldest make room for it
    address = e.ctypes.data
    del e
    assert buffers.take(8192 - 100).ctypes.data == address


def test_a_run_in_host_buffers_reuses_a_dropped_run_of_that_size():
    buffers = HostBuffers(capacity_bytes=1 << 22)
    shape = (3, 4, 2, 8)  # [L, bs, Hkv, D]
    run = empty_run(shape, np.float32, 5, buffers)
    assert run.shape == (3, 5, 4, 2, 8) and run.ctypes.data % 64 == 0
    spare = run.base.nbytes - run.nbytes - 64  # padding rows after the last layer
    assert spare >= (8 - 5) * 4 * 2 * 8 * 4
    address = run.ctypes.data
    block = run[:, 2]  # a view, as a tier holds it
    del run
    assert empty_run(shape, np.float32, 5, buffers).ctypes.data != address
    del block
    assert empty_run(shape, np.float32, 5, buffers).ctypes.data == address
