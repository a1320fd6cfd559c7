"""The store of a process group: every process keeps the blocks of its own devices.

In a group (`jattn.distributed.group`) the KV pool is sharded over every process's devices, and
every process has its own `AttentionStore`: host memory and disk on its own machine,
each under the budgets of the group's store configuration. A block is saved by the
process whose device holds it, into its own tiers, and loaded back into a device of a
process that holds it: no block crosses processes, in either direction. Process 0
decides: its `GroupStore`, the `KVStore` its engine sees, announces each store step, and
every process's `ProcessShard` runs it on its own share. Process 0's store also keeps the
sessions' records, which no other process writes.

The store steps, which every process runs in the order process 0 announces them, each
announced as its message:

- `Probe(keys)`: which tier of which process holds each key (one gather of tier codes);
- `Stage(keys)`: a probe fixes the leading run that some process holds and each key's
  holder (the process with the fastest copy, the lowest among equals); each holder
  reads its keys of the run, and a second gather of the reads that failed (a copy lost
  or found corrupt since the probe) cuts the run before the first; always followed by
- `Place(block_ids)`: process 0 has taken pool blocks for the first `len(block_ids)` keys
  of the run on their holders' devices; each process writes the blocks it read into its
  own;
- `Hint(keys)`: each process's store keeps those longest and prefetches them;
- `Flush()`: each process waits for its saves in flight, then for the others;
- `StoreWarmUp(max_blocks)`: compiles the gathers and the writes of `Place`.

Saves need no store step of their own: they ride on the `StepPlan` that copies their
blocks out of the pool, and each process files the blocks of its own devices
(`ProcessShard.file`).

Every gather also carries each process's store counters, which `GroupStore.stats`
sums: they are as fresh as the last store step.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import jax
import numpy as np

from jattn.block_allocator import PoolExhausted
from jattn.model.kv_cache import bucket, powers_of_two
from jattn.model.step_plan import BlockSave
from jattn.store.kv_store import LoadedRun, PoolSide, SavedBlocks, WarmUpSteps
from jattn.store.store import STATS, AttentionStore
from jattn.store.tier import BlockKV

TIER_CODES = {"host": 1, "disk": 2}
"""A process's answer for a key in a gather: 0 when it holds none, else its fastest
tier's code (smaller is faster)."""
TIER_NAMES = {code: name for name, code in TIER_CODES.items()}

PROCESS_0_ONLY = frozenset({"sessions", "disk_tier_enabled", "remote_tier_enabled",
                            "remote_available"})
"""Store counters that are process 0's alone (its records, its configuration); every
other counter is summed over the group."""


@dataclass(frozen=True)
class Probe:
    """Which tier of which process holds each of `keys` (`ProcessShard.probe`)."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Stage:
    """Read the group's leading run of `keys` (`ProcessShard.stage`)."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Place:
    """Write the staged run into pool blocks `block_ids` (`ProcessShard.place`)."""

    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class Hint:
    """The keys the next requests read, most imminent first (`ProcessShard.hint`)."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Flush:
    """Wait for every process's saves (`ProcessShard.flush`)."""


@dataclass(frozen=True)
class StoreWarmUp:
    """Compile the store steps for up to `max_blocks` keys (`ProcessShard.warm_up`)."""

    max_blocks: int


def run_holders(codes: np.ndarray) -> list[int]:
    """Tier codes `[P, n]` (process p's answer for key i) -> the holder of each key of
    the leading run of keys that some process holds: the process with the fastest
    copy, the lowest-numbered among equals."""
    holders = []
    for column in np.asarray(codes).T:
        held = [(int(code), process) for process, code in enumerate(column) if code]
        if not held:
            break
        holders.append(min(held)[1])
    return holders


