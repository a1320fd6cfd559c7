"""Store configuration: byte budgets per tier, block size, sinks, look-ahead."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from jattn.defaults import BLOCK_SIZE, HBM_SHARE, LOOKAHEAD, SINK_TOKENS


def machine_memory_bytes() -> int:
    """This machine's physical memory in bytes (8 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


HOST_MEMORY_KINDS = ("auto", "pinned_host", "unpinned_host", "numpy")
MIN_KEY_BYTES = 16  # a store key file's content, at least


@dataclass(frozen=True)
class StoreConfig:
    """Byte budgets are hard limits: a tier never holds more.

    Args:
      hbm_bytes: KV kept in the device block pool between turns; None: a share
        (`jattn.defaults.HBM_SHARE`) of the pool (see `device_budget`).
      host_bytes: KV kept in host memory.
      disk_bytes: KV kept on local disk (0 disables the tier).
      disk_path: directory of the disk tier; required when `disk_bytes > 0`.
      block_size: tokens per stored block (must equal the engine's KV block size).
      sink_tokens: first tokens a truncated conversation always keeps (rounded up to
        whole blocks).
      lookahead: how many of the engine's queued turns a `hint` covers (their blocks are
        kept longest and read into host memory while they wait).
      remote_url: a Redis shared by replicas (`redis://[user:password@]host:port/db`,
        `rediss://` for TLS) as the tier after disk, holding blocks and session records;
        None: no remote tier. Its budget is Redis's `maxmemory` (with `allkeys-lru`).
      remote_prefix: the prefix of every Redis key jattn writes.
      key_file: a file holding the store key, a secret shared by every replica (at
        least 16 bytes, e.g. `openssl rand -hex 32`; whitespace around it is ignored).
        Block entries on disk and in Redis then carry a keyed BLAKE2b MAC instead of a
        checksum, and session records a keyed chain: entries and records written without
        the key, or with another, are dropped as corrupt. None: no key; whoever can write
        to the disk directory or to Redis can change what the store serves
        (docs/failure_model.md).
      host_memory_kind: where saved blocks land when they leave the device: "auto"
        (`pinned_host` on an accelerator that has it, so the copy out is a DMA that does
        not stall compute, and host memory keeps them there, one array per layer, which
        a load hands back to the device as it is; plain host memory on CPU, where the
        device uses it in place), "pinned_host", "unpinned_host", or "numpy" (a plain
        host copy).
    """

    hbm_bytes: int | None = None
    host_bytes: int = 1 * 2**30
    disk_bytes: int = 0
    disk_path: str | None = None
    block_size: int = BLOCK_SIZE
    sink_tokens: int = SINK_TOKENS
    lookahead: int = LOOKAHEAD
    host_memory_kind: str = "auto"
    remote_url: str | None = None
    remote_prefix: str = "jattn:"
    key_file: str | None = None

    def __post_init__(self):
        for name in ("hbm_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, name)
            if name == "hbm_bytes" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.disk_bytes > 0 and not self.disk_path:
            raise ValueError("disk_bytes > 0 needs a disk_path")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {self.lookahead}")
        if self.host_memory_kind not in HOST_MEMORY_KINDS:
            raise ValueError(f"host_memory_kind must be one of {HOST_MEMORY_KINDS}, "
                             f"got {self.host_memory_kind!r}")
        if self.remote_url is not None and not str(self.remote_url).startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError(f"remote_url must be redis://, rediss:// or unix://, got "
                             f"{self.remote_url!r}")

    def store_key(self) -> bytes | None:
        """The 32-byte key that `key_file` holds (a BLAKE2b digest of its content), or
        None without one; ValueError naming the file if it cannot be read or is short."""
        if self.key_file is None:
            return None
        try:
            with open(self.key_file, "rb") as f:
                content = f.read().strip()
        except OSError as error:
            raise ValueError(f"cannot read the store key file {self.key_file!r}: "
                             f"{error.strerror}") from None
        if len(content) < MIN_KEY_BYTES:
            raise ValueError(f"the store key file {self.key_file!r} holds {len(content)} "
                             f"bytes; a key needs at least {MIN_KEY_BYTES}")
        return hashlib.blake2b(content, digest_size=32, person=b"jattn-store-key").digest()

    def device_budget(self, pool_bytes: int) -> int:
        """The device tier's budget in bytes, for a device pool of `pool_bytes`:
        `hbm_bytes`, or `HBM_SHARE` of the pool when that is None."""
        return int(HBM_SHARE * pool_bytes) if self.hbm_bytes is None else self.hbm_bytes

    def memory_kind_for(self, device) -> str | None:
        """The jax memory kind saved blocks are copied to on `device`, or None for a
        plain numpy copy (also when the device does not have the kind asked for)."""
        kinds = {memory.kind for memory in device.addressable_memories()}
        if self.host_memory_kind == "auto":
            return "pinned_host" if device.platform != "cpu" and "pinned_host" in kinds \
                else None
        return self.host_memory_kind if self.host_memory_kind in kinds else None

    @classmethod
    def sized_for_machine(cls, **overrides) -> "StoreConfig":
        """Host budget a quarter of the machine's memory; no disk tier unless asked."""
        values = dict(host_bytes=machine_memory_bytes() // 4)
        values.update(overrides)
        return cls(**values)
