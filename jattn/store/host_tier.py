"""The host memory tier: KV blocks as numpy arrays by content key, under a byte budget.

The budget counts every block's bytes and, for a block whose keys or values are a view
of a larger array (a turn's blocks arrive as views of one `[L, blocks, ...]` numpy
array, or of one pinned run's layers, which load layer by layer in one piece per
layer), the bytes of that array no held block views: the view keeps the whole array alive. A block whose arrays could
never fit the budget is copied instead. When a block that views an array leaves, the
other held views of that array are copied out, so that the array is freed (for as long
as the copies take, host memory holds both).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from jattn.store.pinned_run import RunLayers
from jattn.store.placement import Placement
from jattn.store.tier import BlockKV


@dataclass
class _ViewedArray:
    """A numpy array that held blocks view: `views` maps each block (key) to the bytes
    of its views of the array, `held` is their sum."""

    array: np.ndarray
    views: dict[bytes, int] = field(default_factory=dict)
    held: int = 0

    def dead_bytes(self, held: int | None = None) -> int:
        """Bytes of the array that no held block views (with `held` bytes viewed; an
        array no block views is not kept alive)."""
        held = self.held if held is None else held
        return max(self.array.nbytes - held, 0) if held else 0


def _views_by_array(block: BlockKV) -> dict[int, tuple[np.ndarray | RunLayers, int]]:
    """The larger arrays a block's keys and values are views of (numpy arrays, or a
    pinned run's layers), by id: each with the bytes of the block's views of it."""
    arrays = {}
    for part in (block.k, block.v):
        if isinstance(part.base, (np.ndarray, RunLayers)) and part.base.nbytes > part.nbytes:
            array, nbytes = arrays.get(id(part.base), (part.base, 0))
            arrays[id(part.base)] = (array, nbytes + part.nbytes)
    return arrays


def _without_views_of(block: BlockKV, array) -> BlockKV:
    """`block` with its keys and values that view `array` copied out (into numpy)."""
    return BlockKV(*(np.array(part) if part.base is array else part
                     for part in (block.k, block.v)))


class HostTier:
    """A `BlockTier` in host memory, of `capacity_bytes`. Holds blocks as they are put
    (no copy, unless their arrays could never fit) and has nothing to check."""

    name = "host"
    enabled = True

    def __init__(self, capacity_bytes: int):
        self._lock = threading.Lock()
        self._blocks: dict[bytes, BlockKV] = {}
        self._placement = Placement(capacity_bytes)
        self._viewed: dict[int, _ViewedArray] = {}  # id(array) -> its held views
        self._dead_bytes = 0  # sum of the viewed arrays' dead bytes
        self._evictions = 0

    @property
    def capacity_bytes(self) -> int:
        return self._placement.capacity

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def _used(self) -> int:
        return self._placement.used + self._dead_bytes

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._blocks

    def size_of(self, key: bytes) -> int | None:
        """The bytes of the held block `key`, or None; not a use."""
        with self._lock:
            return self._placement.size_of(key)

    def get(self, key: bytes) -> BlockKV | None:
        with self._lock:
            self._placement.touch(key)
            return self._blocks.get(key)

    def put(self, key: bytes, block: BlockKV) -> bool:
        with self._lock:
            if key in self._blocks:
                self._placement.touch(key)
                return True
            capacity = self.capacity_bytes
            if block.nbytes > capacity:
                return False
            views = _views_by_array(block)
            if block.nbytes + self._dead_growth(views) > capacity:  # its arrays never fit
                block, views = BlockKV(np.array(block.k), np.array(block.v)), {}
            fits = self._placement.make_room(
                key, lambda: self._used() + block.nbytes + self._dead_growth(views) <= capacity,
                self._evict)
            if fits:
                self._placement.admit(key, block.nbytes)
                self._blocks[key] = block
                self._track_views(key, views)
            return fits

    def put_run(self, blocks: list[tuple[bytes, BlockKV]]) -> list[bool]:
        """`put` of each `(key, block)` in order, taken together where they fit together
        (one room made for all: a turn's saved blocks, which view the same arrays);
        else one by one. Returns whether the tier holds each key afterwards."""
        with self._lock:
            held = {key for key, _ in blocks if key in self._blocks}
            for key in held:
                self._placement.touch(key)
            new = {key: block for key, block in blocks if key not in held}
            if not new:
                return [True] * len(blocks)
            views = {key: _views_by_array(block) for key, block in new.items()}
            merged: dict[int, tuple] = {}  # every viewed array, with the run's bytes of it
            for block_views in views.values():
                for array_id, (array, nbytes) in block_views.items():
                    merged[array_id] = (array, merged.get(array_id, (None, 0))[1] + nbytes)
            nbytes = sum(block.nbytes for block in new.values())
            capacity = self.capacity_bytes
            together = nbytes + self._dead_growth(merged) <= capacity and \
                self._placement.make_room(
                    None, lambda: self._used() + nbytes + self._dead_growth(merged) <= capacity,
                    self._evict)
            if together:
                for key, block in new.items():
                    self._placement.admit(key, block.nbytes)
                    self._blocks[key] = block
                    self._track_views(key, views[key])
                return [True] * len(blocks)
        return [self.put(key, block) for key, block in blocks]

    def delete(self, key: bytes) -> None:
        with self._lock:
            if key in self._blocks:
                self._placement.remove(key)
                self._forget(key)

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._blocks)

    def touch(self, keys: Iterable[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._placement.touch(key)

    def hint(self, upcoming_keys: list[bytes]) -> None:
        with self._lock:
            self._placement.hint(upcoming_keys)

    def stats(self) -> dict[str, int]:
        """Bytes as the budget counts them, blocks held, blocks evicted."""
        with self._lock:
            return {"host_bytes": self._used(), "host_blocks": len(self._blocks),
                    "host_evictions": self._evictions}

    # ----- under the lock ---------------------------------------------------------------

    def _evict(self, key: bytes) -> None:
        self._forget(key)
        self._evictions += 1

    def _forget(self, key: bytes) -> None:
        """Block `key` left the placement: drops it and the views it counted. The other
        held blocks' views of the arrays it viewed are copied out, so that those arrays
        are freed (else evicting a view would free nothing)."""
        for array_id, (array, _) in _views_by_array(self._blocks.pop(key)).items():
            viewed = self._viewed.pop(array_id, None)
            if viewed is None:
                continue
            self._dead_bytes -= viewed.dead_bytes()
            for other in viewed.views:
                if other != key:
                    self._blocks[other] = _without_views_of(self._blocks[other], array)

    def _dead_growth(self, views: dict) -> int:
        """How the viewed arrays' dead bytes change when a block with `views` (from
        `_views_by_array`) is taken."""
        growth = 0
        for array_id, (array, nbytes) in views.items():
            viewed = self._viewed.get(array_id) or _ViewedArray(array)
            growth += viewed.dead_bytes(viewed.held + nbytes) - viewed.dead_bytes()
        return growth

    def _track_views(self, key: bytes, views: dict) -> None:
        """Counts the views of block `key` (from `_views_by_array`)."""
        for array_id, (array, nbytes) in views.items():
            viewed = self._viewed.setdefault(array_id, _ViewedArray(array))
            self._dead_bytes -= viewed.dead_bytes()
            viewed.views[key] = nbytes
            viewed.held += nbytes
            self._dead_bytes += viewed.dead_bytes()
