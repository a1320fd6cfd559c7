"""The remote tier: KV blocks in a Redis shared by replicas, by content key.

A block is one Redis hash under `<prefix><fingerprint[:16]>:layers:<key hex>`, one field
per layer (`0` .. `L-1`), each holding that layer's keys and values in the same
self-checking `disk_entry` format as a block file (checksum, model fingerprint, and in the
header the block key, the layer and the layer count). Per-layer fields let a load read
layer l of every block of a turn in one pipelined round trip while the engine computes
layer l-1 (`RemoteRead`); one key per block means Redis evicts a block whole. A value that
fails a check, or names another block or layer, is deleted and counted
(`corrupt_entries`, `stale_entries`) and the block is recomputed. Writes are `HSETNX`
per field: two replicas publishing the same block write the same bytes once.

The budget is Redis's own (`maxmemory` with `allkeys-lru`, see `docs/deployment.md`):
the tier treats every entry as one that may vanish at any time, and never counts bytes
itself. `contains` answers from the keys this process wrote or read (a hint, which the
tier contract allows to be stale), so the engine's thread never waits on the network to
ask; every other call goes to Redis, from the store's threads (remote reads, saves,
record refreshes).

Faults: a connection error or timeout marks Redis unavailable (logged once, counted in
`remote_errors`, `remote_available` 0): for `retry_s` seconds every call answers at once
as if the tier held nothing (the store recomputes), then the next call tries again, and
the first that succeeds logs the recovery. Nothing raises.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import numpy as np

from jattn.store import disk_entry
from jattn.store.tier import BlockKV, BlockSpec

log = logging.getLogger("jattn.store")

# KEYS[1]: a record list; ARGV[1]: the frames it must hold to append (-1: replace it, if it
# holds no more frames than given); ARGV[2..]: the frames. Returns 1 if written, else 0.
_APPEND_FRAMES = """
local held = redis.call('LLEN', KEYS[1])
local holding = tonumber(ARGV[1])
if holding >= 0 then
  if held ~= holding then return 0 end
else
  if held > #ARGV - 1 then return 0 end
  redis.call('DEL', KEYS[1])
end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
return 1
"""


_RECORD_STATE = """
return {redis.call('LLEN', KEYS[1]), redis.call('LINDEX', KEYS[1], tonumber(ARGV[1]))}
"""


class JunkRecord(Exception):
    """The key of a session's record holds something that is not a record list."""


def stacked(layers: list[tuple[np.ndarray, np.ndarray]]) -> BlockKV:
    """The block whose layers are `layers`, `(k, v)` `[block_size, Hkv, D]` each, in order."""
    return BlockKV(np.stack([k for k, _ in layers]), np.stack([v for _, v in layers]))


