"""Byte accounting of one tier of the store, without the data: the keys it holds, their
bytes, and which leave first when it is full (`eviction.EvictionOrder`). Host memory
(`HostTier`) and the disk's files (`DiskFiles`) each keep one; `jattn bench simulate`
drives the same class for every tier after the device.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from jattn.store.eviction import EvictionOrder


class Placement:
    """The keys one tier holds within `capacity` bytes, each with its size, in eviction
    order. Keys are hashable (bytes, or relative paths). Not thread-safe: the tier's lock
    guards it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._sizes: dict[Hashable, int] = {}
        self._order = EvictionOrder()
        self._used = 0

    def __contains__(self, key: Hashable) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def used(self) -> int:
        """Bytes of the held keys."""
        return self._used

    def keys(self) -> list:
        return list(self._sizes)

    def size_of(self, key: Hashable) -> int | None:
        """The bytes `key` counts, or None if it is not held."""
        return self._sizes.get(key)

    def make_room(self, keep: Hashable, fits: Callable[[], bool],
                  evict: Callable[[Hashable], None]) -> bool:
        """Evicts held keys other than `keep`, in eviction order, until `fits()`;
        `evict(key)` forgets each victim's data (so that `fits` sees it gone). Returns
        whether it then fits."""
        while not fits():
            victims = self._order.take(1, where=lambda key: key != keep)
            if not victims:
                return False
            self._used -= self._sizes.pop(victims[0])
            evict(victims[0])
        return True

    def admit(self, key: Hashable, nbytes: int) -> None:
        """Holds `key` at `nbytes` (again, if held), as just used. The caller made the
        room first (`make_room`)."""
        self._used += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        self._order.use(key)
        assert self._used <= self.capacity, "admit without room"

    def remove(self, key: Hashable) -> None:
        """Forgets `key` (a key not held is fine)."""
        self._used -= self._sizes.pop(key, 0)
        self._order.remove(key)

    def touch(self, key: Hashable) -> None:
        """Marks `key` as just used, if held."""
        if key in self._sizes:
            self._order.use(key)

    def hint(self, upcoming: list) -> None:
        """The keys the scheduler's next requests read, most imminent first: until the
        next hint, they are evicted last, the most imminent last of all."""
        self._order.hint(upcoming)
