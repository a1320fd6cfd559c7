"""The store of a process group: every process keeps the blocks of its own devices.

In a group (`jattn.distributed.group`) the KV pool is sharded over every process's devices, and
every process has its own `AttentionStore`: host memory and disk on its own machine,
each under the budgets of the group's store configuration. A block is saved by the
process whose device holds it, into its own tiers, and loaded back into a device of a
process that holds it: no block crosses processes, in either direction. Process 0
decides: its `GroupStore`, what its `ChatEngine` sees, announces each store step, and
every process's `ProcessShard` runs it on its own share. Process 0's store also keeps the
sessions' records.

The steps, which every process runs in the order process 0 announces them:

- `probe(keys)`: which tier of which process holds each key (one gather of tier codes);
- `stage(keys)`: a probe fixes the leading run that some process holds and each key's
  holder (the process with the fastest copy, the lowest among equals); each holder
  reads its keys of the run, and a second gather of the reads that failed (a copy lost
  or found corrupt since the probe) cuts the run before the first; always followed by
- `place(ids)`: process 0 has taken pool blocks for the first `len(ids)` keys of the run
  on their holders' devices; each process writes the blocks it read into its own;
- `save(keys, ids)`: each process copies the pool blocks among `ids` on its devices out
  and saves them under their keys in its own store;
- `hint(keys)`: each process's store keeps those longest and prefetches them;
- `flush()`: each process waits for its saves in flight, then for the others;
- `warm_up_store(max_blocks)`: compiles the reads, writes and gathers.

Every gather also carries each process's store counters, which `GroupStore.stats`
sums: they are as fresh as the last store step.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
from typing import Callable

import jax
import numpy as np

from jattn.block_allocator import PoolExhausted
from jattn.model.kv_cache import bucket, powers_of_two
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

STORE_STEPS = frozenset({"probe", "stage", "place", "save", "hint", "flush",
                         "warm_up_store"})


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


def _hex(keys: list[bytes]) -> list[str]:
    return [key.hex() for key in keys]


def _keys(hexes: list[str]) -> list[bytes]:
    return [bytes.fromhex(key) for key in hexes]


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

    def positions_of(self, process: int) -> list[int]:
        """The allocator's device numbers of `process`'s devices."""
        return self.runner.shards.positions_of(process)

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

    def place(self, ids: list[int]) -> None:
        """Writes the staged blocks of the run's first `len(ids)` keys into pool blocks
        `ids` (each on its holder's devices); forgets the rest."""
        staged, self._staged = self._staged, {}
        if ids:
            self.runner.write_own_blocks(ids, {block: staged[index]
                                               for index, block in enumerate(ids)
                                               if index in staged})

    def save(self, keys: list[bytes], ids: list[int]) -> None:
        """Starts copying the pool blocks among `ids` on this process's devices out, and
        has the store's thread file each under its key (`keys[i]` for `ids[i]`)."""
        blocks = functools.cache(self.runner.read_own_blocks(ids))
        shards = self.runner.shards
        for key, block in zip(keys, ids):
            if shards.process_of(block) == self.process:
                self.store.save(key, functools.partial(lambda b: blocks()[b], block))

    def hint(self, keys: list[bytes]) -> concurrent.futures.Future:
        return self.store.hint(keys)

    def flush(self) -> None:
        """Waits for this process's saves in flight, then for every other process's."""
        self.store.flush()
        self._gather([])

    def warm_up(self, max_blocks: int) -> int:
        """Compiles the pool reads and writes and the gathers for up to `max_blocks`
        keys. Returns the shapes compiled."""
        widths = powers_of_two(8, bucket(max_blocks, minimum=8))
        for width in widths:
            self._gather([0] * width)
        return self.runner.warm_up_own_blocks(max_blocks) + len(widths)

    def replay(self, op: str, args: dict) -> None:
        """Runs a store step process 0 announced (see `STORE_STEPS`)."""
        if op == "probe":
            self.probe(_keys(args["keys"]))
        elif op == "stage":
            self.stage(_keys(args["keys"]))
        elif op == "place":
            self.place(args["ids"])
        elif op == "save":
            self.save(_keys(args["keys"]), args["ids"])
        elif op == "hint":
            self.hint(_keys(args["keys"]))
        elif op == "flush":
            self.flush()
        elif op == "warm_up_store":
            self.warm_up(args["max_blocks"])
        else:
            raise ValueError(f"the group's leader sent an unknown store step {op!r}")


class GroupStore:
    """The group's store as process 0's `ChatEngine` sees it: each call that touches
    blocks is a store step of the whole group (`ProcessShard`), announced through
    `group` (a `GroupLeader`); records, configuration and device-tier counts are
    process 0's own store's. Call it from the thread that runs the group's steps."""

    shared = False  # no tier shared by replicas: the remote tier does not run in a group
    can_fetch = False

    def __init__(self, shard: ProcessShard, group):
        self._shard = shard
        self._store = shard.store
        self._group = group
        self._lock = threading.Lock()
        self._misses = 0  # lookups whose run stopped short, over the group

    @property
    def config(self):
        return self._store.config

    @property
    def fingerprint(self) -> str:
        return self._store.fingerprint

    def _step(self, op: str, **args):
        return self._group.step(op, args)

    def held(self, keys: list[bytes]) -> list[str | None]:
        """For each key, the fastest tier that some process holds it in ("host",
        "disk"), or None."""
        if not keys:
            return []
        with self._step("probe", keys=_hex(keys)):
            codes = self._shard.probe(keys)
        return [TIER_NAMES.get(min((int(c) for c in column if c), default=0))
                for column in codes.T]

    def load_run(self, keys: list[bytes], allocate_on: Callable[[list[int], int], list[int]],
                 free: Callable[[list[int]], None]) -> list[tuple[int, str]]:
        """Loads the leading run of `keys` that some process holds into pool blocks on
        the devices of the process holding each, and returns `(pool block, tier)` for
        each key loaded, in order. `allocate_on(devices, count)` takes pool blocks on
        those allocator devices (`PoolExhausted` when it cannot): the run stops at the
        first key with no room on its holder's devices. On any other error the blocks
        taken are given back with `free(ids)`, and nothing is loaded."""
        if not keys:
            return []
        with self._step("stage", keys=_hex(keys)):
            run = self._shard.stage(keys)
        ids, tiers = [], []
        try:
            for process, tier in run:
                try:
                    ids += allocate_on(self._shard.positions_of(process), 1)
                except PoolExhausted:
                    break
                tiers.append(tier)
        except BaseException:
            free(ids)
            ids = []
            raise
        finally:  # every process holds staged blocks until `place`
            with self._step("place", ids=ids):
                self._shard.place(ids)
        if len(ids) < len(keys):
            with self._lock:
                self._misses += 1
        return list(zip(ids, tiers))

    def save_blocks(self, keys: list[bytes], block_ids: list[int]) -> None:
        """Saves pool blocks `block_ids` under `keys`, each by the process whose device
        holds it, into its own store, without waiting for the copies."""
        if keys:
            with self._step("save", keys=_hex(keys), ids=[int(b) for b in block_ids]):
                self._shard.save(keys, block_ids)

    def hint(self, upcoming_block_keys) -> concurrent.futures.Future:
        """Every process's store keeps these longest and prefetches those it holds
        (`AttentionStore.hint`); returns process 0's prefetch."""
        keys = list(upcoming_block_keys)
        with self._step("hint", keys=_hex(keys)):
            return self._shard.hint(keys)

    def warm_up(self, max_blocks: int) -> int:
        """Compiles every store step's programs for up to `max_blocks` keys at once, on
        every process. Returns the shapes compiled."""
        with self._step("warm_up_store", max_blocks=max_blocks):
            return self._shard.warm_up(max_blocks)

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        self._store.count_device_hits(blocks, nbytes)

    def get_record(self, session_id: str, *, check_remote: bool = True) -> list | None:
        return self._store.get_record(session_id, check_remote=check_remote)

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        return self._store.append_record(session_id, entry)

    def drop(self, session_id: str) -> None:
        self._store.drop(session_id)

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
        with self._step("flush"):
            self._shard.flush()

    def close(self) -> None:
        self._store.close()
