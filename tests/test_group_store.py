"""Process 0's side of the group store (`GroupStore.load_run`), with the group and this
process's shard replaced by recorders: which steps it announces, in which order, and
what it does with the pool blocks it takes when a holder runs out of room or an
allocation fails."""

import contextlib

import numpy as np
import pytest

from jattn.distributed.allocator import DistributedBlockAllocator
from jattn.distributed.group_store import GroupStore


class RecordingGroup:
    """A `GroupLeader` that records each step it is asked to announce."""

    def __init__(self):
        self.steps = []

    @contextlib.contextmanager
    def step(self, op, args):
        self.steps.append((op, args))
        yield


class RecordingShard:
    """A `ProcessShard` whose stage returns `run` and whose place records its ids. Two
    processes of two devices each: process p's allocator devices are 2p and 2p + 1."""

    def __init__(self, run):
        self.run = run
        self.placed = None
        self.store = None

    def stage(self, keys):
        return self.run[:len(keys)]

    def place(self, ids):
        self.placed = list(ids)

    def positions_of(self, process):
        return [2 * process, 2 * process + 1]


def keys(n):
    return [bytes([i]) * 16 for i in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_load_run_places_each_block_on_its_holders_devices_until_one_is_full(seed):
    rng = np.random.default_rng(seed)
    run = [(int(p), "host" if rng.random() < 0.5 else "disk") for p in rng.integers(0, 2, 10)]
    allocator = DistributedBlockAllocator(4, 3)
    allocator.allocate_on([0, 1], int(rng.integers(0, 7)))  # process 0 partly full
    room = {p: sum(allocator.free_on(d) for d in (2 * p, 2 * p + 1)) for p in (0, 1)}
    want = 0  # the run up to the first key whose holder has no room left
    for process, _ in run:
        if room[process] == 0:
            break
        room[process] -= 1
        want += 1
    group, shard = RecordingGroup(), RecordingShard(run)
    placed = GroupStore(shard, group).load_run(keys(10), allocator.allocate_on,
                                               allocator.free)
    assert [op for op, _ in group.steps] == ["stage", "place"]
    assert len(placed) == want and shard.placed == [block for block, _ in placed]
    for (block, tier), (process, want_tier) in zip(placed, run):
        assert allocator.device_of(block) in shard.positions_of(process) and tier == want_tier


def test_load_run_frees_what_it_took_and_places_nothing_when_allocation_fails():
    allocator = DistributedBlockAllocator(4, 3)
    taken = []

    def allocate_on(devices, count):
        if len(taken) == 2:
            raise RuntimeError("allocator broke")
        taken.extend(allocator.allocate_on(devices, count))
        return taken[-count:]

    group, shard = RecordingGroup(), RecordingShard([(0, "host")] * 4)
    with pytest.raises(RuntimeError, match="allocator broke"):
        GroupStore(shard, group).load_run(keys(4), allocate_on, allocator.free)
    assert [op for op, _ in group.steps] == ["stage", "place"] and shard.placed == []
    assert allocator.free_blocks == 12  # the two blocks taken were given back


def test_an_empty_lookup_announces_nothing():
    group = RecordingGroup()
    assert GroupStore(RecordingShard([]), group).load_run([], None, None) == []
    assert group.steps == []
