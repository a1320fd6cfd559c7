"""Process 0's side of the group store (`GroupStore`) and of the runner (`LeaderSteps`),
with the group, this process's shard and its store replaced by recorders: which steps
they announce, in which order, as which messages; what `load_run` does with the pool
blocks it takes when a holder runs out of room or an allocation fails; which saves
process 0 files itself; and the messages' round trip through JSON."""

import contextlib
import functools
import json
import typing

import jax.numpy as jnp
import numpy as np
import pytest

from jattn.distributed.allocator import DistributedBlockAllocator
from jattn.distributed.group import Stop, from_plain, to_plain
from jattn.distributed.group_store import (
    Flush,
    GroupStore,
    Hint,
    Place,
    Probe,
    ProcessShard,
    Stage,
    StoreWarmUp,
)
from jattn.model.leader_steps import CompileSaves, CompileSteps, LeaderSteps
from jattn.model.step_plan import Arrival, BlockSave, Draw, Segment, StepOutput, StepPlan
from jattn.store.kv_store import KVStore, LoadedRun


class RecordingGroup:
    """A `GroupLeader` that records each step it is asked to announce."""

    def __init__(self):
        self.steps = []
        self.compiling = []  # the steps announced as compiling

    @contextlib.contextmanager
    def step(self, message, *, compiles=False):
        self.steps.append(message)
        if compiles:
            self.compiling.append(message)
        yield


class RecordingStore:
    """An `AttentionStore` that records saves and record reads."""

    def __init__(self, records=None):
        self.saved = {}
        self.record_reads = []
        self.records = records or {}

    def save_blocks(self, keys, block_ids, saved):
        """Records, per key, how its block is produced: from `saved()` when filed."""
        for key, block in zip(keys, block_ids):
            self.saved[key] = lambda block=block: saved()[block]

    def get_record(self, session_id, *, check_remote=True):
        self.record_reads.append(session_id)
        return self.records.get(session_id)


class TwoProcessRunner:
    """A runner over a pool of 12 blocks on two processes of two devices each: process
    p's allocator devices are 2p and 2p + 1, three blocks a device."""

    def __init__(self):
        self.plans = []
        self.compiled = []

    def process_of(self, block):
        return block // 6

    def devices_of_process(self, process):
        return [2 * process, 2 * process + 1]

    def execute(self, plan):
        self.plans.append(plan)
        return StepOutput(None, lambda: {s.block: f"kv of {s.block}" for s in plan.saves
                                         if self.process_of(s.block) == 0})

    def compile_saves(self, max_blocks):
        self.compiled.append(max_blocks)
        return 1


class RecordingShard(ProcessShard):
    """Process 0's `ProcessShard` over a `TwoProcessRunner`, whose stage returns `run`
    and whose place and warm-up record their arguments."""

    def __init__(self, run=(), store=None):
        super().__init__(TwoProcessRunner(), store or RecordingStore())
        self.run = list(run)
        self.placed = None
        self.warmed = []

    def stage(self, keys):
        return self.run[:len(keys)]

    def place(self, ids):
        self.placed = list(ids)

    def warm_up(self, max_blocks):
        self.warmed.append(max_blocks)
        return 2


class Pool:
    """The engine's pool as a store sees it, over a `DistributedBlockAllocator`."""

    def __init__(self, allocator, runner, *, broken_after=None):
        self.allocator = allocator
        self.runner = runner
        self.broken_after = broken_after
        self.taken = 0

    def allocate(self, count):
        return self.allocator.allocate(count)

    def allocate_on_process(self, process, count):
        if self.taken == self.broken_after:
            raise RuntimeError("allocator broke")
        blocks = self.allocator.allocate_on(self.runner.devices_of_process(process), count)
        self.taken += count
        return blocks

    def free(self, block_ids):
        self.allocator.free(block_ids)


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
    loaded = GroupStore(shard, group).load_run(keys(10), Pool(allocator, shard.runner))
    assert group.steps == [Stage(tuple(keys(10))), Place(tuple(loaded.block_ids))]
    assert isinstance(loaded, LoadedRun) and not loaded.arriving  # written by the store
    assert len(loaded) == want and shard.placed == loaded.block_ids
    for block, tier, (process, want_tier) in zip(loaded.block_ids, loaded.tiers, run):
        assert allocator.device_of(block) in shard.devices_of_process(process)
        assert tier == want_tier