class ProcessShard:
    """This process's part of the group's store: its own `AttentionStore` and the
    runner's pool blocks on its own devices. Each method is the body of a store step
    (see the module docstring): every process calls it, in the same order."""

    def __init__(self, runner, store: AttentionStore):
        self.runner = runner
        self.store = store
        self.process = jax.process_index()
        self.peer_stats = np.zeros((jax.process_count(), len(STATS)))
        self._staged: dict[int, BlockKV] = {}  # run index -> block this process read

    def devices_of_process(self, process: int) -> list[int]:
        """The allocator's device numbers of `process`'s devices."""
        return self.runner.devices_of_process(process)

    def _gather(self, codes: list[int]) -> np.ndarray:
        """Every process's `codes` (one per key), `[P, len(codes)]`; also refreshes
        `peer_stats` with every process's store counters."""
        from jax.experimental import multihost_utils

        width = bucket(len(codes), minimum=8)  # a few shapes, so a few compilations
        row = np.zeros(width + len(STATS), np.float64)
        row[:len(codes)] = codes
        stats = self.store.stats()
        row[width:] = [float(stats[name]) for name in STATS]
        # As 32-bit words: jax (without x64) would round float64 counters to float32.
        words = multihost_utils.process_allgather(row.view(np.uint32))
        table = np.ascontiguousarray(np.asarray(words, np.uint32)).view(np.float64)
        self.peer_stats = table[:, width:]
        return table[:, :len(codes)].astype(np.int64)

    def probe(self, keys: list[bytes]) -> np.ndarray:
        """Tier codes `[P, n]`: which tier of each process holds each key (reads
        nothing)."""
        return self._gather([TIER_CODES.get(self.store.contains(key), 0) for key in keys])

    def stage(self, keys: list[bytes]) -> list[tuple[int, str]]:
        """Returns `(holder process, tier)` for each key of the group's leading run, and
        keeps the blocks this process holds of it, read, for `place`."""
        table = self.probe(keys)
        holders = run_holders(table)
        if not holders:
            return []
        read = {index: self.store.get(keys[index]) for index, holder in enumerate(holders)
                if holder == self.process}
        lost = self._gather([int(read.get(index, True) is None)
                             for index in range(len(holders))]).any(axis=0)
        run = int(np.argmax(lost)) if lost.any() else len(holders)
        self._staged = {index: got[0] for index, got in read.items() if index < run}
        return [(holder, TIER_NAMES[int(table[holder, index])])
                for index, holder in enumerate(holders[:run])]

    def place(self, block_ids: list[int]) -> None:
        """Writes the staged blocks of the run's first `len(block_ids)` keys into pool
        blocks `block_ids` (each on its holder's devices); forgets the rest."""
        staged, self._staged = self._staged, {}
        if block_ids:
            self.runner.write_blocks(list(block_ids), {block: staged[index]
                                                       for index, block in enumerate(block_ids)
                                                       if index in staged})

    def file(self, saves: tuple[BlockSave, ...], saved: SavedBlocks) -> None:
        """Has the store's thread file each of `saves` whose block is on this process's
        devices under its key, its KV from `saved()` (the copies a step started)."""
        own = [save for save in saves if self.runner.process_of(save.block) == self.process]
        self.store.save_blocks([save.key for save in own], [save.block for save in own], saved)

    def hint(self, keys: list[bytes]) -> concurrent.futures.Future:
        return self.store.hint(keys)

    def flush(self) -> None:
        """Waits for this process's saves in flight, then for every other process's."""
        self.store.flush()
        self._gather([])

    def warm_up(self, max_blocks: int) -> int:
        """Compiles the gathers and the pool writes of `place` for up to `max_blocks`
        keys. Returns the shapes compiled."""
        widths = powers_of_two(8, bucket(max_blocks, minimum=8))
        for width in widths:
            self._gather([0] * width)
        return self.runner.compile_writes(max_blocks) + len(widths)


