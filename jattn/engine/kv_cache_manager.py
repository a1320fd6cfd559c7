"""The one owner of the device's block pool: who holds which block, and for what.

`KVCacheManager` holds the allocator, the device tier (`DeviceBlocks`: pool blocks kept
under their content keys after their turn, with reference counts and eviction) and the
store behind it (a `KVStore`). The turn procedure asks it in typed values: `match` a
context's keys (a `BlockLease`: the blocks reused from the device in place, loaded from
the store, and what is still to arrive), `extend` a lease with fresh blocks, `publish`
a finished turn's full blocks (the `BlockSave`s to start), `release` a lease. Every
allocation is freed on every path: a lease's own blocks go to the device tier or back to
the allocator, and its references are dropped, exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from jattn.model.step_plan import BlockSave
from jattn.store.device import DeviceBlocks
from jattn.store.kv_store import KVStore, LoadedRun
from jattn.store.remote_read import RemoteRead

TIERS = ("hbm", "host", "disk", "remote")
"""Where a reused block's KV came from, fastest first ("hbm": the device pool)."""


@dataclass(frozen=True)
class BlockCensus:
    """Where the blocks of the device pool are: `free`, `resident` (held by the device
    tier under a content key, referenced or cached), `in_flight` (a running turn's own,
    not yet published), of `total`; `double_counted` blocks are in two of these places at
    once. Every block is in exactly one place when `balanced`."""

    total: int
    free: int
    resident: int
    in_flight: int
    double_counted: int

    @property
    def balanced(self) -> bool:
        return (self.double_counted == 0
                and self.free + self.resident + self.in_flight == self.total)


@dataclass
class BlockLease:
    """The pool blocks a turn holds: `table`, its sequence's blocks in order (the reused
    context's, then fresh ones). The device tier's blocks of keys `acquired` are shared
    references; every other block of the table is the lease's own. `loaded`: keys whose
    KV came from the store (not saved back); `arriving`: `(pool block, BlockKV)` still to
    be written, layer by layer, by the turn's first step; `tiers`: reused blocks per
    tier; `remote`: a read of the remote tier to wait for before matching again."""

    table: list[int] = field(default_factory=list)
    acquired: list[bytes] = field(default_factory=list)
    own: list[int] = field(default_factory=list)
    loaded: set[bytes] = field(default_factory=set)
    arriving: list[tuple[int, object]] = field(default_factory=list)
    tiers: dict = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    remote: RemoteRead | None = None

    @property
    def reused_blocks(self) -> int:
        """Context blocks not recomputed: from the device tier or the store."""
        return len(self.acquired) + len(self.loaded)

    def take_arriving(self) -> list[tuple[int, object]]:
        """The blocks still to arrive, handed over once (to the step that writes them)."""
        arriving, self.arriving = self.arriving, []
        return arriving