def test_load_run_frees_what_it_took_and_places_nothing_when_allocation_fails():
    allocator = DistributedBlockAllocator(4, 3)
    group, shard = RecordingGroup(), RecordingShard([(0, "host")] * 4)
    with pytest.raises(RuntimeError, match="allocator broke"):
        GroupStore(shard, group).load_run(keys(4), Pool(allocator, shard.runner,
                                                        broken_after=2))
    assert group.steps == [Stage(tuple(keys(4))), Place(())] and shard.placed == []
    assert allocator.free_blocks == 12  # the two blocks taken were given back


def test_an_empty_lookup_announces_nothing():
    group = RecordingGroup()
    assert len(GroupStore(RecordingShard(), group).load_run([], None)) == 0
    assert GroupStore(RecordingShard(), group).held([]) == []
    assert group.steps == []


def test_saves_file_process_0s_own_blocks_from_the_plans_copies_announcing_nothing():
    """A plan's saves: process 0 files the blocks on its own devices (ids 0-5) from the
    plan's `saved()`, each under its key; the followers file theirs as they execute the
    plan, so no store step is announced."""
    group, shard = RecordingGroup(), RecordingShard()
    store = GroupStore(shard, group)
    ids = [4, 7, 0, 11, 5]
    calls = []

    def saved():
        calls.append(1)
        return {block: f"kv of {block}" for block in ids if block < 6}

    store.save_blocks(keys(5), ids, functools.cache(saved))
    assert group.steps == [] and not calls  # nothing waited for yet
    assert sorted(shard.store.saved) == sorted(keys(5)[i] for i in (0, 2, 4))
    assert {key: produce() for key, produce in shard.store.saved.items()} == {
        keys(5)[0]: "kv of 4", keys(5)[2]: "kv of 0", keys(5)[4]: "kv of 5"}


def test_records_are_read_only_for_a_session_the_caller_does_not_know():
    store = RecordingStore(records={"s": [{"turn": 1}]})
    group_store = GroupStore(RecordingShard(store=store), RecordingGroup())
    assert group_store.newer_record("s", 1) is None and store.record_reads == []
    assert group_store.newer_record("s", None) == [{"turn": 1}]
    assert group_store.newer_record("t", None) is None
    assert store.record_reads == ["s", "t"]
    assert group_store.refresh_record("s") is None
    assert group_store.read_remote(keys(3)) is None
    assert len(group_store.remote_run(None, None)) == 0


def test_warm_up_announces_the_store_steps_and_compiles_the_saves():
    group, shard = RecordingGroup(), RecordingShard()
    assert GroupStore(shard, group).warm_up(shard.runner, 40) == 3
    assert group.steps == group.compiling == [StoreWarmUp(40)]
    assert shard.warmed == [40] and shard.runner.compiled == [40]


def test_the_group_store_implements_the_whole_store_protocol():
    wanted = {name for name in vars(KVStore) if not name.startswith("_")}
    assert wanted <= set(dir(GroupStore)), wanted - set(dir(GroupStore))
    assert not {"shared", "can_fetch"} & set(dir(GroupStore))


class FixedSteps:
    """`MeshSteps` that return fixed logits, draw their argmax, and record the plans
    they run and the draws."""

    def __init__(self):
        self.plans, self.draws, self.draws_compiled = [], [], False

    def execute(self, plan):
        self.plans.append(plan)
        return StepOutput(jnp.arange(6.0).reshape(2, 3)[::-1], None)

    def draw(self, logits, draws):
        self.draws.append(draws)
        return jnp.argmax(logits, axis=-1)

    def compile_steps(self):
        return 5

    def compile_draws(self, sharding):
        self.draws_compiled = True

    def compile_saves(self, max_blocks):
        return max_blocks


