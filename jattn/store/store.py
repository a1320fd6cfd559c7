"""The AttentionStore: KV blocks filed by their content key in host memory and on disk,
and each session's record.

A block is keys (position-free) and values of `block_size` tokens over all layers,
`[L, block_size, Hkv, D]` each. Its only identity is its 16-byte block key, the content
key of the tokens and context its KV was computed from (computed by the caller): any
request whose prefix has that key may reuse the block, whichever session computed it,
and saving a key the store holds changes nothing. So the store keeps one copy of a block
per tier however many sessions save it. A session's record is a list of JSON-able
entries (one per turn), grown by `append_record`; dropping a session forgets its record
only, never blocks, which other requests may share and which leave by eviction.

Host memory is a cache; the disk tier, when configured, is written through, so a
restarted process finds every block and record whose files fit the disk budget. Saves,
record appends, drops and prefetches run in order on one background thread; saves,
appends and hints return futures, `flush` waits for the saves and appends, `close`
flushes and stops the thread. Every public method is safe to call from any thread.

Each tier evicts per block, scheduler-aware then least recently used (`placement.Tier`,
one group per block): blocks the last `hint` named are kept longest, the most imminent
last; other blocks go least recently used first (`get`, `save` and `touch` use a block).

On disk, under the root `<disk_path>/<first 16 characters of the model fingerprint>/`:

    blocks/<k[:2]>/<k>.kv   the block whose key is `k` (32 hex digits): a `disk_entry`
                            file whose header meta holds the block key (hex); one whose
                            header names another key is not believed
    sessions/<s>.log        the record of the session whose `session_key` is `s` (a
                            hash, never the id itself): `disk_entry` log frames, the
                            first naming the log format, the model fingerprint and the
                            session id, then one per record entry
    .tmp-*                  a file being written, beside its final name (a killed
                            writer's, at start)

A directory exists while it holds a file of the store: the last file to leave takes it
along. What is durable when: a block once its save's future has resolved with "disk"
among its tiers; a record entry once its `append_record` future has resolved True. An
entry is appended after the blocks saved before it, so a record on disk never names a
block that was not written first (though the block may have been evicted since); a crash
mid-append leaves a torn last frame, which reading stops at and cuts off. At start the
store indexes the root without reading the files (each is checked when read), oldest
first, as if used in the order they were last written: it deletes leftover temporaries
and skips, logs and counts (`disk_junk_skipped`) whatever else it does not recognise,
files of other layouts included.

The disk budget counts every byte the store keeps there: block and log files at their
size, and each directory below the root as `DIRECTORY_BYTES` (the root is not counted).
A record log is evicted like a block (one group each), least recently used first, so a
restart does not find a session whose log was evicted; while the process lives its
record stays in memory, and its next append writes the whole log again. Evictions are
made only once the data they make room for is durable, so that a write that fails
evicts nothing; while one file is being written, the disk may hold up to that file's
size and the directories it needs beyond the budget.

The host budget counts every block's bytes and, for a block whose keys or values are a
view of a larger numpy array (a turn's blocks arrive as views of one `[L, blocks, ...]`
array, which loads layer by layer in one piece per layer), the bytes of that array no
held block views: the view keeps the whole array alive. A block whose arrays could
never fit the host budget is copied instead. When a block that views an array
leaves host memory, the other held views of that array are copied out, so that the
array is freed (for as long as the copies take, host memory holds both).

Disk faults never raise out of a public method. A failed write or deletion is logged and
counted (`disk_write_errors`) and leaves what was durable before. A disk that cannot be
written (EROFS, EACCES, EPERM; a root that cannot be created or listed at start; the log
of a dropped session that cannot be removed) disables the disk tier for the life of the
process, with one log line `disk tier disabled: <path>: <reason>` (`disk_tier_enabled`
goes to 0); the host tier goes on. Running out of space (ENOSPC) does not disable it:
space may come back.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import hashlib
import itertools
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from jattn.store import disk_entry
from jattn.store.config import StoreConfig
from jattn.store.layer_load import LayerwiseLoad, LoadTiming, StagingPool
from jattn.store.placement import Tier

log = logging.getLogger("jattn.store")

TIERS = ("hbm", "host", "disk")
BLOCK_KEY_BYTES = 16
BLOCKS_DIRECTORY = "blocks"
SESSIONS_DIRECTORY = "sessions"
LOG_FORMAT_VERSION = 1
DIRECTORY_BYTES = 4096  # what a directory counts in the disk budget: one fs block
# Tier entries are `(group, 0)`, one group per file: a block's group is its key in hex,
# a record log's is this prefix and the session key.
_LOG_GROUP = "log:"
_HEX_KEY = re.compile(r"[0-9a-f]{32}")  # block keys in headers
_FAN_OUT = re.compile(r"[0-9a-f]{2}")
_BLOCK_FILE = re.compile(r"([0-9a-f]{32})\.kv")
_LOG_FILE = re.compile(r"([0-9a-f]{32})\.log")
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


def _checked_block_key(block_key) -> bytes:
    """`block_key` if it is `BLOCK_KEY_BYTES` bytes, else ValueError."""
    if not isinstance(block_key, bytes) or len(block_key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block_key must be {BLOCK_KEY_BYTES} bytes, got {block_key!r}")
    return block_key


def _block_entry(block_key: bytes) -> tuple[str, int]:
    """The tier entry of a block."""
    return _checked_block_key(block_key).hex(), 0


def _log_entry(key: str) -> tuple[str, int]:
    """The disk tier entry of the record log of the session whose key is `key`."""
    return _LOG_GROUP + key, 0


def _relative_path(entry: tuple[str, int]) -> str:
    """The file of a disk tier entry, relative to the root."""
    group = entry[0]
    if group.startswith(_LOG_GROUP):
        return os.path.join(SESSIONS_DIRECTORY, group[len(_LOG_GROUP):] + ".log")
    return os.path.join(BLOCKS_DIRECTORY, group[:2], group + ".kv")


def _directories(entry: tuple[str, int]) -> list[str]:
    """The directories below the root that hold an entry's file, outermost first."""
    parts = _relative_path(entry).split(os.sep)[:-1]
    return [os.path.join(*parts[:n]) for n in range(1, len(parts) + 1)]


