"""The store's files on local disk: their layout, one byte budget over all of them,
eviction, atomic writes, faults, and the index a restarted process builds.

Under the root `<disk_path>/<first 16 characters of the model fingerprint>/`:

    blocks/<k[:2]>/<k>.kv   the KV block whose key is `k` (32 hex digits; `DiskTier`)
    sessions/<s>.log        the record log of the session whose key is `s` (a hash of
                            its id; `SessionRecords`)
    .tmp-*                  a file being written, beside its final name (a killed
                            writer's, at start)

Files are named by their path relative to the root. A directory exists while it holds a
file of the store: the last file to leave takes it along. The budget counts every byte
the store keeps there: files at their size, and each directory below the root as
`DIRECTORY_BYTES` (the root is not counted). Every file is evicted as a whole, blocks and
logs in one order (`placement.Placement`: hinted files last, then least recently used).
A file counts once it is durable, and only then are others evicted to make room for it,
so that a write that fails evicts nothing; while one file is being written, the disk may
hold up to that file's size and the directories it needs beyond the budget.

At start the root is indexed without reading the files (their owners check them when
read), oldest first, as if used in the order they were last written: leftover
temporaries are deleted, and whatever else is not a file or directory of the layout
(files of other layouts included) is skipped, logged and counted (`disk_junk_skipped`).

Faults never raise. A failed write or deletion is logged and counted
(`disk_write_errors`) and leaves what was durable before. A disk that cannot be written
(EROFS, EACCES, EPERM; a root that cannot be created or listed at start) disables the
files for the life of the process, with one log line `disk tier disabled: <path>:
<reason>` (`disk_tier_enabled` goes to 0): from then on nothing is held or written.
Running out of space (ENOSPC) does not disable them: space may come back.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Callable

from jattn.store.placement import Placement

log = logging.getLogger("jattn.store")

DIRECTORY_BYTES = 4096  # what a directory counts in the budget: one fs block
BLOCKS_DIRECTORY = "blocks"
SESSIONS_DIRECTORY = "sessions"
# The layout, as paths relative to the root.
_DIRECTORY = re.compile(r"blocks|blocks/[0-9a-f]{2}|sessions")
_FILE_DIRECTORY = re.compile(r"blocks/[0-9a-f]{2}|sessions")  # where temporaries are made
_FILE = re.compile(r"blocks/([0-9a-f]{2})/\1[0-9a-f]{30}\.kv|sessions/[0-9a-f]{32}\.log")
_UNWRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
_JUNK_LOG_LINES = 10  # one warning per unrecognised thing up to this many, then a summary


def block_file(key: bytes) -> str:
    """The file of the block whose key is `key`, relative to the root."""
    name = key.hex()
    return f"{BLOCKS_DIRECTORY}/{name[:2]}/{name}.kv"


def log_file(session_key: str) -> str:
    """The record log of the session whose key is `session_key`, relative to the root."""
    return f"{SESSIONS_DIRECTORY}/{session_key}.log"


def _directories(relative: str) -> list[str]:
    """The directories below the root that hold a file, outermost first."""
    parts = relative.split("/")[:-1]
    return ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _top(relative: str) -> str:
    return relative.split("/", 1)[0]


class DiskFiles:
    """The files of the layout under `root`, within `capacity` bytes (see the module
    docstring). Files are named by their relative path (`block_file`, `log_file`).
    Safe to call from any thread."""

    def __init__(self, root: str, capacity: int):
        self.root = root
        self.capacity = capacity
        self._lock = threading.Lock()
        self._enabled = True
        self._placement = Placement(capacity)
        # Directories below the root -> how many files the index knows under them (held,
        # or being written); the budget counts the ones listed.
        self._directory_files: collections.Counter[str] = collections.Counter()
        self._evictions: collections.Counter[str] = collections.Counter()  # by top directory
        self._stats = collections.Counter()
        self._failing: set[tuple[str, int]] = set()  # (action, errno) logged since a success
        with self._lock:
            self._scan()

    @property
    def enabled(self) -> bool:
        return self._enabled

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def __contains__(self, relative: str) -> bool:
        with self._lock:
            return relative in self._placement

    def size_of(self, relative: str) -> int | None:
        """The size of a held file, or None."""
        with self._lock:
            return self._placement.size_of(relative)

    def files(self, directory: str) -> list[str]:
        """The held files under the top directory `directory`."""
        with self._lock:
            return [f for f in self._placement.keys() if _top(f) == directory]

    @property
    def used(self) -> int:
        """What the budget counts: files and directories."""
        with self._lock:
            return self._used()

    def room_for(self, relative: str) -> int:
        """The largest file that could fit at `relative` (the budget less its
        directories)."""
        return self.capacity - DIRECTORY_BYTES * len(_directories(relative))

    def evictions(self, directory: str) -> int:
        """How many files under the top directory `directory` were evicted."""
        with self._lock:
            return self._evictions[directory]

    def touch(self, relative: str) -> None:
        with self._lock:
            self._placement.touch(relative)

    def hint(self, upcoming: list[str]) -> None:
        with self._lock:
            self._placement.hint(upcoming)

    def write(self, relative: str, action: str,
              write: Callable[[str], tuple[int, int]]) -> bool:
        """`write(path)` puts the file on disk (atomically, or by an append) and returns
        `(bytes written, file size)`; then the file counts in the budget, which may evict
        others. A failure is logged as `action`. Returns whether the file is held."""
        with self._lock:
            if not self._enabled:
                return False
            new = relative not in self._placement
            if new:
                self._hold_directories(relative)
        path = self.path(relative)
        try:
            written, size = write(path)
        except OSError as error:
            with self._lock:
                self._failed(action, path, error)
                if new:
                    self._release_directories(relative)
            return False
        with self._lock:
            self._stats["disk_bytes_written"] += written
            self._failing.clear()  # a write got through: the next failure is news
            return self._admit(relative, size)

    def resized(self, relative: str, nbytes: int) -> bool:
        """A held file is now `nbytes` long: counts it again (which may evict others,
        or delete it if it no longer fits). Returns whether it is held."""
        with self._lock:
            return self._admit(relative, nbytes)

    def delete(self, relative: str) -> bool:
        """Deletes a held file; returns whether it was held (one that is not is left
        alone: it may be a write in flight)."""
        with self._lock:
            held = relative in self._placement
            if held:
                self._delete(relative)
            return held

    def delete_or_disable(self, relative: str, reason: str) -> None:
        """Deletes a file whether held or not, as a commit point: any failure to delete
        it disables the files (`disk tier disabled: <path>: <reason>: <error>`)."""
        with self._lock:
            if not self._enabled:
                return
            path = self.path(relative)
            error = _unlink(path)
            if error is not None:
                self._stats["disk_write_errors"] += 1
                self._disable(path, f"{reason}: {error.strerror}")
                return
            if relative in self._placement:
                self._forget(relative)

    def failed(self, action: str, path: str, error: OSError) -> None:
        """Counts and logs a change on disk that failed; one that says the disk cannot
        be written disables the files."""
        with self._lock:
            self._failed(action, path, error)

    def stats(self) -> dict[str, int]:
        """Bytes as the budget counts them, bytes written, failed writes and deletions,
        junk skipped at start, whether the files are enabled."""
        with self._lock:
            return {"disk_bytes": self._used(), "disk_tier_enabled": int(self._enabled),
                    **{name: self._stats[name] for name in (
                        "disk_bytes_written", "disk_write_errors", "disk_junk_skipped")}}

    # ----- under the lock: accounting -----------------------------------------------------

    def _used(self) -> int:
        return self._placement.used + DIRECTORY_BYTES * len(self._directory_files)

    def _admit(self, relative: str, nbytes: int) -> bool:
        """Counts `relative`, a file of `nbytes` already durable whose directories are
        held, evicting others in policy order. A file that cannot fit is deleted again.
        Returns whether it is held."""
        if not self._enabled:
            return False
        self._placement.remove(relative)  # a file that grew or shrank is counted again
        fits = (nbytes <= self.room_for(relative)
                and self._placement.make_room(
                    relative, lambda: self._used() + nbytes <= self.capacity, self._evict))
        if fits:
            self._placement.admit(relative, nbytes)
            return True
        log.info("disk tier: %s does not fit the disk budget", self.path(relative))
        self._delete(relative)
        return False

    def _evict(self, relative: str) -> None:
        self._evictions[_top(relative)] += 1
        self._delete(relative)

    def _delete(self, relative: str) -> None:
        """Deletes a file (one already gone is fine) and forgets it."""
        if self._enabled:
            path = self.path(relative)
            error = _unlink(path)
            if error is not None:
                self._failed("deleting", path, error)
        self._forget(relative)

    def _forget(self, relative: str) -> None:
        """Forgets a file that is gone."""
        self._placement.remove(relative)
        self._release_directories(relative)

    def _hold_directories(self, relative: str) -> None:
        """A file is about to exist; its directories count."""
        for directory in _directories(relative):
            self._directory_files[directory] += 1

    def _release_directories(self, relative: str) -> None:
        """A file is gone; directories left without files of the store are removed and
        no longer count."""
        if not self._enabled:
            return
        for directory in reversed(_directories(relative)):
            self._directory_files[directory] -= 1
            if self._directory_files[directory] <= 0:
                del self._directory_files[directory]
                self._remove_directory(directory)

    def _remove_directory(self, directory: str) -> None:
        """Removes a directory below the root once it is empty."""
        path = self.path(directory)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            if error.errno == errno.ENOTEMPTY:  # junk
                log.info("disk tier: keeping %s: it is not empty", path)
            else:
                self._failed("removing the directory", path, error)

    # ----- under the lock: faults ---------------------------------------------------------

    def _failed(self, action: str, path: str, error: OSError) -> None:
        """Counts a failed change; logs it the first time since a write got through that
        `action` fails with its errno (a failing disk fails every block the same way)."""
        self._stats["disk_write_errors"] += 1
        if error.errno in _UNWRITABLE:
            self._disable(path, f"{action}: {error.strerror}")
        elif (action, error.errno) not in self._failing:
            self._failing.add((action, error.errno))
            log.warning("disk tier: %s %s failed: %s (further failures like it are counted "
                        "in disk_write_errors, not logged, until a write succeeds)",
                        action, path, error)

    def _disable(self, path: str, reason: str) -> None:
        """Stops using the disk for the life of the process."""
        if not self._enabled:
            return
        log.error("disk tier disabled: %s: %s", path, reason)
        self._enabled = False
        self._placement = Placement(self.capacity)
        self._directory_files.clear()

    # ----- under the lock: the index at start ---------------------------------------------

    def _scan(self) -> None:
        """Indexes the files a previous process left, oldest first, deletes its
        temporaries and the directories left empty, and skips and logs what is not of
        the layout. A root that cannot be created or listed disables the files."""
        try:
            os.makedirs(self.root, exist_ok=True)
            items = _listing(self.root)
        except OSError as error:
            self._disable(self.root, f"cannot use the directory: {error.strerror}")
            return
        found, junk, directories = [], [], []
        self._scan_directory("", items, found, junk, directories)
        for _, relative, size in sorted(found):
            self._hold_directories(relative)
            self._admit(relative, size)
        for directory in reversed(directories):  # a fan-out directory before its parent
            if directory not in self._directory_files and self._enabled:
                self._remove_directory(directory)
        self._stats["disk_junk_skipped"] += len(junk)
        for path in junk[:_JUNK_LOG_LINES]:
            log.warning("disk tier: skipping %r: not a file or directory the store writes",
                        path)  # %r: a name may hold anything, newlines included
        if len(junk) > _JUNK_LOG_LINES:
            log.warning("disk tier: skipping %d more unrecognised things under %s",
                        len(junk) - _JUNK_LOG_LINES, self.root)

    def _scan_directory(self, directory: str, items: list[os.DirEntry], found: list,
                        junk: list, directories: list) -> None:
        """Indexes the `items` of one directory of the layout (relative; "" is the root)
        and the directories of the layout among them: files go to `found` as
        `(modification time, relative path, size)`, directories to `directories`, what
        is skipped to `junk` (paths)."""
        for item in items:
            relative = f"{directory}/{item.name}" if directory else item.name
            if _is_directory(item) and _DIRECTORY.fullmatch(relative):
                try:
                    children = _listing(item.path)
                except OSError:
                    junk.append(item.path)
                    continue
                directories.append(relative)
                self._scan_directory(relative, children, found, junk, directories)
                continue
            try:
                status = item.stat(follow_symlinks=False)
            except OSError:
                junk.append(item.path)
                continue
            regular = stat.S_ISREG(status.st_mode)
            if regular and item.name.startswith(".tmp-") and _FILE_DIRECTORY.fullmatch(directory):
                _delete_leftover(item.path)
            elif regular and _FILE.fullmatch(relative):
                found.append((status.st_mtime_ns, relative, status.st_size))
            else:
                junk.append(item.path)


def _listing(path: str) -> list[os.DirEntry]:
    """The items of a directory, by name."""
    with os.scandir(path) as listing:
        return sorted(listing, key=lambda item: item.name)


def _is_directory(item: os.DirEntry) -> bool:
    """Whether a scanned item is a directory itself (a link to one is not)."""
    try:
        return item.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _delete_leftover(path: str) -> None:
    """Deletes a temporary file a killed writer left; a failure is only logged."""
    try:
        os.unlink(path)
    except OSError as error:
        log.warning("disk tier: cannot delete the leftover temporary %r: %s", path, error)


def _unlink(path: str) -> OSError | None:
    """Deletes `path` (one already gone is fine); the error if that failed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        return error
    return None
