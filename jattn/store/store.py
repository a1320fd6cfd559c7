"""The AttentionStore: session-keyed, block-granular KV entries in host memory and on disk,
and each session's record.

An entry is one block of one session: keys (position-free) and values of `block_size`
tokens over all layers, `[L, block_size, Hkv, D]` each, numbered by a per-session serial
that only grows (a turn appends blocks; it never rewrites the history). Every copy carries
the caller's 16-byte block key, the content key of the tokens and context its KV was
computed from, and `get` returns a copy only for the key it is asked for. The device tier
is the engine's block pool: the engine keeps a session's blocks there between turns and
asks the store, through `device_eviction_order`, whom to evict when it needs room. A
session's record is a list of JSON-able entries (one per turn), grown by `append_record`.

Host memory is a cache; the disk tier, when configured, is written through, so a
restarted process finds every session whose files fit the disk budget. Saves, record
appends and drops run in order on one background thread; saves and appends return
futures, `flush` waits for all of them, `close` flushes and stops the thread. Every
public method is safe to call from any thread.

On disk, under the root `<disk_path>/<first 16 characters of the model fingerprint>/`:

    <session key>/          one directory per session, named by 32 hex digits of a hash
                            of the session id (never the id itself)
        00000000.kv, ...    block 0, ...: `disk_entry` files whose header meta holds the
                            serial and the block key (hex)
        session.log         the record: `disk_entry` log frames, the first naming the log
                            format, the model fingerprint and the session id, then one
                            per record entry
        .tmp-*              a file being written (a killed writer's, at start)

What is durable when: a block once its save's future has resolved with "disk" among its
tiers; a record entry once its `append_record` future has resolved True. An entry is
appended after the blocks saved before it, so a record on disk never names a block that
was not written first; a crash mid-append leaves a torn last frame, which reading stops
at and cuts off. At start the store indexes the root without reading the files (each is
checked when read): it deletes leftover temporaries and the blocks of sessions that have
no log (orphans of a crash, or of a drop that could not finish), and skips, logs and
counts (`disk_junk_skipped`) whatever else it does not recognise.

The disk budget counts every byte the store keeps there: block and log files at their
size, and each session directory as `DIRECTORY_BYTES` (the root is not counted).
Eviction takes a session's blocks, log and directory together, so a restart does not
find an evicted session; while the process lives its record stays in memory, and its
next append writes the whole log again. Evictions are made only once the data they make
room for is durable, so that a write that fails evicts nothing; while one file is being
written, the directory may hold up to that file's size beyond the budget.

Disk faults never raise out of a public method. A failed write or deletion is logged and
counted (`disk_write_errors`) and leaves what was durable before. A disk that cannot be
written (EROFS, EACCES, EPERM; a root that cannot be created or listed at start; the log
of an ended session that cannot be removed) disables the disk tier for the life of the
process, with one log line `disk tier disabled: <path>: <reason>` (`disk_tier_enabled`
goes to 0); the host tier goes on. Running out of space (ENOSPC) does not disable it:
space may come back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import hashlib
import itertools
import logging
import operator
import os
import re
import stat
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
BLOCK_KEY_BYTES = 16
LOG_NAME = "session.log"
LOG_FORMAT_VERSION = 1
DIRECTORY_BYTES = 4096  # what a session directory counts in the disk budget: one fs block
# The disk tier's accounting holds, per session, `(key, serial)` for each block file and
# these two entries for its log file and its directory, so that eviction, which takes
# whole sessions, takes them together.
_LOG_SERIAL = -1
_DIRECTORY_SERIAL = -2
_HEX_KEY = re.compile(r"[0-9a-f]{32}")  # session directory names, block keys in headers
_BLOCK_FILE = re.compile(r"(0[0-9]{7}|[1-9][0-9]{7,})\.kv")  # exactly f"{serial:08d}.kv"
_UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_JUNK_LOG_LINES = 10  # one warning per unrecognised thing up to this many, then a summary


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


def _checked_serial(serial) -> int:
    """A block serial as an int, or ValueError (negative serials name no block)."""
    serial = operator.index(serial)
    if serial < 0:
        raise ValueError(f"serial must be >= 0, got {serial}")
    return serial


def _checked_block_key(block_key) -> bytes:
    """`block_key` if it is `BLOCK_KEY_BYTES` bytes, else ValueError."""
    if not isinstance(block_key, bytes) or len(block_key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block_key must be {BLOCK_KEY_BYTES} bytes, got {block_key!r}")
    return block_key


def _resolved(value) -> concurrent.futures.Future:
    """A future already resolved to `value`."""
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


class AttentionStore:
    """KV blocks and records of conversations across turns, under the byte budgets of
    `config` (see the module docstring for the tiers, the disk layout and faults)."""

    def __init__(self, config: StoreConfig, *, fingerprint: str):
        self.config = config
        self.fingerprint = fingerprint
        self._lock = threading.RLock()
        self._host: dict[tuple[str, int], tuple[BlockKV, bytes]] = {}  # -> block, block key
        self._host_tier = Tier(config.host_bytes)
        self._disk_tier = Tier(config.disk_bytes)
        self._records: dict[str, list] = {}
        # Sessions whose log file holds exactly their first n record entries, whole: entry
        # n can be appended. Any other entry is written with the whole log (after a failed
        # append, n stays put, so the next entry rewrites the log, torn tail and all).
        self._logged: dict[str, int] = {}
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
        self._disk_enabled = False
        if config.disk_bytes > 0:
            self._root = os.path.join(os.path.abspath(config.disk_path), fingerprint[:16])
            self._disk_enabled = True
            with self._lock:
                self._scan_disk()

    # ----- disk: paths, accounting, faults ----------------------------------------------

    def _path(self, entry: tuple[str, int]) -> str:
        """The file (or, for the directory entry, the directory) of a disk tier entry."""
        key, serial = entry
        if serial == _DIRECTORY_SERIAL:
            return os.path.join(self._root, key)
        if serial == _LOG_SERIAL:
            return os.path.join(self._root, key, LOG_NAME)
        return os.path.join(self._root, key, f"{serial:08d}.kv")

    def _admit_disk(self, key: str, entry: tuple[str, int], nbytes: int) -> bool:
        """Under the lock: counts `entry`, a file of `nbytes` already durable on disk (and
        the session's directory, if not yet counted), evicting other sessions whole, in
        policy order. A file that cannot fit is deleted again. Returns whether the disk
        tier holds it."""
        if not self._disk_enabled:
            return False
        wanted = [(entry, nbytes)]
        if (key, _DIRECTORY_SERIAL) not in self._disk_tier:
            wanted.insert(0, ((key, _DIRECTORY_SERIAL), DIRECTORY_BYTES))
        evicted, admitted = [], True
        for held, size in wanted:
            admitted, gone = self._disk_tier.admit(held, size, last_used=self._last_used,
                                                   upcoming=self._upcoming)
            evicted += gone
            if not admitted:
                break
        self._stats["disk_evictions"] += sum(1 for _, serial in evicted if serial >= 0)
        self._remove_disk_entries(evicted)
        if not admitted:
            log.info("disk tier: %s does not fit the disk budget beside its session's "
                     "other files", self._path(entry))
            self._remove_disk_entries([entry])
        return admitted

    def _remove_disk_entries(self, entries) -> None:
        """Under the lock: forgets disk tier `entries` and deletes their files; a session
        left without files loses its directory too."""
        for entry in entries:
            self._disk_tier.remove(entry)
            if entry[1] == _LOG_SERIAL:
                self._logged.pop(entry[0], None)
            if entry[1] != _DIRECTORY_SERIAL:
                self._delete_file(self._path(entry))
        for key in {entry[0] for entry in entries}:
            if self._disk_tier.entries_of(key) in ([], [(key, _DIRECTORY_SERIAL)]):
                self._disk_tier.remove((key, _DIRECTORY_SERIAL))
                self._remove_directory(key)

    def _delete_file(self, path: str) -> None:
        """Under the lock: deletes a file of the disk tier (one already gone is fine)."""
        if not self._disk_enabled:
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            self._disk_failed("deleting", path, error)

    def _remove_directory(self, key: str) -> None:
        """Under the lock: removes a session's directory once it is empty."""
        path = self._path((key, _DIRECTORY_SERIAL))
        if not self._disk_enabled:
            return
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno == errno.ENOTEMPTY:  # junk, or a file being written meanwhile
                log.info("disk tier: keeping %s: it is not empty", path)
            else:
                self._disk_failed("removing the directory", path, error)

    def _disk_failed(self, action: str, path: str, error: OSError) -> None:
        """Under the lock: counts and logs a change on disk that failed; one that says the
        disk cannot be written disables the tier."""
        self._stats["disk_write_errors"] += 1
        if error.errno in _UNWRITABLE:
            self._disable_disk(path, f"{action}: {error.strerror}")
        else:
            log.warning("disk tier: %s %s failed: %s", action, path, error)

    def _disable_disk(self, path: str, reason: str) -> None:
        """Under the lock: stops using the disk for the life of the process."""
        if not self._disk_enabled:
            return
        log.error("disk tier disabled: %s: %s", path, reason)
        self._disk_enabled = False
        self._disk_tier = Tier(self.config.disk_bytes)
        self._logged.clear()

    # ----- restart ---------------------------------------------------------------------

    def _scan_disk(self) -> None:
        """Under the lock, at start: indexes the files a previous process left (checked
        when read, not now), deletes its temporaries and orphaned blocks, and skips and
        logs what it does not recognise. A root that cannot be created or listed
        disables the disk tier."""
        try:
            os.makedirs(self._root, exist_ok=True)
            with os.scandir(self._root) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as error:
            self._disable_disk(self._root, f"cannot use the directory: {error.strerror}")
            return
        junk = []
        for item in items:
            if _HEX_KEY.fullmatch(item.name) and _is_directory(item):
                junk += self._scan_session(item.name)
            else:
                junk.append(item.path)
        self._stats["disk_junk_skipped"] += len(junk)
        for path in junk[:_JUNK_LOG_LINES]:
            log.warning("disk tier: skipping %r: not a file or directory the store writes",
                        path)  # %r: a name may hold anything, newlines included
        if len(junk) > _JUNK_LOG_LINES:
            log.warning("disk tier: skipping %d more unrecognised things under %s",
                        len(junk) - _JUNK_LOG_LINES, self._root)

    def _scan_session(self, key: str) -> list[str]:
        """Indexes one session directory at start; returns the paths it skipped."""
        directory = self._path((key, _DIRECTORY_SERIAL))
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError:
            return [directory]
        block_sizes, log_size, junk = {}, None, []
        for item in items:
            try:
                status = item.stat(follow_symlinks=False)
            except OSError:
                junk.append(item.path)
                continue
            regular = stat.S_ISREG(status.st_mode)
            if regular and item.name.startswith(".tmp-"):
                self._delete_leftover(item.path)
            elif regular and _BLOCK_FILE.fullmatch(item.name):
                block_sizes[int(item.name[:-3])] = status.st_size
            elif regular and item.name == LOG_NAME:
                log_size = status.st_size
            else:
                junk.append(item.path)
        if log_size is None or not self._admit_disk(key, (key, _LOG_SERIAL), log_size):
            if block_sizes:
                log.info("disk tier: deleting %d blocks of %s, which has no record",
                         len(block_sizes), directory)
            for serial in block_sizes:
                self._delete_file(self._path((key, serial)))
            self._stats["disk_orphans_deleted"] += len(block_sizes)
            if not junk:
                self._remove_directory(key)
            return junk
        for serial, size in sorted(block_sizes.items()):
            self._admit_disk(key, (key, serial), size)
        return junk

    def _delete_leftover(self, path: str) -> None:
        """Deletes a temporary file a killed writer left; a failure is only logged."""
        try:
            os.unlink(path)
        except OSError as error:
            log.warning("disk tier: cannot delete the leftover temporary %r: %s", path, error)

    # ----- saving ---------------------------------------------------------------------

    def save(self, session_id: str, serial: int, produce, *,
             block_key: bytes) -> concurrent.futures.Future:
        """Stores block `serial` of a session without blocking the caller.

        `produce()` runs on the store's thread and returns the `BlockKV` (for example by
        waiting for a device-to-host copy the caller already started). `block_key` is the
        block's 16-byte content key (the exact tokens and context its KV was computed
        from); it is kept with every copy, and `get` returns a copy only for that key.
        The future resolves to the tiers the block landed in ("host", "disk"); a disk
        write that fails is left out of them (logged and counted), never raised.
        """
        serial, block_key = _checked_serial(serial), _checked_block_key(block_key)
        key = session_key(session_id)
        future = self._executor.submit(self._save, key, serial, produce, block_key)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.error("a store write failed: %s", future.exception())

    def _save(self, key: str, serial: int, produce, block_key: bytes) -> tuple[str, ...]:
        start = time.perf_counter()
        block = produce()
        landed = []
        with self._lock:
            self._last_used[key] = next(self._clock)
            if self._admit_host(key, serial, block, block_key):
                landed.append("host")
        if self._write_block(key, serial, block, block_key):
            landed.append("disk")
        with self._lock:
            self._stats["saves"] += 1
            self._stats["save_seconds"] += time.perf_counter() - start
        return tuple(landed)

    def _admit_host(self, key: str, serial: int, block: BlockKV, block_key: bytes) -> bool:
        entry = (key, serial)
        self._host.pop(entry, None)
        admitted, evicted = self._host_tier.admit(entry, block.nbytes,
                                                  last_used=self._last_used,
                                                  upcoming=self._upcoming)
        for old in evicted:
            del self._host[old]
        self._stats["host_evictions"] += len(evicted)
        if admitted:
            self._host[entry] = (block, block_key)
        return admitted

    def _write_block(self, key: str, serial: int, block: BlockKV, block_key: bytes) -> bool:
        """Store thread: writes a block's file, then counts it in the disk budget (which
        may evict other sessions). Returns whether the disk tier holds it."""
        with self._lock:
            if not self._disk_enabled:
                return False
        data = disk_entry.encode({"k": block.k, "v": block.v}, fingerprint=self.fingerprint,
                                 meta={"serial": serial, "block_key": block_key.hex()})
        if len(data) + DIRECTORY_BYTES > self.config.disk_bytes:
            return False  # could never fit: not worth writing
        path = self._path((key, serial))
        try:
            disk_entry.write_atomic(path, data)
        except OSError as error:
            with self._lock:
                self._disk_failed("writing a KV block", path, error)
            return False
        with self._lock:
            self._stats["disk_bytes_written"] += len(data)
            return self._admit_disk(key, (key, serial), len(data))

    # ----- session records ------------------------------------------------------------

    def append_record(self, session_id: str, entry: dict) -> concurrent.futures.Future:
        """Appends `entry` (JSON-able; not to be mutated afterwards) to the session's
        record, after its earlier entries (read from disk first when this process has not
        seen the session yet). Raises ValueError, changing nothing, if it is not JSON-able.

        With the disk tier, the entry is also appended to the session's log on the
        store's thread, after the saves submitted before it (so a record on disk never
        names a block that was not written first), as one frame and an fsync: a turn's
        append costs that turn's entry, not the whole history. A log that is missing (its
        session was evicted from disk) or that a failed append left in doubt is written
        whole instead, atomically.

        The future resolves to True once the entry is as durable as this store can make
        it (on disk; at once without a disk tier), False if it did not get there: its
        write failed (logged and counted), the log no longer fits the disk budget, or the
        session was dropped first.
        """
        try:
            frame = disk_entry.encode_frame(entry)
        except (TypeError, ValueError) as error:
            raise ValueError(f"a record entry must be JSON-able: {error}") from None
        key = session_key(session_id)
        with self._lock:
            entries = self._records.get(key)
            if entries is None:
                entries = self._records[key] = self._read_record(key, session_id) or []
            entries.append(entry)
            self._last_used[key] = next(self._clock)
            if not self._disk_enabled:
                return _resolved(True)
            future = self._executor.submit(self._write_record_entry, key, session_id,
                                           entries, len(entries) - 1, frame)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _write_record_entry(self, key: str, session_id: str, entries: list, index: int,
                            frame: bytes) -> bool:
        """Store thread: makes `entries[:index + 1]` durable in the session's log, by
        appending `frame` (entry `index`) when the log holds exactly the entries before
        it, else by writing the log whole."""
        with self._lock:
            if not self._disk_enabled:
                return True
            if self._records.get(key) is not entries:
                return False  # dropped since (a drop runs on this thread: not meanwhile)
            appending = self._logged.get(key) == index
            old_size = self._disk_tier.sizes.get((key, _LOG_SERIAL), 0)
            upto = entries[:index + 1]
        path = self._path((key, _LOG_SERIAL))
        try:
            if appending:
                try:
                    disk_entry.append(path, frame)
                    written = len(frame)
                except FileNotFoundError:  # deleted behind the store's back
                    appending = False
            if not appending:
                data = self._encode_log(session_id, upto)
                disk_entry.write_atomic(path, data)
                written = len(data)
        except OSError as error:  # `_logged` stays short of `index`: the next is a rewrite
            with self._lock:
                self._disk_failed("writing the record log", path, error)
            return False
        with self._lock:
            self._stats["disk_bytes_written"] += written
            if not self._admit_disk(key, (key, _LOG_SERIAL),
                                    old_size + written if appending else written):
                return False
            self._logged[key] = index + 1
            return True

    def _encode_log(self, session_id: str, entries: list) -> bytes:
        """A whole log: its header frame, then one frame per entry."""
        header = {"format_version": LOG_FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "session_id": session_id}
        return b"".join(disk_entry.encode_frame(value) for value in [header, *entries])

    def get_record(self, session_id: str) -> list | None:
        """The session's record entries in order (a new list), from memory or (after a
        restart) from its disk log, or None if neither has it. Reading a log stops at the
        first torn or damaged frame (a crash mid-append) and cuts the file back to the
        frames before it; a log whose header names another session is not believed."""
        key = session_key(session_id)
        with self._lock:
            entries = self._records.get(key)
            if entries is None:
                entries = self._read_record(key, session_id)
                if entries is None:
                    return None
                self._records[key] = entries
            return list(entries)

    def _read_record(self, key: str, session_id: str) -> list | None:
        """Under the lock: the entries of the session's disk log, or None."""
        entry = (key, _LOG_SERIAL)
        if not self._disk_enabled or entry not in self._disk_tier:
            return None
        path = self._path(entry)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            log.warning("cannot read the record log %s: %s", path, error)
            data = b""
        frames, good_length = disk_entry.decode_frames(data)
        header = frames[0] if frames else None
        if not (isinstance(header, dict) and len(frames) > 1
                and header.get("format_version") == LOG_FORMAT_VERSION
                and header.get("fingerprint") == self.fingerprint):
            log.warning("dropping session %s from disk: its record log has no good header "
                        "and entry (damaged, another format or another model)", key)
            self._stats["corrupt_entries"] += 1
            self._remove_disk_entries(self._disk_tier.entries_of(key))
            return None
        if header.get("session_id") != session_id:
            log.warning("the record log %s names another session: not believed", path)
            return None
        entries = frames[1:]
        if good_length < len(data):
            log.warning("record log %s ends in a torn or damaged frame: cutting it from %d "
                        "to %d bytes (%d entries kept)", path, len(data), good_length,
                        len(entries))
            self._stats["torn_record_logs"] += 1
            try:
                os.truncate(path, good_length)
            except OSError as error:
                self._disk_failed("cutting the torn tail of", path, error)
                return entries  # the log is written whole at the next append
            if not self._admit_disk(key, entry, good_length):
                return entries
        self._logged[key] = len(entries)
        return entries

    # ----- loading --------------------------------------------------------------------

    def get(self, session_id: str, serial: int, *,
            block_key: bytes) -> tuple[BlockKV, str] | None:
        """Block `serial` of a session and the tier it came from ("host" or "disk"), or
        None if no tier holds a good copy saved with `block_key`. A copy saved with another
        key (stale: another session's entry copied under this serial, or a block of a turn
        whose record was lost) or a disk copy that fails its checks is dropped, counted
        and logged."""
        serial, block_key = _checked_serial(serial), _checked_block_key(block_key)
        key = session_key(session_id)
        entry = (key, serial)
        with self._lock:
            self._last_used[key] = next(self._clock)
            held = self._host.get(entry)
            if held is not None and held[1] == block_key:
                self._count_hit("host", held[0].nbytes)
                return held[0], "host"
            if held is not None:
                log.info("dropping KV block %s/%d from host memory: saved for another "
                         "block key", key, serial)
                self._stats["stale_entries"] += 1
                self._host_tier.remove(entry)
                del self._host[entry]
            if entry not in self._disk_tier:
                self._stats["misses"] += 1
                return None
        found = self._read_disk(key, serial)
        with self._lock:
            if found is not None and found[1] != block_key:
                log.info("dropping KV block %s/%d from disk: saved for another block key",
                         key, serial)
                self._stats["stale_entries"] += 1
                self._remove_disk_entries([entry])
                found = None
            if found is None:
                self._stats["misses"] += 1
                return None
            self._count_hit("disk", found[0].nbytes)
            self._admit_host(key, serial, *found)
        return found[0], "disk"

    def _read_disk(self, key: str, serial: int) -> tuple[BlockKV, bytes] | None:
        """A block's disk copy and the block key it was saved with (not compared with any
        key here), or None after dropping a copy that fails its checks."""
        try:
            arrays, meta = disk_entry.read(self._path((key, serial)),
                                           fingerprint=self.fingerprint)
            if meta.get("serial") != serial or set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("entry is not the block it is filed as")
            block_key = meta.get("block_key")
            if not isinstance(block_key, str) or not _HEX_KEY.fullmatch(block_key):
                raise disk_entry.CorruptEntry("no block key in its header")
        except disk_entry.CorruptEntry as error:
            log.warning("dropping KV block %s/%d from disk: %s", key, serial, error)
            with self._lock:
                self._stats["corrupt_entries"] += 1
                self._remove_disk_entries([(key, serial)])
            return None
        return BlockKV(arrays["k"], arrays["v"]), bytes.fromhex(block_key)

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
        background (with the block keys they were saved with, which a later `get`
        checks). Returns the future of that prefetch."""
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
                                 if s >= 0 and (k, s) not in self._host)
            for serial in serials:
                found = self._read_disk(key, serial)
                if found is None:
                    continue
                with self._lock:
                    if self._admit_host(key, serial, *found):
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
                    "disk": sum(1 for _, s in self._disk_tier.entries_of(key) if s >= 0)}

    def touch(self, session_id: str) -> None:
        """Marks a session as just used (for least-recently-used eviction)."""
        with self._lock:
            self._last_used[session_key(session_id)] = next(self._clock)

    # ----- dropping, flushing, stats ---------------------------------------------------

    def drop(self, session_id: str) -> None:
        """Forgets a session in every tier, its record included, after the saves and
        appends submitted before; returns once done (so not to be called from a callback
        of this store's futures, which run on its thread). Never raises for a disk fault
        (see `_drop`)."""
        self._executor.submit(self._drop, session_key(session_id)).result()

    def _drop(self, key: str) -> None:
        """Store thread: forgets a session in memory, then deletes its files. Deleting its
        log is the commit point: a log that cannot be deleted disables the disk tier (the
        session is forgotten in memory all the same); blocks that cannot be deleted after
        it are orphans, which the next start's scan deletes."""
        with self._lock:
            for entry in self._host_tier.entries_of(key):
                self._host_tier.remove(entry)
                del self._host[entry]
            self._records.pop(key, None)
            self._last_used.pop(key, None)
            if not self._disk_enabled:
                return
            log_path = self._path((key, _LOG_SERIAL))
            try:
                os.unlink(log_path)
            except FileNotFoundError:
                pass
            except OSError as error:
                self._stats["disk_write_errors"] += 1
                self._disable_disk(log_path, "cannot delete the record log of an ended "
                                   f"session: {error.strerror}")
                return
            self._remove_disk_entries(self._disk_tier.entries_of(key))

    def drop_blocks(self, session_id: str, serials) -> None:
        """Forgets some blocks of a session (truncated out of its context).

        A turn's blocks arrive as views of one array; a kept block that shares its
        array with a dropped one is copied out, so the dropped blocks' memory is freed
        (the host budget counts blocks, and a view keeps its whole array alive)."""
        key = session_key(session_id)
        serials = [_checked_serial(serial) for serial in serials]
        with self._lock:
            arrays, on_disk = [], []
            for serial in serials:
                entry = (key, serial)
                held = self._host.pop(entry, None)
                if held is not None:
                    self._host_tier.remove(entry)
                    arrays += [a.base for a in (held[0].k, held[0].v) if a.base is not None]
                if entry in self._disk_tier:
                    on_disk.append(entry)
            self._remove_disk_entries(on_disk)
            shared = {id(a) for a in arrays}  # `arrays` keeps these ids alive meanwhile
            for entry in self._host_tier.entries_of(key) if shared else ():
                block, block_key = self._host[entry]
                if id(block.k.base) in shared or id(block.v.base) in shared:
                    self._host[entry] = (BlockKV(block.k.copy(), block.v.copy()), block_key)

    def flush(self) -> None:
        """Waits for every save and record append in flight."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending)

    def close(self) -> None:
        """Flushes and stops the background thread."""
        self.flush()
        self._executor.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    def stats(self) -> dict:
        """Hits, bytes loaded per tier, evictions (blocks), prefetches, bytes held per tier
        (on disk: files and directories, as the budget counts them), the layer-wise
        loads (their transfer seconds, the seconds the engine stalled on them, and the
        seconds hidden behind compute), and the disk tier's health: whether it is
        enabled, failed writes and deletions, stale copies dropped for another block key,
        junk skipped and orphaned blocks deleted at start, and record logs whose torn
        tail was cut off."""
        with self._lock:
            stats = {name: self._stats[name] for name in (
                "hbm_hits", "host_hits", "disk_hits", "misses", "hbm_bytes_loaded",
                "host_bytes_loaded", "disk_bytes_loaded", "host_evictions", "disk_evictions",
                "prefetched_blocks", "corrupt_entries", "stale_entries", "saves",
                "save_seconds", "disk_bytes_written", "disk_write_errors",
                "disk_junk_skipped", "disk_orphans_deleted", "torn_record_logs",
                "layerwise_loads", "load_seconds", "load_stall_seconds",
                "load_hidden_seconds")}
            stats.update(host_bytes=self._host_tier.used, disk_bytes=self._disk_tier.used,
                         host_blocks=len(self._host),
                         disk_blocks=sum(1 for _, s in self._disk_tier.sizes if s >= 0),
                         disk_tier_enabled=int(self._disk_enabled),
                         sessions=len(self._records))
        return stats


def _is_directory(item: os.DirEntry) -> bool:
    """Whether a scanned item is a directory itself (a link to one is not)."""
    try:
        return item.is_dir(follow_symlinks=False)
    except OSError:
        return False