class KVCacheManager:
    """The device pool's allocator, its device tier of `capacity_blocks` cached blocks
    of `block_bytes` bytes each, and the `store` behind them. As a store's `PoolSide`,
    it allocates the blocks a store loads a run into. `devices_of_process(p)`: the
    allocator's devices of process p of a group (one process: never asked)."""

    def __init__(self, allocator, store: KVStore, *, block_bytes: int, capacity_blocks: int,
                 devices_of_process: Callable[[int], list[int]] | None = None):
        self.allocator = allocator
        self.store = store
        self.block_bytes = block_bytes
        self.device = DeviceBlocks(allocator, capacity_blocks=capacity_blocks)
        self._devices_of_process = devices_of_process
        self._leases: dict[int, BlockLease] = {}  # by id(): the leases not yet given back

    # ----- the pool, as a store sees it ---------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """`count` pool blocks, evicting cached blocks of the device tier when the pool
        is short; `PoolExhausted` (taking none) if that is not enough."""
        short = count - self.allocator.free_blocks
        if short > 0:
            self.device.evict(short)
        return self.allocator.allocate(count)

    def allocate_on_process(self, process: int, count: int) -> list[int]:
        """`allocate`, on the devices of process `process` of a group: evicts only
        cached blocks on those devices."""
        devices = set(self._devices_of_process(process))
        short = count - sum(self.allocator.free_on(device) for device in devices)
        if short > 0:
            self.device.evict(short, where=lambda b: self.allocator.device_of(b) in devices)
        return self.allocator.allocate_on(sorted(devices), count)

    def free(self, block_ids) -> None:
        """Gives pool blocks back to the allocator."""
        self.allocator.free(block_ids)

    # ----- leases -------------------------------------------------------------------------

    def match(self, keys: list[bytes], *, remote_read: RemoteRead | None = None,
              fetch_remote: bool = False, from_store: bool = True) -> BlockLease:
        """A lease on the blocks of the leading run of `keys` that some tier holds,
        each from the fastest: the device tier's in place, the store's loaded into fresh
        pool blocks (arriving), then those `remote_read` brought if it read the keys that
        follow. Without such a read and with `fetch_remote`, a run that stops short where
        the store's remote tier may hold more starts a read of it and returns it as
        `remote` (release the lease, wait, and match again with it). Without
        `from_store`, only the device tier's: the run stops at the first key it lacks.
        On an error (`PoolExhausted`) everything taken is given back and the error
        raised."""
        lease = self._lease()
        try:
            self._match(keys, lease, remote_read, fetch_remote, from_store)
        except BaseException:
            self.release(lease)
            raise
        if lease.tiers["hbm"] and lease.remote is None:  # else counted when matched again
            self.store.count_device_hits(lease.tiers["hbm"], lease.tiers["hbm"] * self.block_bytes)
        return lease

    def _match(self, keys: list[bytes], lease: BlockLease, remote_read: RemoteRead | None,
               fetch_remote: bool, from_store: bool) -> None:
        remote = remote_read.keys if remote_read is not None else []
        start = 0
        while start < len(keys):
            if keys[start] in self.device:
                lease.table.append(self.device.acquire(keys[start]))
                lease.acquired.append(keys[start])
                lease.tiers["hbm"] += 1
                start += 1
                continue
            if not from_store:
                return
            if remote and keys[start:start + len(remote)] == remote:
                start += self._take(lease, keys[start:], self.store.remote_run(remote_read, self))
                remote = []
                continue
            end = start
            while end < len(keys) and keys[end] not in self.device and \
                    not (remote and keys[end] == remote[0]):
                end += 1
            start += self._take(lease, keys[start:end], self.store.load_run(keys[start:end], self))
            if start < end:
                if fetch_remote:
                    lease.remote = self.store.read_remote(keys[start:end])
                return

    @staticmethod
    def _take(lease: BlockLease, keys: list[bytes], run: LoadedRun) -> int:
        """Appends a run the store loaded (for the leading `len(run)` of `keys`) to the
        lease; returns its length."""
        lease.table += run.block_ids
        lease.own += run.block_ids
        lease.loaded.update(keys[:len(run)])
        lease.arriving += zip(run.block_ids, run.arriving)
        for tier in run.tiers:
            lease.tiers[tier] += 1
        return len(run)

    def _lease(self) -> BlockLease:
        lease = BlockLease()
        self._leases[id(lease)] = lease
        return lease

    def lease_of(self, block_ids: list[int]) -> BlockLease:
        """A lease owning pool blocks `block_ids` (allocated through `allocate`), in
        that order."""
        lease = self._lease()
        lease.table += block_ids
        lease.own += block_ids
        return lease

    def extend(self, lease: BlockLease, count: int) -> None:
        """Appends `count` fresh pool blocks to the lease's table (see `allocate`)."""
        fresh = self.allocate(count)
        lease.table += fresh
        lease.own += fresh

    def publish(self, lease: BlockLease, keys: list[bytes]) -> list[BlockSave]:
        """A turn is done: `lease.table[i]` holds the KV of the block whose content key
        is `keys[i]`. Hands the lease's own blocks of those keys to the device tier
        (a key the tier holds already keeps its block; the newcomer is freed), frees its
        other blocks, drops its references, trims the device tier to its budget, and
        returns the saves to start: the blocks it computed that the store holds
        nowhere."""
        own = set(lease.own)
        fresh = []
        for key, block in zip(keys, lease.table):
            if block in own:
                held, new = self.device.publish(key, block)
                own.discard(block)
                if new and key not in lease.loaded:
                    fresh.append((key, held))
        lease.own = [block for block in lease.own if block in own]
        self.release(lease)
        wanted = set(self.store.missing([key for key, _ in fresh]))
        return [BlockSave(key, block) for key, block in fresh if key in wanted]

    def release(self, lease: BlockLease) -> None:
        """Gives back what a lease holds: its own blocks to the allocator, its references
        to the device tier, which is then trimmed to its budget. Idempotent."""
        if self._leases.pop(id(lease), None) is None:
            return
        own, lease.own = lease.own, []
        acquired, lease.acquired = lease.acquired, []
        try:
            self.allocator.free(own)
        finally:
            for key in acquired:
                self.device.release(key)
            self.device.trim()

    # ----- the whole pool -----------------------------------------------------------------

    def hint(self, keys: list[bytes]) -> None:
        """The keys the next requests read, most imminent first: the device tier and the
        store keep them longest; the store prefetches them."""
        self.device.hint(keys)
        self.store.hint(keys)

    def resident(self, keys: list[bytes]) -> dict:
        """How many of `keys` each tier holds now: the device tier, and the store's
        tiers (each key counted in the store's fastest that holds it)."""
        held = dict.fromkeys(TIERS, 0)
        held["hbm"] = sum(1 for key in keys if key in self.device)
        for tier in self.store.held(keys):
            if tier:
                held[tier] += 1
        return held

    def census(self) -> BlockCensus:
        """Counts where every pool block is; `balanced` unless a block leaked or is
        claimed twice."""
        free = self.allocator.free_ids()
        held = self.device.held_blocks()
        held_set = set(held)
        in_flight = {b for lease in self._leases.values() for b in lease.table} - held_set
        double = len(held) - len(held_set) + len(free & held_set) + len(free & in_flight)
        return BlockCensus(total=self.allocator.num_blocks, free=len(free),
                           resident=len(held_set), in_flight=len(in_flight),
                           double_counted=double)

    def stats(self) -> dict:
        """The device pool's blocks (all, free), the device tier's (held, one per key
        however many sequences share it; referenced by running turns; evicted so far),
        and the store's counters."""
        device = self.device.stats()
        return {"hbm_blocks": device.held, "hbm_blocks_referenced": device.referenced,
                "hbm_evictions": device.evicted, "pool_blocks": self.allocator.num_blocks,
                "pool_free_blocks": self.allocator.free_blocks, **self.store.stats()}
