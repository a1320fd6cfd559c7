"""The tier interface: KV blocks by content key, under a byte budget.

A block is the keys (position-free) and values of `block_size` tokens over all layers,
`[L, block_size, Hkv, D]` each. Its only identity is its 16-byte block key, the content
key of the tokens and context its KV was computed from (computed by the caller): any
request whose prefix has that key may reuse it, whoever computed it. A tier keeps at most
one copy of a block.

The contract every tier keeps, and every caller relies on: **any entry may vanish at
any time** — evicted to make room for another, dropped as corrupt when read, lost with a
disk that was disabled or a remote store that went away. So `contains` is a hint that
may be stale by the next call, and a caller treats every `get` as possibly None: the
token history is the source of truth, and a block that no tier returns is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

BLOCK_KEY_BYTES = 16


@dataclass(frozen=True)
class BlockKV:
    """One block's keys and values, `[L, block_size, Hkv, D]` each, position-free."""

    k: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class BlockSpec:
    """What a model's KV blocks are: keys and values of `layers` layers, each layer
    `layer_shape` `(block_size, Hkv, D)` of dtype `dtype` (its numpy name). A tier that
    knows it drops an entry that is not one, however well it passes its checksum: the
    layer count, shapes and dtype come from the model, never from the entry."""

    layers: int
    layer_shape: tuple[int, ...]
    dtype: str

    def header_arrays(self) -> list[dict]:
        """A block file's header "arrays" (`disk_entry.encode` of keys and values)."""
        shape = [self.layers, *self.layer_shape]
        return [{"name": name, "dtype": self.dtype, "shape": shape} for name in ("k", "v")]

    def mismatch(self, k: np.ndarray, v: np.ndarray, layers: int | None = None) -> str | None:
        """Why keys `k` and values `v` are not a block of this model (`[L, *layer_shape]`
        each; with `layers`, one layer `layer_shape` of a block of `layers` layers), or
        None if they are."""
        want = tuple(self.layer_shape) if layers is not None else (
            self.layers, *self.layer_shape)
        if layers is not None and layers != self.layers:
            return f"it says the block has {layers} layers; the model has {self.layers}"
        for name, array in (("keys", k), ("values", v)):
            if array.shape != want or array.dtype.name != self.dtype:
                return (f"its {name} are {array.dtype.name} {list(array.shape)}; the "
                        f"model's are {self.dtype} {list(want)}")
        return None


def checked_block_key(block_key) -> bytes:
    """`block_key` if it is `BLOCK_KEY_BYTES` bytes, else ValueError."""
    if not isinstance(block_key, bytes) or len(block_key) != BLOCK_KEY_BYTES:
        raise ValueError(f"block_key must be {BLOCK_KEY_BYTES} bytes, got {block_key!r}")
    return block_key


@runtime_checkable
class BlockTier(Protocol):
    """KV blocks by 16-byte key under a byte budget that is never exceeded, evicted
    scheduler-aware then least recently used (`placement.Placement`). Every method is
    safe to call from any thread and never raises for a fault of the tier's medium (it
    is logged and counted; the entry is then missing). Keys are checked by the caller.
    """

    name: str  # what `AttentionStore` calls the tier: "host", "disk"

    @property
    def enabled(self) -> bool:
        """False once the tier gave up (an unwritable disk): it then holds nothing and
        refuses every put."""

    @property
    def used_bytes(self) -> int:
        """What the budget counts now (with a medium's overheads: directories on disk)."""

    @property
    def capacity_bytes(self) -> int:
        """The budget: `used_bytes` never exceeds it."""

    def contains(self, key: bytes) -> bool:
        """Whether the tier holds `key`; reads, checks and counts nothing."""

    def get(self, key: bytes) -> BlockKV | None:
        """The block, checked, or None: a copy that fails its checks is dropped, counted
        and logged. A use (for least-recently-used eviction)."""

    def put(self, key: bytes, block: BlockKV) -> bool:
        """Takes `block` under `key`, evicting others in policy order to stay within the
        budget; returns whether the tier holds `key` afterwards (False: refused, as too
        large for the budget, or its write failed). Putting a held key is cheap and
        idempotent: it keeps the held copy and marks it used."""

    def delete(self, key: bytes) -> None:
        """Forgets `key` (a key not held is fine)."""

    def keys(self) -> list[bytes]:
        """Every held key, in no particular order."""

    def touch(self, keys: Iterable[bytes]) -> None:
        """Marks the held keys among `keys` as just used."""

    def hint(self, upcoming_keys: list[bytes]) -> None:
        """The keys the scheduler's next requests read, most imminent first: until the
        next hint, eviction keeps them longest, the most imminent last."""

    def stats(self) -> dict[str, int]:
        """Counters under the names `AttentionStore.stats` reports: the tier's name
        prefixes what is its own (`host_bytes`, `disk_evictions`); names shared by tiers
        (`corrupt_entries`) are summed over them."""
