"""`ModelRunner.execute(plan)`: a plan's saves copy their blocks as they were before the
plan's step wrote into the pool, as views of layer-major arrays; one packed step of
decodes and prompt chunks gives each segment the logits it gets alone; a mesh gives the
logits of one device; a plan the runner cannot run is refused before anything runs."""

import numpy as np
import pytest

from jattn import LLM
from jattn.model.kv_cache import KVPool, blocks_for
from jattn.model.step_plan import LOADING_CHUNK, Arrival, BlockSave, Segment, StepPlan
from jattn.store.layer_load import _follows

KEY = bytes(16)


def poisoned(runner):
    """Every slot of the runner's pool set to NaN."""
    runner.pool = KVPool(tuple(p * np.nan for p in runner.pool.k),
                         tuple(p * np.nan for p in runner.pool.v))


def pool_blocks(runner, blocks):
    """`{block: (k, v)}` `[L, bs, Hkv, D]` read from the pool now."""
    return {b: (np.stack([np.asarray(p[b]) for p in runner.pool.k]),
                np.stack([np.asarray(p[b]) for p in runner.pool.v])) for b in blocks}


@pytest.fixture(scope="module", params=[1, 8], ids=["one-device", "mesh"])
def runner(request):
    return LLM(store=None, kv_parallel=request.param, num_blocks=64).runner


def test_saves_copy_the_blocks_as_they_were_before_the_step(runner):
    allocator = runner.new_allocator()
    poisoned(runner)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, runner.config.vocab_size, 70).tolist()
    blocks = allocator.allocate(blocks_for(len(tokens) + 20, runner.block_size))
    runner.prefill(tokens, 0, blocks)
    saved_ids = blocks[:5]
    before = pool_blocks(runner, saved_ids)
    # The step writes 20 more tokens into the last saved block (slots 6 to 15) and on.
    more = rng.integers(3, runner.config.vocab_size, 20).tolist()
    output = runner.execute(StepPlan(
        segments=(Segment(tuple(more), len(tokens), tuple(blocks)),), sampled=(True,),
        saves=tuple(BlockSave(KEY, b) for b in saved_ids)))
    assert output.logits.shape[1] == runner.config.vocab_size
    assert not np.array_equal(pool_blocks(runner, [blocks[4]])[blocks[4]][0],
                              before[blocks[4]][0], equal_nan=True)
    saved = output.saved()
    assert saved is output.saved()  # waited for once
    assert sorted(saved) == sorted(saved_ids)
    for block in saved_ids:
        np.testing.assert_array_equal(saved[block].k, before[block][0])
        np.testing.assert_array_equal(saved[block].v, before[block][1])
    # Views of one layer-major array per device holding them, in the saves' order: a
    # load moves each layer of a device's consecutive blocks as one piece.
    per_device = runner.pool.num_blocks // len(runner.pool.k[0].sharding.device_set)
    devices = [block // per_device for block in saved_ids]
    assert len({id(saved[b].k.base) for b in saved_ids}) == len(set(devices))
    changes = sum(a != b for a, b in zip(devices, devices[1:]))
    breaks = sum(not _follows(saved[a], saved[b]) for a, b in zip(saved_ids, saved_ids[1:]))
    assert breaks == changes
    allocator.free(blocks)


def test_a_packed_step_gives_each_segment_its_logits_alone(runner):
    """Two decodes and two prompt chunks in one step: each row equals the logits of that
    segment run alone after the same history."""
    rng = np.random.default_rng(1)
    vocab = runner.config.vocab_size
    poisoned(runner)
    histories = [rng.integers(3, vocab, n).tolist() for n in (33, 17, 40, 5)]
    news = [rng.integers(3, vocab, n).tolist() for n in (1, 1, 9, 24)]
    allocator = runner.new_allocator()

    def fresh_sequences():
        tables = []
        for history, new in zip(histories, news):
            table = tuple(allocator.allocate(blocks_for(len(history) + len(new),
                                                        runner.block_size)))
            runner.prefill(history, 0, table)
            tables.append(table)
        return tables

    tables = fresh_sequences()
    alone = [np.asarray(runner.execute(StepPlan(segments=(
        Segment(tuple(new), len(history), table),))).logits[0])
        for history, new, table in zip(histories, news, tables)]
    for table in tables:
        allocator.free(table)
    tables = fresh_sequences()
    packed = np.asarray(runner.execute(StepPlan(segments=tuple(
        Segment(tuple(new), len(history), table)
        for history, new, table in zip(histories, news, tables)))).logits)
    for row, want in enumerate(alone):
        np.testing.assert_allclose(packed[row], want, atol=2e-4, rtol=1e-4)
    for table in tables:
        allocator.free(table)


def test_all_logits_on_a_mesh_equal_one_devices():
    rng = np.random.default_rng(2)
    one, mesh = (LLM(store=None, kv_parallel=n, num_blocks=64).runner for n in (1, 8))
    tokens = rng.integers(3, one.config.vocab_size, 150).tolist()
    logits = []
    for runner in (one, mesh):
        blocks = runner.new_allocator().allocate(blocks_for(len(tokens), runner.block_size))
        logits.append(np.asarray(runner.prefill(tokens, 0, blocks, all_logits=True)))
    assert logits[0].shape == (len(tokens), one.config.vocab_size)
    np.testing.assert_allclose(logits[1], logits[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("plan,pattern", [
    (StepPlan(segments=(Segment((5, 6), 31, (0, 1)),)), "must cover its positions up to 33"),
    (StepPlan(segments=(Segment((), 0, (0,)),)), "needs tokens"),
    (StepPlan(segments=(Segment((5,), 0, (0,)),) * 2, sampled=(True,)), "sampled has 1"),
    (StepPlan(segments=(Segment((5,), 0, (0,)),) * 2, all_logits=True), "holds one segment"),
    (StepPlan(segments=(Segment((5,) * (LOADING_CHUNK + 1), 0, (0, 1, 2, 3, 4)),),
              arrival=Arrival((0,), None)), f"runs 1 to {LOADING_CHUNK} tokens"),
    (StepPlan(segments=(Segment((5,) * 600, 0, tuple(range(40))),)), "at most"),
])
def test_a_plan_the_runner_cannot_run_is_refused_and_changes_nothing(plan, pattern):
    runner = LLM(store=None, prefill_chunk=512, num_blocks=64).runner
    before = [np.asarray(p) for p in runner.pool.k]
    with pytest.raises(ValueError, match=pattern):
        runner.execute(plan)
    for got, want in zip(runner.pool.k, before):
        np.testing.assert_array_equal(np.asarray(got), want)
