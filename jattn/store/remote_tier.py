"""The remote tier: KV blocks in a Redis shared by replicas, by content key.

A block is one Redis string under `<prefix><fingerprint[:16]>:block:<key hex>`, holding
the same self-checking `disk_entry` bytes as a block file (checksum, model fingerprint,
the block key in the header): a value that fails a check, or names another block, is
deleted and counted (`corrupt_entries`, `stale_entries`) and the block is recomputed.
Writes are `SET NX`: two replicas publishing the same block write the same bytes once.

The budget is Redis's own (`maxmemory` with `allkeys-lru`, see `docs/deployment.md`):
the tier treats every entry as one that may vanish at any time, and never counts bytes
itself. `contains` answers from the keys this process wrote or read (a hint, which the
tier contract allows to be stale), so the engine's thread never waits on the network to
ask; `get`, `get_many` and `put` go to Redis, from the store's threads (`fetch`, saves).

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

import redis

from jattn.store import disk_entry
from jattn.store.tier import BlockKV

log = logging.getLogger("jattn.store")

_FAULTS = (redis.ConnectionError, redis.TimeoutError, OSError)


class RemoteTier:
    """A `BlockTier` in the Redis at `url` (`redis://[user:password@]host:port/db` or
    `rediss://` for TLS), its keys under `prefix`, for the model `fingerprint`.
    `timeout_s` bounds each call; after a fault Redis is left alone for `retry_s`."""

    name = "remote"

    def __init__(self, url: str, *, fingerprint: str, prefix: str = "jattn:",
                 timeout_s: float = 1.0, retry_s: float = 2.0):
        self.fingerprint = fingerprint
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
        self._call("connecting", self._redis.ping)

    def block_name(self, key: bytes) -> str:
        """The Redis key of block `key`."""
        return f"{self._namespace}block:{key.hex()}"

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
        """The blocks of `keys` (None where Redis has no good copy), fetched in one
        pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(self.block_name(key))
        values = self._call("reading KV blocks", pipe.execute) or [None] * len(keys)
        return [self._checked(key, data) for key, data in zip(keys, values)]

    def _checked(self, key: bytes, data: bytes | None) -> BlockKV | None:
        """The block a value holds if it passes its checks, else None (dropping it)."""
        if data is None:
            self._forget(key)
            return None
        try:
            arrays, meta = disk_entry.decode(data, fingerprint=self.fingerprint)
            if set(arrays) != {"k", "v"}:
                raise disk_entry.CorruptEntry("not a KV block")
        except disk_entry.CorruptEntry as error:
            self._drop(key, "corrupt_entries", str(error))
            return None
        if meta.get("block_key") != key.hex():
            self._drop(key, "stale_entries", f"it names block {meta.get('block_key')}")
            return None
        with self._lock:
            self._known.add(key)
        return BlockKV(arrays["k"], arrays["v"])

    def put(self, key: bytes, block: BlockKV) -> bool:
        if self.contains(key) or not self.enabled:
            return self.contains(key)
        data = disk_entry.encode({"k": block.k, "v": block.v}, fingerprint=self.fingerprint,
                                 meta={"block_key": key.hex()})
        written = self._call("writing a KV block", self._redis.set, self.block_name(key),
                             data, nx=True)
        if written is None and not self._available():
            return False
        with self._lock:
            self._known.add(key)
            if written:
                self._stats["remote_blocks_written"] += 1
                self._stats["remote_bytes_written"] += len(data)
        return True

    def delete(self, key: bytes) -> None:
        self._forget(key)
        self._call("deleting a KV block", self._redis.delete, self.block_name(key))

    def keys(self) -> list[bytes]:
        names = self._call("listing KV blocks", lambda: list(self._redis.scan_iter(
            match=f"{self._namespace}block:*", count=1000))) or []
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

    def append_frames(self, session: str, frames: list[bytes], *, whole: bool) -> bool:
        """Appends `frames` to the session's record list (`whole`: replaces the list
        with them, header first); False if Redis is unavailable."""
        pipe = self._redis.pipeline(transaction=True)
        if whole:
            pipe.delete(self.record_name(session))
        pipe.rpush(self.record_name(session), *frames)
        return self._call("writing a session record", pipe.execute) is not None

    def frames(self, session: str) -> bytes:
        """The session's record frames, concatenated (b"" if none, or unavailable)."""
        items = self._call("reading a session record", self._redis.lrange,
                           self.record_name(session), 0, -1)
        return b"".join(items or ())

    def record_length(self, session: str) -> int | None:
        """Frames in the session's record list (0 if none), or None if unavailable."""
        return self._call("reading a session record", self._redis.llen,
                          self.record_name(session))

    def delete_record(self, session: str) -> None:
        self._call("deleting a session record", self._redis.delete, self.record_name(session))

    # ----- faults ----------------------------------------------------------------------

    def _available(self) -> bool:
        with self._lock:
            return self._down_since is None

    def _call(self, doing: str, function, *args, **kwargs):
        """`function(*args, **kwargs)` against Redis, or None (without trying, while
        Redis is left alone after a fault; or after a fault, which is logged once per
        outage and counted)."""
        with self._lock:
            if self._down_since is not None and time.monotonic() < self._retry_at:
                return None
        try:
            result = function(*args, **kwargs)
        except _FAULTS as error:
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
