"""Session records: each session's list of JSON-able entries (one per turn), in memory
and, with a disk, as a log in the store's `DiskFiles`.

A log is not a block, so it is not in the disk tier; but it shares the disk's budget
and eviction order with the block files (one `DiskFiles`): the budget counts every byte
on disk, and a log goes least recently used first among blocks and logs alike.

The log of a session (`sessions/<s>.log`, `s = session_key(id)`: a hash, never the id
itself) is a sequence of `disk_entry` frames: the first names the log format, the model
fingerprint and the session id, then one per entry. An entry is appended as one frame
and an fsync, so a turn's append costs that turn's entry, not the history; a log that is
missing (evicted) or that a failed append left in doubt is written whole instead,
atomically. A crash mid-append leaves a torn last frame: reading stops at the first torn
or damaged frame and cuts the file back to the frames before it (`torn_record_logs`). A
log with no good header is dropped (`corrupt_entries`); one whose header names another
session is not believed. A restarted process does not find a session whose log was
evicted; while the process lives its record stays in memory.

With a tier shared by replicas (Redis), the record there is the session's history for
all of them. Each entry carries `chain`, a digest of the history up to it, and each
replica remembers how many entries of the shared record it last saw and their digest.
A turn first checks the shared record against that (one call): a record that is
missing, junk, shorter, or not the history this replica saw means turns are lost that
no replica can know it holds in full, so the session is lost (`SessionLost`, and the
record is replaced with a marker saying so, for every replica) rather than continued
from less; a shared record that cannot be read at all is `RecordUnavailable`.

With a store key (`secret`), "chain" is a keyed BLAKE2b MAC of the history: a record or
log whose entries do not carry the chain the key gives them (written without the key,
or altered) is junk, so no one without the key can add to a session's history.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import json
import logging
import os
import threading
from collections.abc import Callable

from jattn.store import disk_entry
from jattn.store.disk_files import SESSIONS_DIRECTORY, DiskFiles, log_file
from jattn.store.remote_tier import JunkRecord, RemoteTier

log = logging.getLogger("jattn.store")

LOG_FORMAT_VERSION = 1


def session_key(session_id: str) -> str:
    """The name a session goes by on disk and in indexes: a hash, not the raw id."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


class SessionLost(Exception):
    """The session's record in the tier shared by replicas is gone, junk, or not the
    history this replica saw: no replica can know it holds the history in full, so the
    session takes no more turns (end it, and start another)."""


class RecordUnavailable(Exception):
    """The tier shared by replicas cannot be reached to check the session's record
    (another replica may have run turns of it since): try again."""