def test_the_leader_announces_each_plan_itself_before_running_it():
    """The followers get the plan as plain data: a fed segment's token read from the
    tokens of the step before, and no draws (the leader draws from its own logits)."""
    group, steps = RecordingGroup(), FixedSteps()
    leader = LeaderSteps(steps, group)
    draws = (Draw((0, 1), 0), Draw((0, 1), 3, temperature=0.5))
    plan = StepPlan(segments=(Segment((3, 4), 0, (0,)), Segment((0,), 6, (1,), fed=1)),
                    sampled=(True, True), draws=draws, fed_tokens=jnp.array([7, 9]),
                    saves=(BlockSave(keys(1)[0], 2),))
    output = leader.execute(plan)
    announced = StepPlan(segments=(Segment((3, 4), 0, (0,)), Segment((9,), 6, (1,))),
                         sampled=(True, True), saves=plan.saves)
    assert group.steps == [announced] and steps.plans == [announced]
    np.testing.assert_array_equal(output.logits, np.arange(6.0).reshape(2, 3)[::-1])
    assert steps.draws == [draws] and output.tokens.tolist() == [2, 2]
    assert leader.compile_steps() == 5 and leader.compile_saves(8) == 8
    assert steps.draws_compiled
    assert group.steps[1:] == group.compiling == [CompileSteps(), CompileSaves(8)]
    assert leader.compile_arrivals() == 0 and len(group.steps) == 3


def test_a_compiling_step_gets_ten_times_the_step_timeout():
    """The watchdog ends the group when a step outlives its limit: a step's limit is
    the timeout, a compiling warm-up step's `COMPILE_TIMEOUT_FACTOR` times it."""
    import time

    from jattn.distributed.group import COMPILE_TIMEOUT_FACTOR, GroupLeader

    class Channel:
        def send(self, message):
            pass

    stalls = []
    leader = GroupLeader(Channel(), 0.1, on_failure=stalls.append)
    assert COMPILE_TIMEOUT_FACTOR == 10
    with leader.step(CompileSteps(), compiles=True):
        time.sleep(0.4)  # 4 timeouts: within the compile limit of 1 s
    assert stalls == []
    with leader.step(StepPlan()):
        time.sleep(0.4)
    assert len(stalls) == 1 and "'StepPlan' has not finished after 0.1 s" in stalls[0]


def test_the_leader_refuses_kv_arriving_layer_by_layer():
    group, steps = RecordingGroup(), FixedSteps()
    plan = StepPlan(segments=(Segment((3,), 16, (0, 1)),), arrival=Arrival((0,), None))
    with pytest.raises(RuntimeError, match="does not run in a group of processes"):
        LeaderSteps(steps, group).execute(plan)
    assert group.steps == [] and steps.plans == []


@pytest.mark.parametrize("message", [
    StepPlan(segments=(Segment((5, 6, 7), 32, (4, 9, 1)), Segment((8,), 70, (2, 3, 6, 0, 11))),
             sampled=(False, True), saves=(BlockSave(bytes(range(16)), 5),
                                           BlockSave(b"\xff" * 16, 0))),
    StepPlan(segments=(Segment(tuple(range(100)), 0, tuple(range(7))),), all_logits=True),
    StepPlan(saves=(BlockSave(b"\x00" * 16, 3),)),
    Probe(tuple(keys(3))), Stage(()), Place((4, 0, 9)), Hint(tuple(keys(2))), Flush(),
    StoreWarmUp(64), CompileSteps(), CompileSaves(16), Stop(),
])
def test_each_message_survives_json_by_its_dataclass(message):
    """What the step channel sends: the fields as JSON (keys as hex strings), rebuilt
    from the message's own annotations into an equal message."""
    text = json.dumps(to_plain(message))
    for save in getattr(message, "saves", ()):
        assert save.key.hex() in text
    rebuilt = from_plain(json.loads(text), type(message))
    assert rebuilt == message
    for name, kind in typing.get_type_hints(type(message)).items():
        if kind is bytes or typing.get_origin(kind) is tuple:
            assert type(getattr(rebuilt, name)) is type(getattr(message, name))