class RemoteTier:
    """A `BlockTier` in the Redis at `url` (`redis://[user:password@]host:port/db` or
    `rediss://` for TLS), its keys under `prefix`, for the model `fingerprint`, its
    values sealed with the store key `secret` (None: checksummed only). `timeout_s` bounds each call; after a fault Redis is left alone for `retry_s`. With
    `spec` (the model's blocks), a value of another layer count or shape is dropped."""

    name = "remote"

    def __init__(self, url: str, *, fingerprint: str, prefix: str = "jattn:",
                 secret: bytes | None = None, spec: BlockSpec | None = None,
                 timeout_s: float = 1.0, retry_s: float = 2.0):
        import redis  # imported only with a remote tier (0.4 s)

        self.fingerprint = fingerprint
        self._secret = secret
        self._spec = spec
        self._faults = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._wrong_type = redis.ResponseError  # e.g. WRONGTYPE: a string at a list's key
        self._namespace = f"{prefix}{fingerprint[:16]}:"
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._retry_s = retry_s
        self._lock = threading.Lock()
        self._known: set[bytes] = set()  # keys written or read here: `contains`' hint
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._stats = {"remote_blocks_written": 0, "remote_bytes_written": 0,
                       "remote_errors": 0, "corrupt_entries": 0, "stale_entries": 0}
        self._append_script = self._redis.register_script(_APPEND_FRAMES)
        self._state_script = self._redis.register_script(_RECORD_STATE)
        self._call("connecting", self._redis.ping)

    def block_name(self, key: bytes) -> str:
        """The Redis key of block `key` (a hash of its layers)."""
        return f"{self._namespace}layers:{key.hex()}"

    # ----- the BlockTier interface -----------------------------------------------------

    @property
    def enabled(self) -> bool:
        """False while Redis is unavailable (between a fault and the next retry)."""
        with self._lock:
            return self._down_since is None or time.monotonic() >= self._retry_at

    @property
    def used_bytes(self) -> int:
        return 0  # Redis's maxmemory is the budget

    @property
    def capacity_bytes(self) -> int:
        return 0

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._known

    def get(self, key: bytes) -> BlockKV | None:
        return self.get_many([key])[0]

    def get_many(self, keys: list[bytes]) -> list[BlockKV | None]:
        """The whole blocks of `keys` (None where Redis has no good copy of every layer),
        fetched in one pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(self.block_name(key))
        values = self._call("reading KV blocks", pipe.execute) or [{}] * len(keys)
        return [self._whole(key, fields) for key, fields in zip(keys, values)]

    def read_layer(self, keys: list[bytes], layer: int
                   ) -> list[tuple[np.ndarray, np.ndarray, int] | None]:
        """Layer `layer` of the blocks of `keys` in one pipelined round trip: for each,
        `(k, v, num_layers)` with k, v `[block_size, Hkv, D]`, or None where Redis has no
        good copy (or is unavailable)."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(self.block_name(key), str(layer))
        values = self._call("reading a layer of KV blocks", pipe.execute) or [None] * len(keys)
        return [self._checked(key, layer, data) for key, data in zip(keys, values)]

    def _whole(self, key: bytes, fields: dict) -> BlockKV | None:
        """The block whose layers `fields` (an HGETALL) holds, if every layer is there and
        passes its checks, else None."""
        first = self._checked(key, 0, fields.get(b"0"))
        if first is None:
            return None
        layers = [(first[0], first[1])]
        for layer in range(1, first[2]):
            got = self._checked(key, layer, fields.get(str(layer).encode()))
            if got is None:
                return None
            layers.append((got[0], got[1]))
        return stacked(layers)

    def _checked(self, key: bytes, layer: int, data: bytes | None
                 ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """`(k, v, num_layers)` of one layer's value if it passes its checks, else None
        (dropping the block)."""
        if data is None:
            self._forget(key)
            return None
        try:
            arrays, meta = disk_entry.decode(data, fingerprint=self.fingerprint,
                                             secret=self._secret)
            if set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("not a layer of a KV block")
        except disk_entry.CorruptEntry as error:
            self._drop(key, "corrupt_entries", str(error))
            return None
        if meta.get("block_key") != key.hex() or meta.get("layer") != layer:
            self._drop(key, "stale_entries", f"it holds layer {meta.get('layer')} of "
                                              f"block {meta.get('block_key')}")
            return None
        layers = meta.get("layers")
        wrong = (f"a layer count of {layers!r}" if not isinstance(layers, int)
                 or isinstance(layers, bool) or not 0 <= layer < layers
                 else self._spec and self._spec.mismatch(arrays["k"], arrays["v"], layers))
        if wrong:
            self._drop(key, "corrupt_entries", f"not a block of this model: {wrong}")
            return None
        with self._lock:
            self._known.add(key)
        return arrays["k"], arrays["v"], layers

    def put(self, key: bytes, block: BlockKV) -> bool:
        if self.contains(key) or not self.enabled:
            return self.contains(key)
        num_layers = block.k.shape[0]
        name = self.block_name(key)
        pipe = self._redis.pipeline(transaction=False)
        nbytes = 0
        for layer in range(num_layers):
            data = disk_entry.encode(
                {"k": block.k[layer], "v": block.v[layer]}, fingerprint=self.fingerprint,
                meta={"block_key": key.hex(), "layer": layer, "layers": num_layers},
                secret=self._secret)
            pipe.hsetnx(name, str(layer), data)
            nbytes += len(data)
        written = self._call("writing a KV block", pipe.execute)
        if written is None:
            return False
        with self._lock:
            self._known.add(key)
            if any(written):
                self._stats["remote_blocks_written"] += 1
                self._stats["remote_bytes_written"] += nbytes
        return True

    def delete(self, key: bytes) -> None:
        self._forget(key)
        self._call("deleting a KV block", self._redis.delete, self.block_name(key))

    def keys(self) -> list[bytes]:
        names = self._call("listing KV blocks", lambda: list(self._redis.scan_iter(
            match=f"{self._namespace}layers:*", count=1000))) or []
        return [bytes.fromhex(name.decode().rsplit(":", 1)[1]) for name in names]

    def touch(self, keys: Iterable[bytes]) -> None:
        """Nothing: a read is Redis's use of a key (its LRU clock)."""

    def hint(self, upcoming_keys: list[bytes]) -> None:
        """Nothing: Redis evicts by its own policy."""

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "remote_tier_enabled": 1,
                    "remote_available": int(self._down_since is None),
                    "remote_blocks_known": len(self._known)}

    # ----- session records -------------------------------------------------------------

    def record_name(self, session: str) -> str:
        """The Redis key of the record of session key `session` (a hash, not the id)."""
        return f"{self._namespace}session:{session}"

    def append_frames(self, session: str, frames: list[bytes], *, holding: int | None
                      ) -> bool | None:
        """Appends `frames` to the session's record list if it holds exactly `holding`
        frames; with `holding` None, replaces the list with `frames` (header first) if it
        holds no more than that many. Checked and written atomically in Redis, so replicas
        that run turns of one session at once never interleave their frames or undo each
        other's: True if written, False if the list was not as expected (another replica
        wrote it since, or its key holds junk), None if Redis is unavailable."""
        try:
            written = self._call("writing a session record", self._append_script,
                                 keys=[self.record_name(session)],
                                 args=[-1 if holding is None else holding, *frames])
        except JunkRecord:
            return False
        return None if written is None else bool(written)

    def replace_record(self, session: str, frames: list[bytes]) -> bool | None:
        """Makes `frames` the session's record list, whatever its key held (one
        transaction); None if Redis is unavailable."""
        def replace():
            pipeline = self._redis.pipeline(transaction=True)
            pipeline.delete(self.record_name(session))
            pipeline.rpush(self.record_name(session), *frames)
            pipeline.execute()
            return True
        return self._call("writing a session record", replace)

    def frames(self, session: str) -> bytes | None:
        """The session's record frames, concatenated (b"" if none), or None if Redis is
        unavailable; `JunkRecord` if its key holds something else."""
        items = self._call("reading a session record", self._redis.lrange,
                           self.record_name(session), 0, -1)
        return None if items is None else b"".join(items)

    def record_state(self, session: str, index: int) -> tuple[int, bytes | None] | None:
        """The number of frames in the session's record list (0 if none) and its frame
        `index` (None past its end), in one call; None if Redis is unavailable;
        `JunkRecord` if its key holds something else."""
        state = self._call("reading a session record", self._state_script,
                           keys=[self.record_name(session)], args=[index])
        if state is None:
            return None
        return int(state[0]), state[1] if len(state) > 1 else None  # (a nil ends Lua's list)

    def delete_record(self, session: str) -> None:
        self._call("deleting a session record", self._redis.delete, self.record_name(session))

    # ----- faults ----------------------------------------------------------------------

    def _call(self, doing: str, function, *args, **kwargs):
        """`function(*args, **kwargs)` against Redis, or None (without trying, while
        Redis is left alone after a fault; or after a fault, which is logged once per
        outage and counted)."""
        with self._lock:
            if self._down_since is not None and time.monotonic() < self._retry_at:
                return None
        try:
            result = function(*args, **kwargs)
        except self._wrong_type as error:
            if "WRONGTYPE" not in str(error):
                raise
            raise JunkRecord(str(error)) from None
        except self._faults as error:
            with self._lock:
                self._stats["remote_errors"] += 1
                first = self._down_since is None
                if first:
                    self._down_since = time.monotonic()
                self._retry_at = time.monotonic() + self._retry_s
            if first:
                log.warning("remote tier unavailable while %s (%s): serving without it, "
                            "retrying every %.0f s", doing, error, self._retry_s)
            return None
        with self._lock:
            recovered = self._down_since is not None
            if recovered:
                outage = time.monotonic() - self._down_since
                self._down_since = None
                self._known.clear()  # Redis may have lost anything meanwhile
        if recovered:
            log.warning("remote tier available again after %.1f s", outage)
        return result

    def _forget(self, key: bytes) -> None:
        with self._lock:
            self._known.discard(key)

    def _drop(self, key: bytes, counter: str, reason: str) -> None:
        log.warning("dropping KV block %s from the remote tier: %s", key.hex(), reason)
        with self._lock:
            self._stats[counter] += 1
        self.delete(key)
