"""Self-checking files: one KV block per file, and append-only logs of framed JSON.

Entry layout: the magic `JATTNKV1`, a little-endian u32 header length, a JSON header
padded with spaces so the payload starts 64-byte aligned, then the payload. The header
carries the format version, the model fingerprint, each array's dtype and shape, and the
XXH3-64 checksum of the payload (a non-cryptographic hash at memory speed: it detects
corruption, while trust in the files comes from the directory's permissions), or, with a
store key (`secret`), a keyed BLAKE2b-256 MAC of the rest of the header and the payload
instead: then only a holder of the key can write an entry that is believed. Entries are
written atomically (a temporary `.tmp-*` file in the same directory, fsync, rename, fsync
of the directory), so a crash leaves either the old file or the new one, never a torn one
that is believed. A file that fails any check raises `CorruptEntry` and the caller drops
it.

Log layout: a sequence of frames, each a little-endian u32 payload length, the u64
XXH3-64 of the length's 4 bytes and the payload, then the payload (UTF-8 JSON). `append`
adds frames at the end of a log with one write and an fsync; a crash mid-append leaves a
torn last frame, which `decode_frames` stops at (the frames before it are whole).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import struct
import tempfile

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
import xxhash

MAGIC = b"JATTNKV1"
FORMAT_VERSION = 2
ALIGNMENT = 64  # payload arrays handed to the device must be aligned to be used in place
CHECKSUM_FIELD = "xxh3_64"  # the header's payload checksum, without a store key
MAC_FIELD = "blake2b_mac"  # the header's keyed MAC of header and payload, with one


class CorruptEntry(Exception):
    """A disk entry that is unreadable, truncated, altered, or from another model."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old or the new file, whole.

    Raises the `OSError` of a step that failed; then no temporary file is left, the old
    file (if any) is untouched unless the final fsync of the directory failed, and the
    directories that this call created are removed again."""
    directory = os.path.dirname(path)
    created = _missing_directories(directory)
    os.makedirs(directory, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove_quietly(os.unlink, tmp)
            raise
        _fsync_dir(directory)
    except BaseException:
        for made in created:
            _remove_quietly(os.rmdir, made)
        raise


def _missing_directories(directory: str) -> list[str]:
    """`directory` and those of its ancestors that do not exist, innermost first."""
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


def _remove_quietly(remove, path: str) -> None:
    """Cleans up after a failed write; a cleanup that fails too must not hide why."""
    try:
        remove(path)
    except OSError:
        pass


def append(path: str, data: bytes) -> None:
    """Appends `data` to the existing file `path` and fsyncs it.

    Raises `FileNotFoundError` when `path` does not exist (nothing is created), or the
    `OSError` of a failed write or fsync, after cutting the file back to its old length
    (best effort: if that fails too, the file ends in a torn tail)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        old_length = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, old_length)
                os.fsync(fd)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


_FRAME_HEAD = struct.Struct("<IQ")  # payload length (bytes), XXH3-64 of length + payload


def encode_frame(value) -> bytes:
    """One log frame holding the JSON-able `value`."""
    payload = json.dumps(value, separators=(",", ":")).encode()
    length = struct.pack("<I", len(payload))
    return _FRAME_HEAD.pack(len(payload), xxhash.xxh3_64_intdigest(length + payload)) + payload


def decode_frames(data: bytes) -> tuple[list, int]:
    """The values of the whole, intact frames at the start of `data`, and how many bytes
    they span: reading stops at the first frame that is torn or fails its checksum."""
    values, offset = [], 0
    while offset + _FRAME_HEAD.size <= len(data):
        length, checksum = _FRAME_HEAD.unpack_from(data, offset)
        start = offset + _FRAME_HEAD.size
        payload = data[start:start + length]
        if len(payload) != length or xxhash.xxh3_64_intdigest(
                data[offset:offset + 4] + payload) != checksum:
            break
        try:
            values.append(json.loads(payload))
        except ValueError:
            break
        offset = start + length
    return values, offset