class GroupStore:
    """The group's `KVStore`, as process 0's engine sees it: each call that touches
    blocks is a store step of the whole group (`ProcessShard`), announced through
    `group` (a `GroupLeader`); records, configuration and device-tier counts are
    process 0's own store's. Call it from the thread that runs the group's steps.

    Its runs are written into the pool by the store itself (`LoadedRun.arriving` is
    empty); there is no remote tier in a group, so `read_remote` starts nothing and a
    record needs no refresh."""

    def __init__(self, shard: ProcessShard, group):
        self._shard = shard
        self._store = shard.store
        self._group = group
        self._lock = threading.Lock()
        self._misses = 0  # lookups whose run stopped short, over the group

    @property
    def lookahead(self) -> int:
        return self._store.config.lookahead

    def held(self, keys: list[bytes]) -> list[str | None]:
        """For each key, the fastest tier that some process holds it in ("host",
        "disk"), or None."""
        if not keys:
            return []
        with self._group.step(Probe(tuple(keys))):
            codes = self._shard.probe(keys)
        return [TIER_NAMES.get(min((int(c) for c in column if c), default=0))
                for column in codes.T]

    def missing(self, keys: list[bytes]) -> list[bytes]:
        """The keys no process holds."""
        return [key for key, tier in zip(keys, self.held(keys)) if tier is None]

    def load_run(self, keys: list[bytes], pool: PoolSide) -> LoadedRun:
        """Loads the leading run of `keys` that some process holds into pool blocks on
        the devices of the process holding each (`pool.allocate_on_process`), written
        into the pool before it returns. The run stops at the first key with no room on
        its holder's devices (`PoolExhausted`). On any other error the blocks taken are
        given back (`pool.free`), nothing is loaded, and the error is raised."""
        if not keys:
            return LoadedRun()
        with self._group.step(Stage(tuple(keys))):
            run = self._shard.stage(keys)
        ids, tiers = [], []
        try:
            for process, tier in run:
                try:
                    ids += pool.allocate_on_process(process, 1)
                except PoolExhausted:
                    break
                tiers.append(tier)
        except BaseException:
            pool.free(ids)
            ids = []
            raise
        finally:  # every process holds staged blocks until `place`
            with self._group.step(Place(tuple(ids))):
                self._shard.place(ids)
        if len(ids) < len(keys):
            with self._lock:
                self._misses += 1
        return LoadedRun(ids, tiers)

    def read_remote(self, keys: list[bytes]) -> None:
        """No remote tier runs in a group: nothing to read."""
        return None

    def remote_run(self, read, pool: PoolSide) -> LoadedRun:
        return LoadedRun()

    def load_layers(self, blocks: list[BlockKV], *, device=None):
        raise RuntimeError("a group store writes its runs into the pool itself: nothing "
                           "arrives layer by layer")

    def save_blocks(self, keys: list[bytes], block_ids: list[int],
                    saved: SavedBlocks) -> None:
        """Files pool blocks `block_ids` under `keys`: those on process 0's devices into
        its own store, from `saved()` (the copies of the plan that saved them); every
        other process files its own as it executes that plan."""
        self._shard.file(tuple(BlockSave(key, int(block))
                               for key, block in zip(keys, block_ids)), saved)

    def hint(self, keys: list[bytes]) -> concurrent.futures.Future:
        """Every process's store keeps these longest and prefetches those it holds
        (`AttentionStore.hint`); returns process 0's prefetch."""
        keys = list(keys)
        with self._group.step(Hint(tuple(keys))):
            return self._shard.hint(keys)

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        self._store.count_device_hits(blocks, nbytes)

    def newer_record(self, session_id: str, turns_known: int | None, *,
                     check_remote: bool = True) -> list | None:
        """The session's record entries when the caller knows nothing of it
        (`turns_known` None): a session of an earlier run. Records are process 0's own,
        and nothing else extends them, so a known session is never behind."""
        if turns_known is not None:
            return None
        return self._store.get_record(session_id, check_remote=False)

    def refresh_record(self, session_id: str) -> None:
        """No replica shares the records: nothing to refresh."""
        return None

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        return self._store.append_record(session_id, entry)

    def drop(self, session_id: str) -> None:
        self._store.drop(session_id)

    def warm_up(self, steps: WarmUpSteps, max_blocks: int) -> int:
        """Compiles every store step's programs for up to `max_blocks` keys at once, on
        every process, and the copies of the saves (`steps.compile_saves`); nothing
        arrives layer by layer. Returns the shapes compiled."""
        with self._group.step(StoreWarmUp(max_blocks), compiles=True):
            shapes = self._shard.warm_up(max_blocks)
        return shapes + steps.compile_saves(max_blocks)

    def stats(self) -> dict:
        """`AttentionStore.stats` over the group: process 0's own counters now plus the
        other processes' as of the last store step (those in `PROCESS_0_ONLY` are
        process 0's), and the group's misses. Safe from any thread."""
        stats = self._store.stats()
        others = np.delete(self._shard.peer_stats, self._shard.process, axis=0).sum(axis=0)
        for index, name in enumerate(STATS):
            if name not in PROCESS_0_ONLY:
                stats[name] += type(stats[name])(others[index])
        with self._lock:
            stats["misses"] += self._misses
        return stats

    def flush(self) -> None:
        """Waits for every process's saves (and process 0's record appends) in
        flight."""
        with self._group.step(Flush()):
            self._shard.flush()

    def close(self) -> None:
        self._store.close()