def _resolved(value) -> concurrent.futures.Future:
    """A future already resolved to `value`."""
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


@dataclass
class _ViewedArray:
    """A numpy array that held blocks view: `views` maps each block (hex key) to the
    bytes of its views of the array, `held` is their sum."""

    array: np.ndarray
    views: dict[str, int] = field(default_factory=dict)
    held: int = 0

    def dead_bytes(self, held: int | None = None) -> int:
        """Bytes of the array that no held block views (with `held` bytes viewed; an
        array no block views is not kept alive)."""
        held = self.held if held is None else held
        return max(self.array.nbytes - held, 0) if held else 0


def _views_by_array(block: BlockKV) -> dict[int, tuple[np.ndarray, int]]:
    """The larger numpy arrays a block's keys and values are views of, by id: each with
    the bytes of the block's views of it."""
    arrays = {}
    for part in (block.k, block.v):
        if isinstance(part.base, np.ndarray) and part.base.nbytes > part.nbytes:
            array, nbytes = arrays.get(id(part.base), (part.base, 0))
            arrays[id(part.base)] = (array, nbytes + part.nbytes)
    return arrays


def _without_views_of(block: BlockKV, array: np.ndarray) -> BlockKV:
    """`block` with its keys and values that view `array` copied out."""
    return BlockKV(*(np.array(part) if part.base is array else part
                     for part in (block.k, block.v)))


