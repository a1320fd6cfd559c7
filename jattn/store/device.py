"""The device tier: KV blocks that stay in the engine's block pool after their turn, held
under their content keys, so that any later request with the same content reuses them.

A held block is *referenced* while running turns read it (`acquire` ... `release`), and
*cached* (no references) between uses. Cached blocks leave the pool — their ids go back
to the allocator — when the pool needs room (`evict`) or the cache passes its budget
(`trim`), in the order every tier evicts by (`eviction.EvictionOrder`): blocks of the
scheduler's upcoming requests (`hint`) last, the one needed farthest ahead first among
those; all others first, least recently released first. A referenced block is never
evicted. One key is held by at most one block: publishing a key already held frees the
newcomer and keeps the held block.

The tier keeps ids only; the engine copies KV in and out of the pool. It needs an
allocator with `free(ids)` (the engine's `BlockAllocator`).
"""

from __future__ import annotations

from dataclasses import dataclass

from jattn.store.eviction import EvictionOrder


@dataclass(frozen=True)
class DeviceTierStats:
    """Blocks held (`referenced` + `cached`), and the blocks evicted so far."""

    referenced: int
    cached: int
    evicted: int

    @property
    def held(self) -> int:
        return self.referenced + self.cached


class DeviceBlocks:
    """Pool blocks by content key, with reference counts; `capacity_blocks` cached
    blocks at most once `trim` has run."""

    def __init__(self, allocator, *, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.allocator = allocator
        self.capacity_blocks = capacity_blocks
        self._block: dict[bytes, int] = {}  # key -> pool block id
        self._references: dict[bytes, int] = {}  # referenced keys -> count (> 0)
        self._cached = EvictionOrder()  # the keys of unreferenced blocks
        self._evicted = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._block

    def acquire(self, key: bytes) -> int:
        """References the block holding `key` (KeyError if none) and returns its id."""
        block = self._block[key]
        self._cached.remove(key)
        self._references[key] = self._references.get(key, 0) + 1
        return block

    def release(self, key: bytes) -> None:
        """Drops one reference; a block left with none becomes cached (most recent)."""
        count = self._references[key] - 1
        if count:
            self._references[key] = count
            return
        del self._references[key]
        self._cached.use(key)

    def publish(self, key: bytes, block: int) -> tuple[int, bool]:
        """Hands a freshly computed pool `block` over under `key`, cached. Returns the
        block now holding `key` and whether it is `block` (False: the key was held
        already, so `block` went back to the allocator)."""
        if key in self._block:
            self.allocator.free([block])
            return self._block[key], False
        self._block[key] = block
        self._cached.use(key)
        return block, True

    def hint(self, upcoming_keys) -> None:
        """The keys the scheduler's next requests read, most imminent first."""
        self._cached.hint(upcoming_keys)

    def evict(self, count: int, where=None) -> int:
        """Frees up to `count` cached blocks in eviction order — only pool blocks for
        which `where(block)` is true, if given; returns how many."""
        accept = None if where is None else (lambda key: where(self._block[key]))
        victims = self._cached.take(count, accept)
        self.allocator.free([self._block.pop(key) for key in victims])
        self._evicted += len(victims)
        return len(victims)

    def trim(self) -> int:
        """Evicts cached blocks past `capacity_blocks`; returns how many."""
        return self.evict(max(0, len(self._cached) - self.capacity_blocks))

    def held_blocks(self) -> list[int]:
        """The ids of every held block (referenced or cached)."""
        return list(self._block.values())

    def stats(self) -> DeviceTierStats:
        return DeviceTierStats(referenced=len(self._references), cached=len(self._cached),
                               evicted=self._evicted)