def chain_digest(previous: str, entry: dict, secret: bytes | None = None) -> str:
    """The digest of a history whose last entry is `entry` (its "chain" left out),
    after the history whose digest is `previous` (before a session's first entry: its
    `session_key`), keyed by the store key `secret` when there is one."""
    body = json.dumps({name: value for name, value in entry.items() if name != "chain"},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(f"{previous}:{body}".encode(), digest_size=16,
                           key=secret or b"").hexdigest()


def chained(key: str, entries: list, secret: bytes | None = None) -> list:
    """Copies of `entries` (session `key`'s, in order) whose "chain" is their history's
    digest (keyed by `secret`), computed from their content (whatever "chain" they
    carried)."""
    digest, result = key, []
    for entry in entries:
        digest = chain_digest(digest, entry, secret)
        result.append({**entry, "chain": digest})
    return result


class SessionRecords:
    """The records of sessions, logged in `files` (None: in memory only) for the model
    `fingerprint`, their chains keyed by the store key `secret` (None: unkeyed). Safe to
    call from any thread; the writes that `append` returns run on one thread, in the
    order they were returned."""

    def __init__(self, files: DiskFiles | None, *, fingerprint: str,
                 remote: RemoteTier | None = None, secret: bytes | None = None):
        self._files = files
        self._remote = remote
        self._secret = secret
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._records: dict[str, list] = {}  # session key -> entries
        # Sessions whose log holds exactly their first n entries, whole: entry n can be
        # appended. Any other entry is written with the whole log (after a failed append
        # n stays put, so the next entry rewrites the log, torn tail and all).
        self._logged: dict[str, int] = {}
        self._remote_logged: dict[str, int] = {}  # the same, of the remote tier's lists
        # (entries, digest) of the shared record as this replica last saw or wrote it.
        self._shared: dict[str, tuple[int, str]] = {}
        self._stats = collections.Counter()

    @property
    def shared(self) -> bool:
        return self._remote is not None

    def append(self, session_id: str, entry: dict) -> Callable[[], bool] | None:
        """Appends `entry` (JSON-able; not to be mutated afterwards) to the session's
        record, after its earlier entries (read from its log first when this process
        has not seen the session yet). Raises ValueError, changing nothing, if it is not
        JSON-able.

        Returns the write that makes it durable in the session's log, or None when there
        is no disk to write it to. The write returns True once the entry is on disk,
        False if it did not get there: its write failed (logged and counted), the disk
        tier is disabled (read-only, failing), the log no longer fits the budget, or the
        session was dropped first."""
        key = session_key(session_id)
        with self._lock:
            entries = self._records.get(key)
            if entries is None:
                # (a shared record was brought into memory by `refresh` before the turn)
                entries = self._read_disk(key, session_id) or []
            try:
                entry = {**entry, "chain": chain_digest(
                    entries[-1]["chain"] if entries else key, entry, self._secret)}
                frame = disk_entry.encode_frame(entry)
            except (TypeError, ValueError) as error:
                raise ValueError(f"a record entry must be JSON-able: {error}") from None
            self._records[key] = entries
            entries.append(entry)
            writes = []
            if self._files is not None:  # (disabled: read-only or failing, so not durable)
                if self._files.enabled:
                    self._files.touch(log_file(key))
                writes.append(functools.partial(self._write, key, session_id, entries,
                                                len(entries) - 1, frame))
            if self._remote is not None:
                writes.append(functools.partial(self._write_remote, key, session_id,
                                                entries, len(entries) - 1, frame))
        if not writes:
            return None
        return lambda: all([write() for write in writes])

    def get(self, session_id: str, *, check_remote: bool = True) -> list | None:
        """The session's entries in order (copies, as appended), from memory or (after a
        restart) from its log, or None if neither has it. With `check_remote` it is first
        brought up to date with the remote tier's (`refresh`, which calls Redis, and
        raises `SessionLost` or `RecordUnavailable`); without, the remote tier is not
        asked."""
        if check_remote:
            self.refresh(session_id)
        key = session_key(session_id)
        with self._lock:
            entries = self._records.get(key)
            if entries is None:
                entries = self._read_disk(key, session_id)
                if entries is None:
                    return None
                self._records[key] = entries
            if self._files is not None:
                self._files.touch(log_file(key))
            return [{name: value for name, value in entry.items() if name != "chain"}
                    for entry in entries]

    def refresh(self, session_id: str) -> None:
        """Checks the session's record in memory against the remote tier's and brings it
        up to date: reads it from there if it is longer (other replicas ran turns since)
        or known only there. `SessionLost` if the shared record is missing, junk, shorter
        or other than the history this replica last saw there; `RecordUnavailable` if it
        cannot be read. Redis is called without holding the lock, so `get` never waits
        on it."""
        if self._remote is None:
            return
        key = session_key(session_id)
        with self._lock:
            if key not in self._records:
                entries = self._read_disk(key, session_id)
                if entries is not None:
                    self._records[key] = entries
            shared = self._shared.get(key)
        try:
            state = self._remote.record_state(key, shared[0] if shared else 0)
        except JunkRecord:
            self._lose(key, session_id, "its record's key holds junk")
        if state is None:
            raise RecordUnavailable(f"session {session_id!r}: the shared store is unreachable, "
                                    f"so whether other replicas ran turns of it is unknown")
        length, frame = state
        if shared is None:
            if length == 0:
                return  # not in the shared tier yet: new, or written whole at the next turn
        else:
            chain = _frame_chain(frame)  # None: an entry written before entries had one
            if length <= shared[0] or chain not in (None, shared[1]):
                self._lose(key, session_id, "its shared record is missing, shorter, or not "
                           "the history this replica saw there")
            if chain is not None and length - 1 == shared[0]:
                return  # as this replica last saw it
        self._adopt_shared(key, session_id)

    def _adopt_shared(self, key: str, session_id: str) -> None:
        """Reads the session's shared record and takes it if it is longer than what this
        replica saw there (or, never having seen it there, than the record in memory);
        `SessionLost` unless it extends what this replica saw there (or agrees with the
        entries this replica holds)."""
        try:
            data = self._remote.frames(key)
        except JunkRecord:
            data = b"junk"
        if data is None:
            raise RecordUnavailable(f"session {session_id!r}: the shared store is unreachable")
        with self._lock:
            remote = self._remote_entries(data, key, session_id)
            current = self._records.get(key) or []
            if remote is not None and self._agrees(key, remote, current):
                # Entries past what this replica saw there are its own, not yet written
                # there: other replicas' turns since then stand instead.
                seen = self._shared.get(key, (len(current),))[0]
                self._shared[key] = (len(remote), remote[-1]["chain"])
                if len(remote) > seen:
                    self._records[key] = remote
                return
        self._lose(key, session_id, "its shared record is junk, or not the history this "
                   "replica saw there")

    def _agrees(self, key: str, remote: list, current: list) -> bool:
        """Under the lock: whether the shared record's entries `remote` (chained from
        their content) extend what this replica last saw there, or if it never saw it,
        agree with `current`, the entries it holds, as far as both go."""
        seen, digest = self._shared.get(key, (None, None))
        if seen is None:
            common = min(len(remote), len(current))
            return common == 0 or remote[common - 1]["chain"] == \
                chained(key, current[:common], self._secret)[-1]["chain"]
        return 0 < seen <= len(remote) and remote[seen - 1]["chain"] == digest

    def _lose(self, key: str, session_id: str, why: str):
        """Marks the session lost for every replica (its shared record becomes a header
        saying so), counts it and raises `SessionLost`."""
        log.warning("session %r is lost: %s", session_id, why)
        with self._lock:
            self._stats["lost_sessions"] += 1
            self._shared.setdefault(key, (0, ""))  # this replica refuses it from now on
        self._remote.replace_record(key, [self._header(session_id, lost=True)])
        raise SessionLost(f"session {session_id!r} is lost: {why}; some of its turns may be "
                          f"gone, so it takes no more (end it and start another)")

    def drop(self, session_id: str) -> None:
        """Forgets the session's record in memory, then deletes its log (and its copy
        on the remote tier). Deleting the log is the commit point: a log that cannot be
        deleted disables the disk (the record is forgotten in memory all the same)."""
        key = session_key(session_id)
        if self._remote is not None:
            self._remote.delete_record(key)
        with self._lock:
            self._records.pop(key, None)
            self._logged.pop(key, None)
            self._remote_logged.pop(key, None)
            self._shared.pop(key, None)
            if self._files is not None:
                self._files.delete_or_disable(
                    log_file(key), "cannot delete the record log of a dropped session")

    def stats(self) -> dict[str, int]:
        """Sessions in memory, logs on disk and evicted from it, logs dropped as corrupt,
        logs whose torn tail was cut off, and remote record writes that found another
        replica's turns there first."""
        with self._lock:
            stats = {"sessions": len(self._records),
                     "corrupt_entries": self._stats["corrupt_entries"],
                     "torn_record_logs": self._stats["torn_record_logs"],
                     "remote_record_conflicts": self._stats["remote_record_conflicts"],
                     "lost_sessions": self._stats["lost_sessions"]}
        if self._files is not None:
            stats.update(disk_records=len(self._files.files(SESSIONS_DIRECTORY)),
                         disk_record_evictions=self._files.evictions(SESSIONS_DIRECTORY))
        return stats

    def _write(self, key: str, session_id: str, entries: list, index: int,
               frame: bytes) -> bool:
        """Makes `entries[:index + 1]` durable in the session's log, by appending `frame`
        (entry `index`) when the log holds exactly the entries before it, else by
        writing the log whole."""
        relative = log_file(key)
        with self._lock:
            if not self._files.enabled:
                return False
            if self._records.get(key) is not entries:
                return False  # dropped since
            old_size = self._files.size_of(relative)
            appending = self._logged.get(key) == index and old_size is not None
            upto = entries[:index + 1]

        def write(path):
            if appending:
                try:
                    disk_entry.append(path, frame)
                    return len(frame), old_size + len(frame)
                except FileNotFoundError:  # deleted behind the store's back
                    pass
            data = self._encode(session_id, upto)
            disk_entry.write_atomic(path, data)
            return len(data), len(data)

        # On failure `_logged` stays short of `index`: the next entry is a rewrite.
        if not self._files.write(relative, "writing the record log", write):
            return False
        with self._lock:
            self._logged[key] = index + 1
        return True

    def _write_remote(self, key: str, session_id: str, entries: list, index: int,
                      frame: bytes) -> bool:
        """Makes `entries[:index + 1]` the session's record on the remote tier: appends
        `frame` when the list holds exactly the entries before it, else writes it whole
        (unless it holds more, or is not what this replica last saw there). If another
        replica wrote the list since (it ran turns of the session at the same time), its
        record stands: this turn is not recorded there, the conflict is logged and
        counted, and the record in memory becomes the remote one. A record lost
        meanwhile loses the session (see `refresh`)."""
        with self._lock:
            if self._records.get(key) is not entries:
                return False  # dropped since
            appending = self._remote_logged.get(key) == index
            checked = appending or key not in self._shared
            upto = entries[:index + 1]
        try:
            if not checked:
                self.refresh(session_id)
            frames = [frame] if appending else [self._header(session_id)] + [
                disk_entry.encode_frame(entry) for entry in upto]
            written = self._remote.append_frames(key, frames,
                                                 holding=index + 1 if appending else None)
            if written:
                with self._lock:
                    self._remote_logged[key] = index + 1
                    self._shared[key] = (index + 1, upto[-1]["chain"])
                return True
            with self._lock:
                self._remote_logged.pop(key, None)  # in doubt: rewrite it next time
            if written is False:
                log.warning("session %r: another replica wrote its record meanwhile; its "
                            "record stands and this replica's turn %d is not in it",
                            session_id, index + 1)
                with self._lock:
                    self._stats["remote_record_conflicts"] += 1
                self._adopt_shared(key, session_id)
        except (SessionLost, RecordUnavailable):
            pass  # the session's next turn says so
        return False

    def _header(self, session_id: str, *, lost: bool = False) -> bytes:
        """A record's first frame; `lost`: the marker of a lost session's record."""
        header = {"format_version": LOG_FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "session_id": session_id}
        return disk_entry.encode_frame({**header, "lost": True} if lost else header)

    def _encode(self, session_id: str, entries: list) -> bytes:
        """A whole log: its header frame, then one frame per entry."""
        return self._header(session_id) + b"".join(
            disk_entry.encode_frame(entry) for entry in entries)

    def _remote_entries(self, data: bytes, key: str, session_id: str) -> list | None:
        """Under the lock: the entries of the remote record frames `data`, chained from
        their content (`chained`), or None if there are none, or it is junk: a bad
        header or frame, an entry that is not an object, a lost session's marker."""
        frames, good_length = disk_entry.decode_frames(data)
        header = frames[0] if frames else None
        if not (good_length == len(data) and isinstance(header, dict) and len(frames) > 1
                and header.get("format_version") == LOG_FORMAT_VERSION
                and header.get("fingerprint") == self.fingerprint
                and header.get("session_id") == session_id and not header.get("lost")
                and all(isinstance(entry, dict) for entry in frames[1:])):
            return None
        entries = self._verified(key, frames[1:])
        if entries is not None:
            self._remote_logged[key] = len(entries)
        return entries

    def _verified(self, key: str, entries: list) -> list | None:
        """Session `key`'s `entries` as read, chained from their content (`chained`:
        entries written before entries had chains get theirs); with a store key, None
        unless each carried the chain the key gives it."""
        result = chained(key, entries, self._secret)
        if self._secret is not None and any(
                not hmac.compare_digest(str(entry.get("chain")), checked["chain"])
                for entry, checked in zip(entries, result)):
            return None
        return result

    def _read_disk(self, key: str, session_id: str) -> list | None:
        """Under the lock: the entries of the session's log, or None."""
        relative = log_file(key)
        if self._files is None or relative not in self._files:
            return None
        path = self._files.path(relative)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            log.warning("cannot read the record log %s: %s", path, error)
            data = b""
        frames, good_length = disk_entry.decode_frames(data)
        header = frames[0] if frames else None
        entries = None
        if (isinstance(header, dict) and len(frames) > 1
                and header.get("format_version") == LOG_FORMAT_VERSION
                and header.get("fingerprint") == self.fingerprint
                and all(isinstance(entry, dict) for entry in frames[1:])):
            entries = self._verified(key, frames[1:])
        if entries is None:
            log.warning("dropping the record log %s: it has no good header and entries "
                        "(damaged, another format or model, or not sealed with this "
                        "store's key)", path)
            self._stats["corrupt_entries"] += 1
            self._files.delete(relative)
            return None
        if header.get("session_id") != session_id:
            log.warning("the record log %s names another session: not believed", path)
            return None
        if good_length < len(data):
            log.warning("record log %s ends in a torn or damaged frame: cutting it from %d "
                        "to %d bytes (%d entries kept)", path, len(data), good_length,
                        len(entries))
            self._stats["torn_record_logs"] += 1
            try:
                os.truncate(path, good_length)
            except OSError as error:
                self._files.failed("cutting the torn tail of", path, error)
                return entries  # the log is written whole at the next append
            if not self._files.resized(relative, good_length):
                return entries
        self._logged[key] = len(entries)
        return entries


def _frame_chain(frame: bytes | None) -> str | None:
    """The "chain" of the record entry in one encoded frame; None if it has none."""
    frames, _ = disk_entry.decode_frames(frame or b"")
    return frames[0].get("chain") if len(frames) == 1 and isinstance(frames[0], dict) else None