def encode(arrays: dict[str, np.ndarray], *, fingerprint: str, meta: dict,
           secret: bytes | None = None) -> bytes:
    """Serialises named arrays with a header; `meta` is any JSON-able extra; `secret`:
    the store key the entry is sealed with (None: a checksum only)."""
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    header = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "arrays": [{"name": n, "dtype": str(a.dtype), "shape": list(a.shape)}
                   for n, a in arrays.items()],
        "meta": meta,
    }
    digest, field = _payload_digest(header, secret)
    digest.update(payload)
    header[field] = digest.hexdigest()
    header_bytes = json.dumps(header, sort_keys=True).encode()
    header_bytes += b" " * (-(len(MAGIC) + 4 + len(header_bytes)) % ALIGNMENT)
    return MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload


def _header_length(head) -> int:
    """The header length that the first `len(MAGIC) + 4` bytes of an entry give."""
    if len(head) < len(MAGIC) + 4 or bytes(head[:len(MAGIC)]) != MAGIC:
        raise CorruptEntry("bad magic (not a jattn entry, or truncated)")
    return struct.unpack_from("<I", head, len(MAGIC))[0]


def _payload_digest(header: dict, secret: bytes | None):
    """A digest to feed an entry's payload to, and the header field that holds its
    value: XXH3-64 without `secret`; with it, BLAKE2b-256 keyed by it and already fed
    the header's other fields (canonical JSON), so that neither can be altered."""
    if secret is None:
        return xxhash.xxh3_64(), CHECKSUM_FIELD
    digest = hashlib.blake2b(key=secret, digest_size=32)
    digest.update(json.dumps({name: value for name, value in header.items()
                              if name not in (MAC_FIELD, CHECKSUM_FIELD)},
                             sort_keys=True, separators=(",", ":")).encode())
    return digest, MAC_FIELD


def _check_digest(header: dict, secret: bytes | None, pieces) -> None:
    """`CorruptEntry` unless the payload `pieces` (bytes-like, in order) match the
    checksum or MAC in `header`."""
    digest, field = _payload_digest(header, secret)
    for piece in pieces:
        digest.update(piece)
    if not hmac.compare_digest(digest.hexdigest(), str(header.get(field))):
        raise CorruptEntry("checksum mismatch (altered or truncated payload)" if secret is None
                           else "MAC mismatch (altered, or sealed with another store key)")


def _checked_header(header_bytes, fingerprint: str, secret: bytes | None) -> dict:
    """The parsed header, if it is of this format and model, and sealed as this store
    seals entries (with its key, or without one)."""
    try:
        header = json.loads(bytes(header_bytes))
    except ValueError as error:
        raise CorruptEntry(f"unreadable header: {error}") from None
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise CorruptEntry(f"format version {version}, expected {FORMAT_VERSION}")
    if header.get("fingerprint") != fingerprint:
        raise CorruptEntry("written by another model (fingerprint differs)")
    if secret is not None and MAC_FIELD not in header:
        raise CorruptEntry("not sealed with a store key, and this store has one")
    if secret is None and CHECKSUM_FIELD not in header:
        raise CorruptEntry("sealed with a store key, and this store has none")
    return header


def read_header(fd: int, *, fingerprint: str, secret: bytes | None = None
                ) -> tuple[dict, int]:
    """The checked header of the entry open as `fd`, and where its payload starts (its
    seal is checked with the payload, by `check_payload`)."""
    start = len(MAGIC) + 4
    head = os.pread(fd, 4096, 0)
    end = start + _header_length(head)
    if end > len(head):
        head = os.pread(fd, end, 0)
    return _checked_header(head[start:end], fingerprint, secret), end