class AttentionStore:
    """KV blocks by content key and records of sessions, under the byte budgets of
    `config` (see the module docstring for the tiers, the disk layout and faults)."""

    def __init__(self, config: StoreConfig, *, fingerprint: str):
        self.config = config
        self.fingerprint = fingerprint
        self._lock = threading.RLock()
        self._host: dict[str, BlockKV] = {}  # hex block key -> block
        self._host_tier = Tier(config.host_bytes)
        self._viewed: dict[int, _ViewedArray] = {}  # id(array) -> its held views
        self._host_dead_bytes = 0  # sum of the viewed arrays' dead bytes
        self._disk_tier = Tier(config.disk_bytes)
        # Directories below the root -> how many files the store knows under them (in the
        # disk tier, or being written); the budget counts the ones listed.
        self._directory_files: collections.Counter[str] = collections.Counter()
        self._records: dict[str, list] = {}
        # Sessions whose log file holds exactly their first n record entries, whole: entry
        # n can be appended. Any other entry is written with the whole log (after a failed
        # append, n stays put, so the next entry rewrites the log, torn tail and all).
        self._logged: dict[str, int] = {}
        self._last_used: dict[str, int] = {}  # tier group -> use counter, while held
        self._clock = itertools.count()
        self._upcoming: list[str] = []  # hex keys of the last hint, most imminent first
        self._queued_prefetch: concurrent.futures.Future | None = None
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

    # ----- eviction and use ------------------------------------------------------------

    def _make_room(self, tier: Tier, keep: str, over_budget, evict) -> bool:
        """Under the lock: evicts whole groups of `tier` other than `keep`, in policy
        order, while `over_budget()`; `evict(entries)` forgets each victim's data.
        Returns whether the budget then holds."""
        while over_budget():
            gone = tier.evict_next(keep=keep, last_used=self._last_used,
                                   upcoming=self._upcoming)
            if not gone:
                return False
            evict(gone)
        return True

    def _mark_used(self, group: str) -> None:
        """Under the lock: `group` was just used."""
        self._last_used[group] = next(self._clock)

    def _forget_use(self, group: str) -> None:
        """Under the lock: forgets when `group` was used once no tier holds it."""
        if (group, 0) not in self._host_tier and (group, 0) not in self._disk_tier:
            self._last_used.pop(group, None)

    def _disk_tier_holds(self, name: str) -> bool:
        """Under the lock: whether the disk tier holds block `name`."""
        return (name, 0) in self._disk_tier

    def _tiers_of(self, name: str) -> tuple[str, ...]:
        """Under the lock: the tiers that hold block `name`, fastest first."""
        return tuple(tier for tier, held in (("host", name in self._host),
                                             ("disk", self._disk_tier_holds(name))) if held)

    # ----- host memory -----------------------------------------------------------------

    def _host_bytes(self) -> int:
        """Under the lock: what the host budget counts."""
        return self._host_tier.used + self._host_dead_bytes

    def _admit_host(self, name: str, block: BlockKV) -> bool:
        """Under the lock: takes block `name`, which host memory does not hold, evicting
        others in policy order. A block larger than the tier is refused. Returns
        whether host memory holds it."""
        capacity = self._host_tier.capacity
        if block.nbytes > capacity:
            return False
        views = _views_by_array(block)
        if block.nbytes + self._dead_growth(views) > capacity:  # its arrays never fit
            block, views = BlockKV(np.array(block.k), np.array(block.v)), {}
        fits = self._make_room(
            self._host_tier, name,
            lambda: self._host_bytes() + block.nbytes + self._dead_growth(views) > capacity,
            self._evict_host)
        if not fits:
            return False
        self._host_tier.admit((name, 0), block.nbytes, last_used=self._last_used,
                              upcoming=self._upcoming)
        self._host[name] = block
        self._track_views(name, views)
        return True

    def _dead_growth(self, views: dict) -> int:
        """Under the lock: how the viewed arrays' dead bytes change when a block with
        `views` (from `_views_by_array`) is taken."""
        growth = 0
        for key, (array, nbytes) in views.items():
            viewed = self._viewed.get(key) or _ViewedArray(array)
            growth += viewed.dead_bytes(viewed.held + nbytes) - viewed.dead_bytes()
        return growth

    def _track_views(self, name: str, views: dict) -> None:
        """Under the lock: counts the views of block `name` (from `_views_by_array`)."""
        for key, (array, nbytes) in views.items():
            viewed = self._viewed.setdefault(key, _ViewedArray(array))
            self._host_dead_bytes -= viewed.dead_bytes()
            viewed.views[name] = nbytes
            viewed.held += nbytes
            self._host_dead_bytes += viewed.dead_bytes()

    def _untrack_views(self, name: str, block: BlockKV) -> None:
        """Under the lock: block `name` left host memory. The other held blocks' views of
        the arrays it viewed are copied out, so that those arrays are freed (else
        evicting a view would free nothing)."""
        for key, (array, _) in _views_by_array(block).items():
            viewed = self._viewed.pop(key, None)
            if viewed is None:
                continue
            self._host_dead_bytes -= viewed.dead_bytes()
            for other in viewed.views:
                if other != name:
                    self._host[other] = _without_views_of(self._host[other], array)

    def _evict_host(self, entries) -> None:
        """Under the lock: forgets blocks evicted from the host tier."""
        for name, _ in entries:
            self._untrack_views(name, self._host.pop(name))
            self._forget_use(name)
        self._stats["host_evictions"] += len(entries)

    # ----- disk: paths, accounting, faults ----------------------------------------------

    def _path(self, relative_path: str) -> str:
        return os.path.join(self._root, relative_path)

    def _disk_bytes(self) -> int:
        """Under the lock: what the disk budget counts."""
        return self._disk_tier.used + DIRECTORY_BYTES * len(self._directory_files)

    def _hold_directories(self, entry) -> None:
        """Under the lock: an entry's file is about to exist; its directories count."""
        for directory in _directories(entry):
            self._directory_files[directory] += 1

    def _release_directories(self, entry) -> None:
        """Under the lock: an entry's file is gone; directories left without files of the
        store are removed and no longer count."""
        if not self._disk_enabled:
            return
        for directory in reversed(_directories(entry)):
            self._directory_files[directory] -= 1
            if self._directory_files[directory] <= 0:
                del self._directory_files[directory]
                self._remove_directory(directory)

    def _admit_disk(self, entry, nbytes: int) -> bool:
        """Under the lock: counts `entry`, a file of `nbytes` already durable on disk
        whose directories are held, evicting other groups in policy order. A file that
        cannot fit is deleted again. Returns whether the disk tier holds it."""
        if not self._disk_enabled:
            return False
        self._disk_tier.remove(entry)  # a file that grew or shrank is counted again
        capacity = self._disk_tier.capacity
        fits = (nbytes + DIRECTORY_BYTES * len(_directories(entry)) <= capacity
                and self._make_room(self._disk_tier, entry[0],
                                    lambda: self._disk_bytes() + nbytes > capacity,
                                    self._evict_disk))
        if fits:
            self._disk_tier.admit(entry, nbytes, last_used=self._last_used,
                                  upcoming=self._upcoming)
            return True
        log.info("disk tier: %s does not fit the disk budget",
                 self._path(_relative_path(entry)))
        self._delete_disk_file(entry)
        return False

    def _evict_disk(self, entries) -> None:
        """Under the lock: deletes the files of entries evicted from the disk tier."""
        for entry in entries:
            logs = entry[0].startswith(_LOG_GROUP)
            self._stats["disk_record_evictions" if logs else "disk_evictions"] += 1
            self._delete_disk_file(entry)

    def _delete_disk_file(self, entry) -> None:
        """Under the lock: forgets a disk tier entry and deletes its file."""
        self._delete_file(self._path(_relative_path(entry)))
        self._forget_disk_file(entry)

    def _forget_disk_file(self, entry) -> None:
        """Under the lock: forgets a disk tier entry whose file is gone."""
        self._disk_tier.remove(entry)
        if entry[0].startswith(_LOG_GROUP):
            self._logged.pop(entry[0][len(_LOG_GROUP):], None)
        self._release_directories(entry)
        self._forget_use(entry[0])

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

    def _remove_directory(self, directory: str) -> None:
        """Under the lock: removes a directory below the root once it is empty."""
        path = self._path(directory)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno == errno.ENOTEMPTY:  # junk
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
        self._directory_files.clear()
        self._logged.clear()
        self._last_used = {group: used for group, used in self._last_used.items()
                           if (group, 0) in self._host_tier}

    def _write_disk_file(self, entry, action: str, write) -> bool:
        """Store thread: `write(path)` puts the entry's file on disk and returns
        `(bytes written, file size)`; then the file counts in the disk budget (which may
        evict others). A failure is `action` in the log. Returns whether the disk tier
        holds the file."""
        with self._lock:
            if not self._disk_enabled:
                return False
            new = entry not in self._disk_tier
            if new:
                self._hold_directories(entry)
        path = self._path(_relative_path(entry))
        try:
            written, size = write(path)
        except OSError as error:
            with self._lock:
                self._disk_failed(action, path, error)
                if new:
                    self._release_directories(entry)
            return False
        with self._lock:
            self._stats["disk_bytes_written"] += written
            return self._admit_disk(entry, size)

    # ----- restart ---------------------------------------------------------------------

    def _scan_disk(self) -> None:
        """Under the lock, at start: indexes the files a previous process left (checked
        when read, not now), oldest first, deletes its temporaries and directories left
        empty, and skips and logs what it does not recognise. A root that cannot be
        created or listed disables the disk tier."""
        try:
            os.makedirs(self._root, exist_ok=True)
            with os.scandir(self._root) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError as error:
            self._disable_disk(self._root, f"cannot use the directory: {error.strerror}")
            return
        found, junk, directories = [], [], []
        for item in items:
            if item.name == BLOCKS_DIRECTORY and _is_directory(item):
                directories.append(item.name)
                junk += self._scan_blocks(item.path, found, directories)
            elif item.name == SESSIONS_DIRECTORY and _is_directory(item):
                directories.append(item.name)
                junk += self._scan_files(item.path, _scanned_log_entry, found)
            else:
                junk.append(item.path)
        for _, entry, size in sorted(found):
            self._mark_used(entry[0])
            self._hold_directories(entry)
            self._admit_disk(entry, size)
        for directory in reversed(directories):  # a fan-out directory before its parent
            if directory not in self._directory_files and self._disk_enabled:
                self._remove_directory(directory)
        self._stats["disk_junk_skipped"] += len(junk)
        for path in junk[:_JUNK_LOG_LINES]:
            log.warning("disk tier: skipping %r: not a file or directory the store writes",
                        path)  # %r: a name may hold anything, newlines included
        if len(junk) > _JUNK_LOG_LINES:
            log.warning("disk tier: skipping %d more unrecognised things under %s",
                        len(junk) - _JUNK_LOG_LINES, self._root)

    def _scan_blocks(self, path: str, found: list, directories: list) -> list[str]:
        """Indexes the block directory at start into `found` (and its fan-out directories
        into `directories`); returns the paths it skipped."""
        try:
            with os.scandir(path) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError:
            return [path]
        junk = []
        for item in items:
            if _FAN_OUT.fullmatch(item.name) and _is_directory(item):
                directories.append(os.path.join(BLOCKS_DIRECTORY, item.name))
                junk += self._scan_files(
                    item.path, functools.partial(_scanned_block_entry, item.name), found)
            else:
                junk.append(item.path)
        return junk

    def _scan_files(self, directory: str, entry_of, found: list) -> list[str]:
        """Indexes the files of one directory at start: each regular file whose name
        `entry_of(name)` turns into a tier entry goes to `found` as `(modification time,
        entry, size)`; temporaries are deleted. Returns the paths it skipped."""
        try:
            with os.scandir(directory) as listing:
                items = sorted(listing, key=lambda item: item.name)
        except OSError:
            return [directory]
        junk = []
        for item in items:
            try:
                status = item.stat(follow_symlinks=False)
            except OSError:
                junk.append(item.path)
                continue
            regular = stat.S_ISREG(status.st_mode)
            entry = entry_of(item.name) if regular else None
            if regular and item.name.startswith(".tmp-"):
                self._delete_leftover(item.path)
            elif entry is not None:
                found.append((status.st_mtime_ns, entry, status.st_size))
            else:
                junk.append(item.path)
        return junk

    def _delete_leftover(self, path: str) -> None:
        """Deletes a temporary file a killed writer left; a failure is only logged."""
        try:
            os.unlink(path)
        except OSError as error:
            log.warning("disk tier: cannot delete the leftover temporary %r: %s", path, error)

    # ----- blocks: lookup, loading, saving ----------------------------------------------

    def contains(self, block_key: bytes) -> str | None:
        """The fastest tier that holds the block, "host" or "disk", or None. Loads
        nothing and counts nothing (a copy on disk is checked only when read)."""
        name, _ = _block_entry(block_key)
        with self._lock:
            held = self._tiers_of(name)
        return held[0] if held else None

    def get(self, block_key: bytes) -> tuple[BlockKV, str] | None:
        """The block and the tier it came from ("host" or "disk"), or None if no tier
        holds a good copy. A disk copy is checked (checksum, model fingerprint, and the
        block key in its header: a file of another block filed under this key's name is
        stale) and taken into host memory; one that fails is dropped, counted
        (`corrupt_entries`, `stale_entries`) and logged. Counts a hit or a miss."""
        name, _ = _block_entry(block_key)
        with self._lock:
            held = self._host.get(name)
            if held is not None:
                self._mark_used(name)
                self._count_hit("host", held.nbytes)
                return held, "host"
            if not self._disk_tier_holds(name):
                self._stats["misses"] += 1
                return None
        found = self._read_disk(name)
        with self._lock:
            if found is None:
                self._stats["misses"] += 1
                return None
            self._count_hit("disk", found.nbytes)
            self._mark_used(name)
            if name not in self._host:
                self._admit_host(name, found)
            self._forget_use(name)
        return found, "disk"

    def _read_disk(self, name: str) -> BlockKV | None:
        """The disk copy of block `name`, or None after dropping a copy that fails its
        checks."""
        entry = (name, 0)
        path = self._path(_relative_path(entry))
        try:
            arrays, meta = disk_entry.read(path, fingerprint=self.fingerprint)
            if set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("not a KV block")
            block_key = meta.get("block_key")
            if not isinstance(block_key, str) or not _HEX_KEY.fullmatch(block_key):
                raise disk_entry.CorruptEntry("no block key in its header")
        except disk_entry.CorruptEntry as error:
            self._drop_disk_copy(entry, "corrupt_entries", str(error))
            return None
        if block_key != name:
            self._drop_disk_copy(entry, "stale_entries", f"its header names block {block_key}")
            return None
        return BlockKV(arrays["k"], arrays["v"])

    def _drop_disk_copy(self, entry, counter: str, reason: str) -> None:
        """Deletes a block file that failed a check for `reason`, counting it under
        `counter`; one that the disk tier no longer holds (evicted while it was read) is
        left alone."""
        with self._lock:
            if entry in self._disk_tier:
                log.warning("dropping KV block %s from disk: %s",
                            self._path(_relative_path(entry)), reason)
                self._stats[counter] += 1
                self._delete_disk_file(entry)

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

    def save(self, block_key: bytes, produce) -> concurrent.futures.Future:
        """Files a block under its key without blocking the caller.

        `produce()` runs on the store's thread and returns the `BlockKV` (for example by
        waiting for a device-to-host copy the caller already started); it is called
        only when host memory does not hold the key. Saving a held key is cheap and
        idempotent: when host memory holds it, and so does the disk (or there is no disk
        tier), the future is resolved at once, nothing is queued (`saves_skipped_held`);
        a block on disk is never written again. The future resolves to the tiers that
        hold the block afterwards ("host", "disk"); a disk write that fails is left out
        of them (logged and counted), never raised.
        """
        name, _ = _block_entry(block_key)
        with self._lock:
            if name in self._host and (self._disk_tier_holds(name) or not self._disk_enabled):
                self._stats["saves_skipped_held"] += 1
                self._mark_used(name)
                return _resolved(self._tiers_of(name))
        future = self._executor.submit(self._save, name, produce)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.error("a store write failed: %s", future.exception())

    def _save(self, name: str, produce) -> tuple[str, ...]:
        """Store thread: takes the block into host memory (from `produce` unless held)
        and writes its file unless the disk holds it."""
        start = time.perf_counter()
        with self._lock:
            block = self._host.get(name)
            disk_done = self._disk_tier_holds(name) or not self._disk_enabled
            if block is not None:
                self._mark_used(name)
                if disk_done:  # saved since this save was queued
                    self._stats["saves_skipped_held"] += 1
                    return self._tiers_of(name)
        if block is None:
            block = produce()
            with self._lock:
                self._mark_used(name)
                if name not in self._host:
                    self._admit_host(name, block)
        if not disk_done:
            self._write_block(name, block)
        with self._lock:
            self._forget_use(name)
            self._stats["saves"] += 1
            self._stats["save_seconds"] += time.perf_counter() - start
            return self._tiers_of(name)

    def _write_block(self, name: str, block: BlockKV) -> bool:
        """Store thread: writes a block's file, then counts it in the disk budget (which
        may evict others). Returns whether the disk tier holds it."""
        entry = (name, 0)
        room = self.config.disk_bytes - DIRECTORY_BYTES * len(_directories(entry))
        if block.nbytes > room:
            return False  # could never fit: not worth encoding
        data = disk_entry.encode({"k": block.k, "v": block.v}, fingerprint=self.fingerprint,
                                 meta={"block_key": name})
        if len(data) > room:
            return False

        def write(path):
            disk_entry.write_atomic(path, data)
            return len(data), len(data)

        return self._write_disk_file(entry, "writing a KV block", write)

    # ----- scheduler hints and use ------------------------------------------------------

    def hint(self, upcoming_block_keys) -> concurrent.futures.Future:
        """The block keys the scheduler's next requests will read, most imminent first
        (the caller cuts the list to its look-ahead). Until the next hint, eviction
        keeps these longest, the most imminent last. Those only on disk are read into
        host memory in the background, most imminent first, while they fit beside the
        more imminent ones. Returns the future of that prefetch, which resolves to how
        many blocks it read (a prefetch not yet started reads the latest hint)."""
        names = [_block_entry(block_key)[0] for block_key in upcoming_block_keys]
        with self._lock:
            self._upcoming = names
            if self._queued_prefetch is None:
                self._queued_prefetch = self._executor.submit(self._prefetch)
            return self._queued_prefetch

    def _prefetch(self) -> int:
        """Store thread: reads the hinted blocks that only the disk holds into host
        memory, in order, up to the first that does not fit beside the hinted blocks
        before it. Returns how many it read."""
        with self._lock:
            self._queued_prefetch = None
            names = list(dict.fromkeys(self._upcoming))
        room, fetched = self.config.host_bytes, 0
        for name in names:
            with self._lock:
                held = self._host.get(name)
                on_disk = self._disk_tier_holds(name)
            if held is not None:
                room -= held.nbytes
                continue
            found = self._read_disk(name) if on_disk else None
            if found is None:
                continue
            if found.nbytes > room:
                break
            with self._lock:
                if name not in self._host and self._admit_host(name, found):
                    fetched += 1
                    room -= found.nbytes
                    self._stats["prefetched_blocks"] += 1
        return fetched

    def touch(self, block_keys) -> None:
        """Marks the held blocks among `block_keys` as just used (for least-recently-used
        eviction)."""
        names = [_block_entry(block_key)[0] for block_key in block_keys]
        with self._lock:
            for name in names:
                if self._tiers_of(name):
                    self._mark_used(name)

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
            if not self._disk_enabled:
                return _resolved(True)
            self._mark_used(_log_entry(key)[0])
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
        entry = _log_entry(key)
        with self._lock:
            if not self._disk_enabled:
                return True
            if self._records.get(key) is not entries:
                return False  # dropped since (a drop runs on this thread: not meanwhile)
            appending = self._logged.get(key) == index
            old_size = self._disk_tier.sizes.get(entry, 0)
            upto = entries[:index + 1]

        def write(path):
            if appending:
                try:
                    disk_entry.append(path, frame)
                    return len(frame), old_size + len(frame)
                except FileNotFoundError:  # deleted behind the store's back
                    pass
            data = self._encode_log(session_id, upto)
            disk_entry.write_atomic(path, data)
            return len(data), len(data)

        # On failure `_logged` stays short of `index`: the next entry is a rewrite.
        if not self._write_disk_file(entry, "writing the record log", write):
            self._forget_log_use(key)
            return False
        with self._lock:
            self._logged[key] = index + 1
            return True

    def _forget_log_use(self, key: str) -> None:
        with self._lock:
            self._forget_use(_log_entry(key)[0])

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
            if _log_entry(key) in self._disk_tier:
                self._mark_used(_log_entry(key)[0])
            return list(entries)

    def _read_record(self, key: str, session_id: str) -> list | None:
        """Under the lock: the entries of the session's disk log, or None."""
        entry = _log_entry(key)
        if not self._disk_enabled or entry not in self._disk_tier:
            return None
        path = self._path(_relative_path(entry))
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
            log.warning("dropping the record log %s: it has no good header and entry "
                        "(damaged, another format or another model)", path)
            self._stats["corrupt_entries"] += 1
            self._delete_disk_file(entry)
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
            if not self._admit_disk(entry, good_length):
                return entries
        self._logged[key] = len(entries)
        return entries

    # ----- dropping, flushing, stats ---------------------------------------------------

    def drop(self, session_id: str) -> None:
        """Forgets a session's record, in memory and on disk, after the saves and appends
        submitted before; returns once done (so not to be called from a callback of this
        store's futures, which run on its thread). The blocks the session saved stay:
        they are a cache by content that other requests may share, and leave by eviction
        like any other block. Never raises for a disk fault (see `_drop`)."""
        self._executor.submit(self._drop, session_key(session_id)).result()

    def _drop(self, key: str) -> None:
        """Store thread: forgets a session's record in memory, then deletes its log.
        Deleting the log is the commit point: a log that cannot be deleted disables the
        disk tier (the record is forgotten in memory all the same)."""
        entry = _log_entry(key)
        with self._lock:
            self._records.pop(key, None)
            if not self._disk_enabled:
                return
            path = self._path(_relative_path(entry))
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as error:
                self._stats["disk_write_errors"] += 1
                self._disable_disk(path, "cannot delete the record log of a dropped "
                                   f"session: {error.strerror}")
                return
            if entry in self._disk_tier:
                self._forget_disk_file(entry)
            else:
                self._last_used.pop(entry[0], None)

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
        was cut off."""
        with self._lock:
            stats = {name: self._stats[name] for name in (
                "hbm_hits", "host_hits", "disk_hits", "misses", "hbm_bytes_loaded",
                "host_bytes_loaded", "disk_bytes_loaded", "host_evictions", "disk_evictions",
                "disk_record_evictions", "prefetched_blocks", "corrupt_entries",
                "stale_entries", "saves", "saves_skipped_held", "save_seconds",
                "disk_bytes_written", "disk_write_errors", "disk_junk_skipped",
                "torn_record_logs", "layerwise_loads", "load_seconds", "load_stall_seconds",
                "load_hidden_seconds")}
            disk_records = sum(1 for group, _ in self._disk_tier.sizes
                               if group.startswith(_LOG_GROUP))
            stats.update(host_bytes=self._host_bytes(), disk_bytes=self._disk_bytes(),
                         host_blocks=len(self._host),
                         disk_blocks=len(self._disk_tier.sizes) - disk_records,
                         disk_records=disk_records,
                         disk_tier_enabled=int(self._disk_enabled),
                         sessions=len(self._records))
        return stats


def _scanned_block_entry(fan_out: str, name: str) -> tuple[str, int] | None:
    """The tier entry of a block file named `name` in the fan-out directory `fan_out`, or
    None if that is not where the store files it."""
    match = _BLOCK_FILE.fullmatch(name)
    return (match[1], 0) if match and match[1][:2] == fan_out else None


def _scanned_log_entry(name: str) -> tuple[str, int] | None:
    """The tier entry of a record log file named `name`, or None if it is not one."""
    match = _LOG_FILE.fullmatch(name)
    return _log_entry(match[1]) if match else None


def _is_directory(item: os.DirEntry) -> bool:
    """Whether a scanned item is a directory itself (a link to one is not)."""
    try:
        return item.is_dir(follow_symlinks=False)
    except OSError:
        return False
