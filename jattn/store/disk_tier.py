"""The disk tier: KV blocks as self-checking files, by content key, in the store's
`DiskFiles` (whose budget, eviction order and faults they share with the record logs).

A block's file (`blocks/<k[:2]>/<k>.kv`) is a `disk_entry`, written atomically, whose
header meta holds the block key (hex). Reading checks the checksum, the model
fingerprint and that key: a file of another block filed under this key's name is stale,
and is dropped like a corrupt one (`stale_entries`, `corrupt_entries`). A block once
written is never written again while held. `get_run` reads a run of block files straight
into one layer-major array each for keys and values (one `preadv` per file), so that
blocks read back from disk load like a turn's saved blocks, with no copy. The runs are
read into reused host memory (`HostBuffers`), by two threads: the caller's and a reader
thread each read and check every other file.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
from collections.abc import Iterable

import numpy as np

from jattn.store import disk_entry
from jattn.store.disk_files import BLOCKS_DIRECTORY, DiskFiles, block_file
from jattn.store.layer_load import HostBuffers, empty_run
from jattn.store.tier import BlockKV, BlockSpec

log = logging.getLogger("jattn.store")

_HEX_KEY = re.compile(r"[0-9a-f]{32}")  # block keys in headers


class DiskTier:
    """A `BlockTier` of block files in `files`, for the model `fingerprint` (whose
    blocks are `spec`, when given: a file of another shape is dropped as corrupt), sealed
    with the store key `secret` (None: checksummed only; see `disk_entry`). Runs are
    read into memory from `buffers` (else fresh), half of their files by `reader`, a
    one-thread executor (else all by the caller)."""

    name = "disk"

    def __init__(self, files: DiskFiles, *, fingerprint: str, secret: bytes | None = None,
                 spec: BlockSpec | None = None, buffers: HostBuffers | None = None,
                 reader: concurrent.futures.Executor | None = None):
        self.files = files
        self.fingerprint = fingerprint
        self._secret = secret
        self._spec = spec
        self._buffers = buffers
        self._reader = reader
        self._lock = threading.Lock()  # guards the counters
        self._dropped = {"corrupt_entries": 0, "stale_entries": 0}

    @property
    def enabled(self) -> bool:
        return self.files.enabled

    @property
    def used_bytes(self) -> int:
        return self.files.used

    @property
    def capacity_bytes(self) -> int:
        return self.files.capacity

    def contains(self, key: bytes) -> bool:
        return block_file(key) in self.files

    def get(self, key: bytes) -> BlockKV | None:
        relative = block_file(key)
        if relative not in self.files:
            return None
        try:
            arrays, meta = disk_entry.read(self.files.path(relative),
                                           fingerprint=self.fingerprint, secret=self._secret)
            if set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("not a KV block")
            wrong = self._spec and self._spec.mismatch(arrays["k"], arrays["v"])
            if wrong:
                raise disk_entry.CorruptEntry(f"not a block of this model: {wrong}")
            named = meta.get("block_key")
            if not isinstance(named, str) or not _HEX_KEY.fullmatch(named):
                raise disk_entry.CorruptEntry("no block key in its header")
        except disk_entry.CorruptEntry as error:
            self._drop(relative, "corrupt_entries", str(error))
            return None
        if named != key.hex():
            self._drop(relative, "stale_entries", f"its header names block {named}")
            return None
        self.files.touch(relative)
        return BlockKV(arrays["k"], arrays["v"])

    def get_run(self, keys: list[bytes], max_bytes: int | None = None) -> list[BlockKV]:
        """The blocks of the leading run of `keys` held here with good files of one
        shape (of at most `max_bytes` of KV), read straight into one layer-major array
        each for keys and values (`layer_load.empty_run`: a load moves a layer of them
        as one piece, with no copy). A file that fails a check is dropped, and ends the
        run. One block alone is read whole (`get`): there is no run to lay out."""
        if len(keys) == 1 and max_bytes is None:
            block = self.get(keys[0])
            return [] if block is None else [block]
        entries = []  # (relative, fd, header, payload offset, payload bytes)
        nbytes = 0
        try:
            for key in keys:
                entry = self._open(key, like=entries[0] if entries else None)
                if entry is None:
                    break
                entries.append(entry)
                nbytes += entry[4]
                if max_bytes is not None and nbytes > max_bytes:
                    entries.pop()
                    os.close(entry[1])
                    break
            return self._read_run(entries)
        finally:
            for _, fd, _, _, _ in entries:
                os.close(fd)

    def _open(self, key: bytes, like: tuple | None):
        """`(relative, fd, header, payload offset, payload bytes)` of block `key`'s file,
        its header and size checked (a file that fails is dropped); None if it is not
        held, fails, or its arrays differ from those of `like` (the run's first entry)."""
        relative = block_file(key)
        if relative not in self.files:
            return None
        try:
            fd = os.open(self.files.path(relative), os.O_RDONLY)
        except OSError as error:
            self._drop(relative, "corrupt_entries", f"cannot read: {error}")
            return None
        try:
            header, offset = disk_entry.read_header(fd, fingerprint=self.fingerprint,
                                                    secret=self._secret)
            arrays = header.get("arrays")
            if like is not None and arrays == like[2]["arrays"]:
                size = like[4]  # checked with the first
            else:
                size = _block_payload_size(header)
                if self._spec is not None and arrays != self._spec.header_arrays():
                    raise disk_entry.CorruptEntry("not a block of this model: its arrays are "
                                                  f"{arrays}")
            if os.fstat(fd).st_size - offset != size:
                raise disk_entry.CorruptEntry("payload size differs from what its header says")
            named = header.get("meta", {}).get("block_key")
            if not isinstance(named, str) or not _HEX_KEY.fullmatch(named):
                raise disk_entry.CorruptEntry("no block key in its header")
        except (disk_entry.CorruptEntry, OSError, AttributeError) as error:
            os.close(fd)
            self._drop(relative, "corrupt_entries", str(error))
            return None
        if named != key.hex():
            os.close(fd)
            self._drop(relative, "stale_entries", f"its header names block {named}")
            return None
        if like is not None and arrays != like[2]["arrays"]:
            os.close(fd)
            return None
        return relative, fd, header, offset, size

    def _read_run(self, entries: list) -> list[BlockKV]:
        """The payloads of `entries` (from `_open`, one shape) read into one layer-major
        pair of arrays, up to the first that fails its check (dropped). The reader
        thread reads and checks every other file meanwhile."""
        if not entries:
            return []
        k_all, v_all = (empty_run(tuple(spec["shape"]), np.dtype(spec["dtype"]),
                                  len(entries), self._buffers)
                        for spec in entries[0][2]["arrays"])
        parts = [(memoryview(part.reshape(-1).view(np.uint8)), part[0, 0].nbytes)
                 for part in (k_all, v_all)]  # bytes, and a block's layer's bytes
        layers, count = k_all.shape[:2]
        first_bad = [count]  # the lowest index known to fail: no need to read past it

        def read_and_check(indices: range) -> tuple[int, Exception] | None:
            """Reads and checks `entries[i]` for i in `indices`, in order; the first
            that fails, and why, if one does."""
            for index in indices:
                if index > first_bad[0]:
                    return None
                _, fd, header, offset, _ = entries[index]
                pieces = [part[(layer * count + index) * row:(layer * count + index + 1) * row]
                          for part, row in parts for layer in range(layers)]
                try:
                    disk_entry.read_payload_into(fd, offset, pieces)
                    disk_entry.check_payload(header, pieces, self._secret)
                except (disk_entry.CorruptEntry, OSError) as error:
                    first_bad[0] = min(first_bad[0], index)
                    return index, error
            return None

        if self._reader is None or count == 1:
            failures = [read_and_check(range(count))]
        else:
            other = self._reader.submit(read_and_check, range(1, count, 2))
            failures = [read_and_check(range(0, count, 2)), other.result()]
        failed = min((failure for failure in failures if failure is not None),
                     default=None, key=lambda failure: failure[0])
        read = count if failed is None else failed[0]
        if failed is not None:
            self._drop(entries[read][0], "corrupt_entries", str(failed[1]))
        for relative, *_ in entries[:read]:
            self.files.touch(relative)
        k_all.flags.writeable = v_all.flags.writeable = False
        return [BlockKV(k_all[:, i], v_all[:, i]) for i in range(read)]

    def put(self, key: bytes, block: BlockKV) -> bool:
        relative = block_file(key)
        if relative in self.files:
            self.files.touch(relative)
            return True
        room = self.files.room_for(relative)
        if not self.files.enabled or block.nbytes > room:
            return False  # could never fit: not worth encoding
        data = disk_entry.encode({"k": block.k, "v": block.v}, fingerprint=self.fingerprint,
                                 meta={"block_key": key.hex()}, secret=self._secret)
        if len(data) > room:
            return False

        def write(path):
            disk_entry.write_atomic(path, data)
            return len(data), len(data)

        return self.files.write(relative, "writing a KV block", write)

    def delete(self, key: bytes) -> None:
        self.files.delete(block_file(key))

    def keys(self) -> list[bytes]:
        return [bytes.fromhex(relative.rsplit("/", 1)[1].removesuffix(".kv"))
                for relative in self.files.files(BLOCKS_DIRECTORY)]

    def touch(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self.files.touch(block_file(key))

    def hint(self, upcoming_keys: list[bytes]) -> None:
        self.files.hint([block_file(key) for key in upcoming_keys])

    def stats(self) -> dict[str, int]:
        """Blocks held and evicted, copies dropped as corrupt or stale, and the stats of
        the files (bytes, writes, faults)."""
        with self._lock:
            dropped = dict(self._dropped)
        return {**self.files.stats(), **dropped,
                "disk_blocks": len(self.files.files(BLOCKS_DIRECTORY)),
                "disk_evictions": self.files.evictions(BLOCKS_DIRECTORY)}

    def _drop(self, relative: str, counter: str, reason: str) -> None:
        """Deletes a block file that failed a check for `reason`, counting it under
        `counter`; one no longer held (evicted while it was read) is left alone."""
        if self.files.delete(relative):
            log.warning("dropping KV block %s from disk: %s", self.files.path(relative),
                        reason)
            with self._lock:
                self._dropped[counter] += 1


def _block_payload_size(header: dict) -> int:
    """The payload bytes of a checked header that describes a KV block (arrays "k" and
    "v" of 4 dimensions); `CorruptEntry` if it does not."""
    arrays = header.get("arrays")
    if not isinstance(arrays, list) or [a.get("name") for a in arrays] != ["k", "v"]:
        raise disk_entry.CorruptEntry("not a KV block")
    size = disk_entry.payload_size(header)
    if any(len(spec["shape"]) != 4 for spec in arrays):
        raise disk_entry.CorruptEntry("not a KV block")
    return size