def payload_size(header: dict) -> int:
    """The payload bytes that a checked header's arrays add up to; `CorruptEntry` if
    they are not arrays of a known dtype and a shape of non-negative integers."""
    try:
        return sum(np.dtype(spec["dtype"]).itemsize * math.prod(
            _dimension(n) for n in spec["shape"]) for spec in header["arrays"])
    except (TypeError, ValueError, KeyError) as error:
        raise CorruptEntry(f"bad array spec: {error}") from None


def _dimension(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"dimension {n!r}")
    return n


def read_payload_into(fd: int, offset: int, pieces: list[np.ndarray]) -> None:
    """Reads the payload of the entry open as `fd`, from byte `offset`, into `pieces`
    (writable contiguous arrays whose bytes, in order, are the payload; the caller has
    checked the file's size against `payload_size`); `CorruptEntry` if it is shorter.
    `check_payload` then checks what was read."""
    if os.preadv(fd, pieces, offset) != sum(piece.nbytes for piece in pieces):
        raise CorruptEntry("file changed size while read")


def check_payload(header: dict, pieces: list[np.ndarray], secret: bytes | None = None
                  ) -> None:
    """`CorruptEntry` unless `pieces` (a payload, in order) match `header`'s checksum,
    or with `secret`, its MAC."""
    _check_digest(header, secret, pieces)


def decode(data, *, fingerprint: str, secret: bytes | None = None
           ) -> tuple[dict[str, np.ndarray], dict]:
    """Checks and parses `encode`'s bytes (any bytes-like object) sealed with `secret`
    (or with none); raises `CorruptEntry` saying what failed. The arrays are read-only
    views of `data`, not copies."""
    data = memoryview(data).cast("B")
    start = len(MAGIC) + 4
    header_length = _header_length(data[:start])
    header = _checked_header(data[start:start + header_length], fingerprint, secret)
    payload = data[start + header_length:]
    _check_digest(header, secret, [payload])
    arrays, offset = {}, 0
    for spec in header["arrays"]:
        dtype = np.dtype(spec["dtype"])
        count = int(np.prod(spec["shape"], dtype=np.int64))
        size = count * dtype.itemsize
        if offset + size > len(payload):
            raise CorruptEntry("payload shorter than its header says")
        array = np.frombuffer(payload, dtype, count, offset).reshape(spec["shape"])
        array.flags.writeable = False
        arrays[spec["name"]] = array
        offset += size
    if offset != len(payload):
        raise CorruptEntry("payload longer than its header says")
    return arrays, header.get("meta", {})


def read(path: str, *, fingerprint: str, secret: bytes | None = None
         ) -> tuple[dict[str, np.ndarray], dict]:
    """Reads and checks a file (`decode`); a missing or unreadable file is `CorruptEntry`
    too."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            data = aligned_empty(size)
            if f.readinto(data) != size:
                raise CorruptEntry("file changed size while read")
    except OSError as error:
        raise CorruptEntry(f"cannot read: {error}") from None
    return decode(data, fingerprint=fingerprint, secret=secret)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of `nbytes` whose start is 64-byte aligned (a view
    into an allocation of `nbytes + ALIGNMENT`, its `.base`)."""
    return aligned_view(np.empty(nbytes + ALIGNMENT, np.uint8), nbytes)


def aligned_array(shape, dtype, spare_bytes: int = 0) -> np.ndarray:
    """An uninitialised C-contiguous array whose start is 64-byte aligned, in an
    allocation with `spare_bytes` more after it (its `.base`)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return aligned_view(np.empty(nbytes + spare_bytes + ALIGNMENT, np.uint8),
                        nbytes).view(dtype).reshape(shape)


def aligned_view(allocation: np.ndarray, nbytes: int) -> np.ndarray:
    """The 64-byte aligned `nbytes` inside a uint8 `allocation` of `nbytes + ALIGNMENT`."""
    shift = -allocation.ctypes.data % ALIGNMENT
    return allocation[shift:shift + nbytes]
