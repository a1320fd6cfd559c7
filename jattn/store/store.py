"""The AttentionStore: KV blocks filed by their content key in an ordered list of tiers,
and each session's record.

The tiers (`tier.BlockTier`), fastest first: host memory (`HostTier`), then, when
configured, local disk (`DiskTier`), then a Redis shared by replicas (`RemoteTier`),
which also keeps the session records so that any replica can continue any session. A block
is its keys and values by its 16-byte content key (see `tier`): any request whose
prefix has that key may reuse it, whichever session computed it, and saving a key the
store holds changes nothing, so each tier keeps one copy however many sessions save it.
A save writes the block through to every tier; a block found in a later tier is copied
into the earlier ones. Each tier evicts per block under its own budget, scheduler-aware
then least recently used: a `hint` goes to every tier, and a use of a block (`get`,
`save`, `touch`) counts in every tier that holds it. Any tier may lose any block at any
time; the caller recomputes what `get` does not return.

A session's record is a list of JSON-able entries (one per turn), grown by
`append_record` (`SessionRecords`; on disk, its log shares the disk's budget with the
blocks). Dropping a session forgets its record only, never blocks, which other requests
may share and which leave by eviction.

The remote tier is never asked on the caller's thread during a turn: `read_remote` reads a
run of blocks from it layer by layer on a thread of its own (`RemoteRead`), and
`refresh_record` brings a session's record up to date with it there.

Saves, record appends, drops and prefetches run in order on one background thread;
saves, appends and hints return futures, `flush` waits for the saves and appends,
`close` flushes and stops the thread. Every public method is safe to call from any
thread, and none raises for a fault of a tier (logged and counted by the tier; see
`disk_files` for the disk's).

What is durable when: a block once its save's future has resolved with "disk" among its
tiers; a record entry once its `append_record` future has resolved True. An entry is
appended after the blocks saved before it, so a record on disk never names a block that
was not written first (though the block may have been evicted since). A restarted
process finds every block and record whose files fit the disk budget.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time

from jattn.store.config import StoreConfig
from jattn.store.disk_files import DiskFiles
from jattn.store.disk_tier import DiskTier
from jattn.store.host_tier import HostTier
from jattn.store.kv_store import LoadedRun, PoolSide, SavedBlocks, WarmUpSteps, resolved
from jattn.store.layer_load import HostBuffers, LayerwiseLoad, LoadTiming
from jattn.store.records import SessionRecords
from jattn.store.remote_read import RemoteRead, is_remote
from jattn.store.remote_tier import RemoteTier
from jattn.store.tier import BlockKV, BlockSpec, BlockTier, checked_block_key

log = logging.getLogger("jattn.store")

# Host memory kept for reuse (in use or not): staging buffers for loads, and the runs
# that blocks are read from disk into (reused memory need not be faulted in again).
STAGING_BYTES = 256 << 20
READ_BUFFER_BYTES = 1 << 30

# What `stats` reports, in order.
STATS = (
    "hbm_hits", "host_hits", "disk_hits", "remote_hits", "misses", "hbm_bytes_loaded",
    "host_bytes_loaded", "disk_bytes_loaded", "remote_bytes_loaded", "host_evictions", "disk_evictions", "disk_record_evictions",
    "prefetched_blocks", "corrupt_entries", "stale_entries", "saves", "saves_skipped_held",
    "save_seconds", "disk_bytes_written", "disk_write_errors", "disk_junk_skipped",
    "torn_record_logs", "layerwise_loads", "load_seconds", "load_stall_seconds",
    "load_hidden_seconds", "host_bytes", "disk_bytes", "host_blocks", "disk_blocks",
    "disk_records", "disk_tier_enabled", "sessions", "remote_tier_enabled",
    "remote_available", "remote_errors", "remote_fetches", "remote_fetched_blocks",
    "remote_fetch_seconds", "remote_lost_loads", "remote_loads", "remote_load_seconds",
    "remote_load_stall_seconds", "remote_load_hidden_seconds", "remote_record_conflicts",
    "lost_sessions", "remote_blocks_written", "remote_bytes_written", "remote_blocks_known")


class AttentionStore:
    """KV blocks by content key and records of sessions, under the byte budgets of
    `config` (see the module docstring), for the model `fingerprint` whose blocks are
    `spec` (when given, an entry read from disk or Redis that is not such a block is
    dropped as corrupt). It is the single process's `KVStore`
    (`jattn.store.kv_store`): the engine loads runs through `load_run` and
    `remote_run`, whose KV arrives layer by layer with the turn's first step."""

    def __init__(self, config: StoreConfig, *, fingerprint: str,
                 spec: BlockSpec | None = None):
        secret = config.store_key()  # (first: a bad key file starts no thread)
        self.config = config
        self.fingerprint = fingerprint
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-store")
        # Remote reads and record refreshes: the turns waiting on Redis, a few at a time.
        self._fetcher = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="jattn-fetch")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-load")
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-read")
        self._staging = HostBuffers(STAGING_BYTES)
        self._host = HostTier(config.host_bytes)
        self._tiers: list[BlockTier] = [self._host]
        self._disk: DiskTier | None = None
        files = None
        if config.disk_bytes > 0:
            root = os.path.join(os.path.abspath(config.disk_path), fingerprint[:16])
            files = DiskFiles(root, config.disk_bytes)
            self._disk = DiskTier(files, fingerprint=fingerprint, secret=secret, spec=spec,
                                  buffers=HostBuffers(READ_BUFFER_BYTES), reader=self._reader)
            self._tiers.append(self._disk)
        self._remote = None
        if config.remote_url:
            self._remote = RemoteTier(config.remote_url, fingerprint=fingerprint,
                                      prefix=config.remote_prefix, secret=secret, spec=spec)
            self._tiers.append(self._remote)
        self._records = SessionRecords(files, fingerprint=fingerprint, remote=self._remote,
                                       secret=secret)
        self._lock = threading.RLock()  # reentrant: `append_record` queues under it
        self._counts = collections.Counter()  # the store's own stats
        self._upcoming: list[bytes] = []  # the last hint, most imminent first
        self._queued_prefetch: concurrent.futures.Future | None = None
        self._pending: set[concurrent.futures.Future] = set()

    # ----- blocks -----------------------------------------------------------------------

    def contains(self, block_key: bytes) -> str | None:
        """The name of the fastest tier that holds the block ("host", "disk"), or None.
        Loads nothing and counts nothing (a copy on disk is checked only when read)."""
        key = checked_block_key(block_key)
        return next((tier.name for tier in self._tiers if tier.contains(key)), None)

    def held(self, block_keys: list[bytes]) -> list[str | None]:
        """`contains` for each of `block_keys`."""
        return [self.contains(block_key) for block_key in block_keys]

    def missing(self, block_keys: list[bytes]) -> list[bytes]:
        """The keys of `block_keys` that no tier holds: those a save would file."""
        return [key for key in block_keys if self.contains(key) is None]

    @property
    def lookahead(self) -> int:
        """How many queued turns a `hint` is worth (`StoreConfig.lookahead`)."""
        return self.config.lookahead

    def load_run(self, block_keys: list[bytes], pool: PoolSide) -> LoadedRun:
        """The leading run of `block_keys` that a local tier holds (as `get_run`), in
        pool blocks taken from `pool` (`PoolExhausted`, taking none, if it is short),
        its KV arriving: the turn's first step writes it layer by layer."""
        found = self.get_run(block_keys)
        if not found:
            return LoadedRun()
        return LoadedRun(block_ids=pool.allocate(len(found)),
                         tiers=[tier for _, tier in found],
                         arriving=[block for block, _ in found])

    def get(self, block_key: bytes) -> tuple[BlockKV, str] | None:
        """The block and the name of the tier it came from, or None if no tier holds a
        good copy. A copy found in a later tier is checked (one that fails is dropped,
        counted and logged by its tier) and copied into the earlier ones. Counts a hit
        or a miss."""
        found = self.get_run([block_key])
        return found[0] if found else None

    def get_run(self, block_keys: list[bytes]) -> list[tuple[BlockKV, str]]:
        """The blocks of the leading run of `block_keys` that some local tier (host
        memory, disk) holds, each with the name of the tier it came from (as `get`, for
        each key in order up to the first that no local tier holds). Never asks the
        remote tier: `read_remote` does, off the caller's thread."""
        keys = [checked_block_key(block_key) for block_key in block_keys]
        found = []
        while len(found) < len(keys):
            run = self._get_local_run(keys[len(found):])
            if not run:
                with self._lock:
                    self._counts["misses"] += 1
                break
            for key, (block, position) in zip(keys[len(found):], run):
                name = self._tiers[position].name
                for faster in self._tiers[:position]:
                    faster.put(key, block)
                for slower in self._tiers[position + 1:]:
                    slower.touch([key])
                self._count_hits(name, 1, block.nbytes)
                found.append((block, name))
        return found

    def _count_hits(self, tier: str, blocks: int, nbytes: int) -> None:
        with self._lock:
            self._counts[f"{tier}_hits"] += blocks
            self._counts[f"{tier}_bytes_loaded"] += nbytes

    def _get_local_run(self, keys: list[bytes]) -> list[tuple[BlockKV, int]]:
        """Blocks of a leading run of `keys` from one tier before the remote one, each
        with that tier's position: host memory's copy of the first, else the leading
        run of those host memory lacks that the disk holds (read together,
        `DiskTier.get_run`). Empty when neither holds a good copy of the first."""
        block = self._host.get(keys[0])
        if block is not None:
            return [(block, 0)]
        return [(block, 1) for block in self._disk_run(keys)]

    def _disk_run(self, keys: list[bytes], max_bytes: int | None = None) -> list[BlockKV]:
        """The disk's blocks of the leading run of `keys` that host memory lacks (of at
        most `max_bytes`)."""
        if self._disk is None:
            return []
        lacking = list(itertools.takewhile(lambda key: not self._host.contains(key), keys))
        return self._disk.get_run(lacking, max_bytes)

    def read_remote(self, block_keys: list[bytes]) -> RemoteRead | None:
        """Starts reading the leading run of `block_keys` that the remote tier holds,
        layer by layer, on a thread of its own (see `RemoteRead`): its `ready` future
        resolves to the run's length once layer 0 has arrived; `remote_run` then gives
        the blocks for a layer-wise load. Once every layer has arrived the blocks are
        also put into host memory, for later turns. None without a remote tier, or
        while it is unreachable (as far as is known)."""
        if self._remote is None or not self._remote.enabled:
            return None
        keys = [checked_block_key(block_key) for block_key in block_keys]
        with self._lock:
            self._counts["remote_fetches"] += 1
        return RemoteRead(self._remote, keys, executor=self._fetcher,
                          on_arrival=self._remote_arrived, on_lost=self._remote_lost)

    def remote_run(self, read: RemoteRead, pool: PoolSide) -> LoadedRun:
        """The blocks of a `read_remote` whose `ready` has resolved, in pool blocks taken
        from `pool` (`PoolExhausted`, taking none, if it is short), arriving; counted as
        hits of the remote tier."""
        blocks = read.blocks()
        block_ids = pool.allocate(len(blocks))
        self._count_hits(self._remote.name, len(blocks), sum(b.nbytes for b in blocks))
        return LoadedRun(block_ids=block_ids, tiers=[self._remote.name] * len(blocks),
                         arriving=blocks)

    def _remote_arrived(self, keys: list[bytes], blocks: list[BlockKV],
                        seconds: float) -> None:
        for key, block in zip(keys, blocks):
            self._host.put(key, block)
        with self._lock:
            self._counts["remote_fetched_blocks"] += len(blocks)
            self._counts["remote_fetch_seconds"] += seconds

    def _remote_lost(self) -> None:
        with self._lock:
            self._counts["remote_lost_loads"] += 1

    def save(self, block_key: bytes, produce) -> concurrent.futures.Future:
        """Files a block under its key in every tier, without blocking the caller.

        `produce()` runs on the store's thread and returns the `BlockKV` (for example by
        waiting for a device-to-host copy the caller already started); it is called
        only when host memory does not hold the key. Saving a held key is cheap and
        idempotent: when every tier holds it (a disabled tier holds nothing and is left
        out), the future is resolved at once and nothing is queued
        (`saves_skipped_held`); a tier that holds it is not written again. The future
        resolves to the names of the tiers that hold the block afterwards; a write that
        fails is left out of them (logged and counted by its tier), never raised.
        """
        key = checked_block_key(block_key)
        if not self._not_held_everywhere([key]):
            return resolved(self._holding(key))
        return self._submit(lambda: self._file([key], lambda lacking: [produce()])[0])

    def save_blocks(self, block_keys: list[bytes], block_ids: list[int],
                    saved: SavedBlocks) -> None:
        """`save`s pool block `block_ids[i]` under `block_keys[i]`, each produced from
        `saved()` (`{pool block: BlockKV}`, waiting for the copies a step started), as
        one piece of work on the store's thread (host memory takes them together)."""
        keys = [checked_block_key(block_key) for block_key in block_keys]
        pool_block = dict(zip(keys, block_ids))
        wanted = self._not_held_everywhere(keys)
        if wanted:
            def produce(lacking: list[bytes]) -> list[BlockKV]:
                copies = saved()
                return [copies[pool_block[key]] for key in lacking]

            self._submit(self._file, wanted, produce)

    def _not_held_everywhere(self, keys: list[bytes]) -> list[bytes]:
        """The keys of `keys` that some enabled tier lacks (those a save files); the
        others are touched and counted as `saves_skipped_held`."""
        wanted, held = [], []
        for key in keys:
            (held if self._held_everywhere(key) else wanted).append(key)
        if held:
            self._touch(held)
            with self._lock:
                self._counts["saves_skipped_held"] += len(held)
        return wanted

    def _file(self, keys: list[bytes], produce) -> list[tuple[str, ...]]:
        """Store thread: puts each block of `keys` into every enabled tier that lacks
        it, host memory's copy where it holds one, else from `produce(lacking)` (the
        blocks of the keys `lacking`, in order). Returns the names of the tiers that
        hold each key afterwards."""
        start = time.perf_counter()
        self._touch(keys)
        lacking = {tier: [key for key in keys if not tier.contains(key)]
                   for tier in self._tiers if tier.enabled}
        needed = list(dict.fromkeys(key for held in lacking.values() for key in held))
        blocks = {}
        if needed:
            blocks = {key: block for key in needed
                      if (block := self._host.get(key)) is not None}
            unheld = [key for key in needed if key not in blocks]
            blocks.update(zip(unheld, produce(unheld) if unheld else ()))
        for tier, tier_keys in lacking.items():
            if tier is self._host:
                tier.put_run([(key, blocks[key]) for key in tier_keys])
            else:
                for key in tier_keys:
                    tier.put(key, blocks[key])
        with self._lock:
            self._counts["saves"] += len(needed)
            self._counts["saves_skipped_held"] += len(keys) - len(needed)
            if needed:
                self._counts["save_seconds"] += time.perf_counter() - start
        return [self._holding(key) for key in keys]

    def _held_everywhere(self, key: bytes) -> bool:
        return all(tier.contains(key) for tier in self._tiers if tier.enabled)

    def _holding(self, key: bytes) -> tuple[str, ...]:
        """The names of the tiers that hold `key`, fastest first."""
        return tuple(tier.name for tier in self._tiers if tier.contains(key))

    def _touch(self, keys: list[bytes]) -> None:
        for tier in self._tiers:
            tier.touch(keys)

    def touch(self, block_keys) -> None:
        """Marks the held blocks among `block_keys` as just used (for least-recently-used
        eviction)."""
        self._touch([checked_block_key(block_key) for block_key in block_keys])

    # ----- scheduler hints ----------------------------------------------------------------

    def hint(self, upcoming_block_keys) -> concurrent.futures.Future:
        """The block keys the scheduler's next requests will read, most imminent first
        (the caller cuts the list to its look-ahead). Until the next hint, every tier's
        eviction keeps these longest, the most imminent last. Those that host memory
        does not hold are read into it from a later tier in the background, most
        imminent first, while they fit beside the more imminent ones. Returns the future
        of that prefetch, which resolves to how many blocks it read (a prefetch not yet
        started reads the latest hint)."""
        keys = [checked_block_key(block_key) for block_key in upcoming_block_keys]
        with self._lock:
            for tier in self._tiers:
                tier.hint(keys)
            self._upcoming = keys
            if self._queued_prefetch is None:
                self._queued_prefetch = self._executor.submit(self._prefetch)
            return self._queued_prefetch

    def _prefetch(self) -> int:
        """Store thread: reads the hinted blocks that host memory does not hold into it,
        in order, up to the first that does not fit beside the hinted blocks before it.
        Returns how many it read."""
        with self._lock:
            self._queued_prefetch = None
            keys = list(dict.fromkeys(self._upcoming))
        room, fetched, index = self._host.capacity_bytes, 0, 0
        while index < len(keys):
            held = self._host.size_of(keys[index])
            if held is not None:
                room -= held
                index += 1
                continue
            # Only what fits: the blocks of one read stay together in host memory.
            run = self._disk_run(keys[index:], room) or self._read_below_host(keys[index])
            for key, block in zip(keys[index:], run):
                if block.nbytes > room:
                    return fetched
                if self._host.put(key, block):
                    fetched += 1
                    room -= block.nbytes
                    with self._lock:
                        self._counts["prefetched_blocks"] += 1
            index += max(len(run), 1)
        return fetched

    def _read_below_host(self, key: bytes) -> list[BlockKV]:
        """The block from the first tier after host memory with a good copy (as a list
        of one), or an empty list."""
        for tier in self._tiers[1:]:
            block = tier.get(key)
            if block is not None:
                return [block]
        return []

    # ----- session records ----------------------------------------------------------------

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        """Appends `entry` (JSON-able; not to be mutated afterwards) to the session's
        record, after its earlier entries (read from disk first when this process has not
        seen the session yet). Raises ValueError, changing nothing, if it is not JSON-able.

        With the disk tier, the entry is also appended to the session's log on the
        store's thread, after the saves submitted before it (so a record on disk never
        names a block that was not written first), as one frame and an fsync (see
        `records`). The future resolves to True once the entry is as durable as this
        store can make it (on disk; at once without a disk tier), False if it did not
        get there: its write failed (logged and counted), the log no longer fits the
        disk budget, or the session was dropped first.
        """
        with self._lock:  # queues each session's writes in the order of its entries
            write = self._records.append(session_id, entry)
            return resolved(True) if write is None else self._submit(write)

    def get_record(self, session_id: str, *, check_remote: bool = True) -> list | None:
        """The session's record entries in order (a new list), from memory or (after a
        restart) from its disk log, or None if neither has it. Reading a log stops at the
        first torn or damaged frame (a crash mid-append) and cuts the file back to the
        frames before it; a log whose header names another session is not believed.
        With a remote tier and `check_remote`, a record that other replicas extended is
        read again from it (a call to Redis: `refresh_record` makes it off the caller's
        thread, and then `check_remote=False` asks nothing of Redis)."""
        return self._records.get(session_id, check_remote=check_remote)

    def newer_record(self, session_id: str, turns_known: int | None, *,
                     check_remote: bool = True) -> list | None:
        """The session's record entries if they are more than `turns_known` (None: the
        caller knows nothing of the session), else None. Without a tier shared by
        replicas nobody else extends a record, so a session the caller knows is answered
        without a lookup."""
        if turns_known is not None and not self._records.shared:
            return None
        entries = self.get_record(session_id, check_remote=check_remote)
        return entries if entries and len(entries) > (turns_known or 0) else None

    def refresh_record(self, session_id: str) -> concurrent.futures.Future | None:
        """Brings the session's record in memory up to date with the remote tier's (one
        call to Redis, two if other replicas extended it), on a thread of its own; None
        without a tier shared by replicas (nothing to wait for)."""
        if not self._records.shared:
            return None
        return self._fetcher.submit(self._records.refresh, session_id)

    def drop(self, session_id: str) -> None:
        """Forgets a session's record, in memory and on disk, after the saves and appends
        submitted before; returns once done (so not to be called from a callback of this
        store's futures, which run on its thread). The blocks the session saved stay:
        they are a cache by content that other requests may share, and leave by eviction
        like any other block. A log that cannot be deleted disables the disk tier."""
        self._executor.submit(self._records.drop, session_id).result()

    # ----- the store's thread --------------------------------------------------------------

    def _submit(self, write, *args) -> concurrent.futures.Future:
        """Queues `write(*args)` on the store's thread, for `flush` to wait for."""
        future = self._executor.submit(write, *args)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.error("a store write failed: %s", future.exception())

    def flush(self) -> None:
        """Waits for every save and record append in flight."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)

    def close(self) -> None:
        """Flushes and stops the background threads."""
        self.flush()
        self._executor.shutdown(wait=True)
        self._loader.shutdown(wait=True)
        self._fetcher.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    # ----- loading to the device, stats ----------------------------------------------------

    def load_layers(self, blocks: list[BlockKV], *, device=None) -> LayerwiseLoad:
        """Starts moving `blocks` (from `get`) to `device` one layer at a time, in the
        background; the engine takes each layer as its computation reaches it (see
        `LayerwiseLoad`). The load's transfer, stall and hidden seconds go to `stats()`
        when its last layer is taken."""
        remote = any(is_remote(block) for block in blocks)
        return LayerwiseLoad(blocks, executor=self._loader, staging=self._staging,
                             device=device,
                             on_finish=functools.partial(self._count_load, remote=remote))

    def _count_load(self, timing: LoadTiming, *, remote: bool) -> None:
        """Adds a finished load's seconds to the stats (also to the remote tier's, if it
        read blocks from it)."""
        counters = [("layerwise_loads", "load")]
        if remote:
            counters.append(("remote_loads", "remote_load"))
        with self._lock:
            for count, seconds in counters:
                self._counts[count] += 1
                self._counts[f"{seconds}_seconds"] += timing.transfer
                self._counts[f"{seconds}_stall_seconds"] += timing.stall
                self._counts[f"{seconds}_hidden_seconds"] += timing.hidden

    def warm_up(self, steps: WarmUpSteps, max_blocks: int) -> int:
        """Has the runner compile what this store's loads (layer by layer; after a
        warm-up on one device, in the background) and saves (up to `max_blocks` blocks
        at once) run. Returns the shapes compiled now."""
        return steps.compile_arrivals() + steps.compile_saves(max_blocks)

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        """The engine reports blocks it reused straight from its device pool."""
        with self._lock:
            self._counts["hbm_hits"] += blocks
            self._counts["hbm_bytes_loaded"] += nbytes

    def stats(self) -> dict:
        """Hits, bytes loaded per tier, misses, evictions (of blocks per tier, and of
        record logs from disk), prefetched blocks, saves (those that did work, their
        seconds, and those skipped because the block was held), bytes held per tier as
        the budgets count them (host: blocks and the dead bytes of arrays they view;
        disk: files and directories), blocks held per tier, record logs on disk,
        sessions whose record is in memory, the layer-wise loads (their transfer
        seconds, the seconds the engine stalled on them, and the seconds hidden behind
        compute), and the disk tier's health: whether it is enabled, failed writes and
        deletions, corrupt copies and stale ones (a file of another block under this
        block's name) dropped, junk skipped at start, and record logs whose torn tail
        was cut off. Each tier's counters are read under its own lock."""
        totals = collections.Counter()
        for source in (*self._tiers, self._records):
            totals.update(source.stats())
        with self._lock:
            totals.update(self._counts)
        return {name: totals[name] for name in STATS}

