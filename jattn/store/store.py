"""The AttentionStore: session-keyed, block-granular KV entries in host memory and on disk.

An entry is one block of one session: keys (position-free) and values of `block_size`
tokens over all layers, `[L, block_size, Hkv, D]` each, numbered by a per-session serial
that only grows (a turn appends blocks; it never rewrites the history). The device tier
is the engine's block pool: the engine keeps a session's blocks there between turns and
asks the store, through `device_eviction_order`, whom to evict when it needs room.

Host memory is a cache; the disk tier, when configured, is written through, so a
restarted process finds every session whose entries fit the disk budget. Saves run on a
background thread and return futures; `flush` waits for all of them, `close` flushes and
stops the thread. Every public method is safe to call from any thread.

Disk file names come from a hash of the session id, never from the id itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from jattn.store import disk_entry
from jattn.store.config import StoreConfig
from jattn.store.layer_load import LayerwiseLoad, LoadTiming, StagingPool
from jattn.store.placement import Tier
from jattn.store.policy import eviction_order

log = logging.getLogger("jattn.store")

TIERS = ("hbm", "host", "disk")


@dataclass(frozen=True)
class BlockKV:
    """One block's keys and values, `[L, block_size, Hkv, D]` each, position-free."""

    k: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def session_key(session_id: str) -> str:
    """The name a session goes by on disk and in indexes: a hash, not the raw id."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


class AttentionStore:
    """KV blocks of conversations across turns, under the byte budgets of `config`."""

    def __init__(self, config: StoreConfig, *, fingerprint: str):
        self.config = config
        self.fingerprint = fingerprint
        self._lock = threading.RLock()
        self._host: dict[tuple[str, int], BlockKV] = {}
        self._host_tier = Tier(config.host_bytes)
        self._disk_tier = Tier(config.disk_bytes)
        self._records: dict[str, dict] = {}
        self._last_used: dict[str, int] = {}
        self._clock = itertools.count()
        self._upcoming: list[str] = []
        self._prefetching: concurrent.futures.Future | None = None
        self._pending: set[concurrent.futures.Future] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-store")
        self._loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-load")
        self._staging = StagingPool()
        self._stats = collections.Counter()
        self._root = None
        if config.disk_bytes > 0:
            self._root = os.path.join(os.path.abspath(config.disk_path), fingerprint[:16])
            self._scan_disk()

    # ----- paths and restart -------------------------------------------------------------

    def _block_path(self, key: str, serial: int) -> str:
        return os.path.join(self._root, key, f"{serial:08d}.kv")

    def _record_path(self, key: str) -> str:
        return os.path.join(self._root, key, "session.rec")

    def _scan_disk(self) -> None:
        """Indexes the entries a previous process left (checked when read, not now)."""
        if not os.path.isdir(self._root):
            return
        for key in os.listdir(self._root):
            directory = os.path.join(self._root, key)
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name.startswith(".tmp-"):
                    os.unlink(path)  # a write that never finished: never believed
                elif name.endswith(".kv") and name[:-3].isdigit():
                    admitted, _ = self._disk_tier.admit(
                        (key, int(name[:-3])), os.path.getsize(path), last_used={},
                        upcoming=[])
                    if not admitted:
                        os.unlink(path)

    # ----- saving ---------------------------------------------------------------------

    def save(self, session_id: str, serial: int, produce) -> concurrent.futures.Future:
        """Stores block `serial` of a session without blocking the caller.

        `produce()` runs on the store's thread and returns the `BlockKV` (for example by
        waiting for a device-to-host copy the caller already started). The future
        resolves to the tiers the block landed in.
        """
        key = session_key(session_id)
        future = self._executor.submit(self._save, key, serial, produce)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.error("a store write failed: %s", future.exception())

    def _save(self, key: str, serial: int, produce) -> tuple[str, ...]:
        start = time.perf_counter()
        block = produce()
        landed = []
        with self._lock:
            self._last_used[key] = next(self._clock)
            if self._admit_host(key, serial, block):
                landed.append("host")
        if self._root is not None and self._write_disk(key, serial, block):
            landed.append("disk")
        with self._lock:
            self._stats["saves"] += 1
            self._stats["save_seconds"] += time.perf_counter() - start
        return tuple(landed)

    def _admit_host(self, key: str, serial: int, block: BlockKV) -> bool:
        entry = (key, serial)
        self._host.pop(entry, None)
        admitted, evicted = self._host_tier.admit(entry, block.nbytes,
                                                  last_used=self._last_used,
                                                  upcoming=self._upcoming)
        for old in evicted:
            del self._host[old]
        self._stats["host_evictions"] += len(evicted)
        if admitted:
            self._host[entry] = block
        return admitted

    def _write_disk(self, key: str, serial: int, block: BlockKV) -> bool:
        data = disk_entry.encode({"k": block.k, "v": block.v}, fingerprint=self.fingerprint,
                                 meta={"serial": serial})
        with self._lock:
            admitted, evicted = self._disk_tier.admit((key, serial), len(data),
                                                      last_used=self._last_used,
                                                      upcoming=self._upcoming)
            for old in evicted:
                self._unlink(self._block_path(*old))
            self._stats["disk_evictions"] += len(evicted)
            if admitted:
                disk_entry.write_atomic(self._block_path(key, serial), data)
                self._stats["disk_bytes_written"] += len(data)
        return admitted

    def _unlink(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)

    def _delete_disk_session(self, key: str) -> None:
        for entry in self._disk_tier.entries_of(key):
            self._disk_tier.remove(entry)
            self._unlink(self._block_path(*entry))

    # ----- session records ------------------------------------------------------------

    def put_record(self, session_id: str, record: dict) -> None:
        """Keeps a session's record (its token history and turn log: JSON-able, not to be
        mutated afterwards); with the disk tier, also writes it atomically on the store's
        thread, after the saves submitted before it (so a record on disk never names a
        block that was not written first). A write that a newer record of the session
        supersedes before it starts is skipped."""
        key = session_key(session_id)
        with self._lock:
            self._records[key] = record
            self._last_used[key] = next(self._clock)
        if self._root is None:
            return
        future = self._executor.submit(self._write_record, key, session_id, record)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _write_record(self, key: str, session_id: str, record: dict) -> None:
        with self._lock:
            if self._records.get(key) is not record:
                return
        data = disk_entry.encode({}, fingerprint=self.fingerprint,
                                 meta={"session_id": session_id, "record": record})
        disk_entry.write_atomic(self._record_path(key), data)

    def get_record(self, session_id: str) -> dict | None:
        """The session's record, from memory or (after a restart) from disk."""
        key = session_key(session_id)
        with self._lock:
            if key in self._records:
                return self._records[key]
            if self._root is None or not os.path.exists(self._record_path(key)):
                return None
            try:
                _, meta = disk_entry.read(self._record_path(key), fingerprint=self.fingerprint)
            except disk_entry.CorruptEntry as error:
                log.warning("dropping the record of session %s: %s", key, error)
                self._delete_disk_session(key)
                self._unlink(self._record_path(key))
                return None
            if meta.get("session_id") != session_id:
                return None
            self._records[key] = meta["record"]
            return meta["record"]

    # ----- loading --------------------------------------------------------------------

    def get(self, session_id: str, serial: int) -> tuple[BlockKV, str] | None:
        """Block `serial` of a session and the tier it came from, or None if no tier
        holds a good copy. A disk copy that fails its checks is dropped and logged."""
        key = session_key(session_id)
        entry = (key, serial)
        with self._lock:
            self._last_used[key] = next(self._clock)
            if entry in self._host:
                block = self._host[entry]
                self._count_hit("host", block.nbytes)
                return block, "host"
            if entry not in self._disk_tier:
                self._stats["misses"] += 1
                return None
        block = self._read_disk(key, serial)
        if block is None:
            with self._lock:
                self._stats["misses"] += 1
            return None
        with self._lock:
            self._count_hit("disk", block.nbytes)
            self._admit_host(key, serial, block)
        return block, "disk"

    def _read_disk(self, key: str, serial: int) -> BlockKV | None:
        try:
            arrays, meta = disk_entry.read(self._block_path(key, serial),
                                           fingerprint=self.fingerprint)
            if meta.get("serial") != serial or set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("entry is not the block it is filed as")
        except disk_entry.CorruptEntry as error:
            log.warning("dropping KV block %s/%d from disk: %s", key, serial, error)
            with self._lock:
                self._disk_tier.remove((key, serial))
                self._stats["corrupt_entries"] += 1
                self._unlink(self._block_path(key, serial))
            return None
        return BlockKV(arrays["k"], arrays["v"])

    def load_layers(self, blocks: list[BlockKV], *, rows: int, device=None) -> LayerwiseLoad:
        """Starts moving `blocks` (from `get`) to `device` one layer at a time, in the
        background; the engine takes each layer as its computation reaches it (see
        `LayerwiseLoad`). The load's transfer, stall and hidden seconds go to `stats()`
        when its last layer is taken."""
        return LayerwiseLoad(blocks, rows=rows, executor=self._loader, staging=self._staging,
                             device=device, on_finish=self._count_load)

    def _count_load(self, timing: LoadTiming) -> None:
        with self._lock:
            self._stats["layerwise_loads"] += 1
            self._stats["load_seconds"] += timing.transfer
            self._stats["load_stall_seconds"] += timing.stall
            self._stats["load_hidden_seconds"] += timing.hidden

    def _count_hit(self, tier: str, nbytes: int) -> None:
        self._stats[f"{tier}_hits"] += 1
        self._stats[f"{tier}_bytes_loaded"] += nbytes

    def count_device_hits(self, blocks: int, nbytes: int) -> None:
        """The engine reports blocks it reused straight from its device pool."""
        with self._lock:
            self._stats["hbm_hits"] += blocks
            self._stats["hbm_bytes_loaded"] += nbytes

    # ----- scheduler hints ------------------------------------------------------------

    def hint(self, upcoming_session_ids) -> concurrent.futures.Future:
        """The scheduler's queue, next first. The first `lookahead` sessions are kept
        longest by eviction, and their disk entries are fetched into host memory in the
        background. Returns the future of that prefetch."""
        keys = [session_key(s) for s in list(upcoming_session_ids)[:self.config.lookahead]]
        with self._lock:
            self._upcoming = keys
            if self._prefetching is None or self._prefetching.done():
                self._prefetching = self._executor.submit(self._prefetch)
            return self._prefetching  # a prefetch not yet started reads the latest hint

    def _prefetch(self) -> int:
        with self._lock:
            keys = list(self._upcoming)
        fetched = 0
        for key in keys:
            with self._lock:
                serials = sorted(s for k, s in self._disk_tier.entries_of(key)
                                 if (k, s) not in self._host)
            for serial in serials:
                block = self._read_disk(key, serial)
                if block is None:
                    continue
                with self._lock:
                    if self._admit_host(key, serial, block):
                        fetched += 1
                        self._stats["prefetched_blocks"] += 1
        return fetched

    def device_eviction_order(self, session_ids) -> list:
        """Order in which the engine should evict these sessions from its device pool."""
        by_key = {session_key(s): s for s in session_ids}
        with self._lock:
            order = eviction_order(list(by_key), last_used=self._last_used,
                                   upcoming=self._upcoming)
        return [by_key[k] for k in order]

    def session_blocks(self, session_id: str) -> dict[str, int]:
        """How many blocks of a session host memory and disk hold."""
        key = session_key(session_id)
        with self._lock:
            return {"host": len(self._host_tier.entries_of(key)),
                    "disk": len(self._disk_tier.entries_of(key))}

    def touch(self, session_id: str) -> None:
        """Marks a session as just used (for least-recently-used eviction)."""
        with self._lock:
            self._last_used[session_key(session_id)] = next(self._clock)

    # ----- dropping, flushing, stats ---------------------------------------------------

    def drop(self, session_id: str) -> None:
        """Forgets a session in every tier, its record included."""
        key = session_key(session_id)
        self.flush()
        with self._lock:
            for entry in self._host_tier.entries_of(key):
                self._host_tier.remove(entry)
                del self._host[entry]
            self._records.pop(key, None)
            self._last_used.pop(key, None)
            if self._root is not None:
                self._delete_disk_session(key)
                self._unlink(self._record_path(key))

    def drop_blocks(self, session_id: str, serials) -> None:
        """Forgets some blocks of a session (truncated out of its context).

        A turn's blocks arrive as views of one array; a kept block that shares its
        array with a dropped one is copied out, so the dropped blocks' memory is freed
        (the host budget counts blocks, and a view keeps its whole array alive)."""
        key = session_key(session_id)
        with self._lock:
            arrays = []
            for serial in serials:
                entry = (key, serial)
                block = self._host.pop(entry, None)
                if block is not None:
                    self._host_tier.remove(entry)
                    arrays += [a.base for a in (block.k, block.v) if a.base is not None]
                if entry in self._disk_tier:
                    self._disk_tier.remove(entry)
                    self._unlink(self._block_path(key, serial))
            shared = {id(a) for a in arrays}  # `arrays` keeps these ids alive meanwhile
            for entry in self._host_tier.entries_of(key) if shared else ():
                block = self._host[entry]
                if id(block.k.base) in shared or id(block.v.base) in shared:
                    self._host[entry] = BlockKV(block.k.copy(), block.v.copy())

    def flush(self) -> None:
        """Waits for every save in flight."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)

    def close(self) -> None:
        """Flushes and stops the background thread."""
        self.flush()
        self._executor.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    def stats(self) -> dict:
        """Hits, bytes loaded per tier, evictions, prefetches, bytes held per tier, and
        the layer-wise loads: their transfer seconds, the seconds the engine stalled on
        them, and the seconds hidden behind compute."""
        with self._lock:
            stats = {name: self._stats[name] for name in (
                "hbm_hits", "host_hits", "disk_hits", "misses", "hbm_bytes_loaded",
                "host_bytes_loaded", "disk_bytes_loaded", "host_evictions", "disk_evictions",
                "prefetched_blocks", "corrupt_entries", "saves", "save_seconds",
                "disk_bytes_written", "layerwise_loads", "load_seconds",
                "load_stall_seconds", "load_hidden_seconds")}
            stats.update(host_bytes=self._host_tier.used, disk_bytes=self._disk_tier.used,
                         host_blocks=len(self._host), disk_blocks=len(self._disk_tier.sizes),
                         sessions=len(self._records))
        return stats
