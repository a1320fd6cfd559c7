"""Byte accounting and eviction of one tier, without the data.

The store keeps its data beside a `Tier` per memory and asks it what to evict; the
policy simulator drives the same `Tier` objects with a trace. Entries are
`(session_key, serial)`; eviction takes whole sessions, in `eviction_order`.
"""

from __future__ import annotations

from jattn.store.policy import eviction_order


class Tier:
    """Which entries a tier of `capacity` bytes holds, and their sizes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.sizes: dict[tuple[str, int], int] = {}
        self.used = 0

    def __contains__(self, entry) -> bool:
        return entry in self.sizes

    def sessions(self) -> set[str]:
        return {key for key, _ in self.sizes}

    def entries_of(self, key: str) -> list[tuple[str, int]]:
        return [entry for entry in self.sizes if entry[0] == key]

    def remove(self, entry) -> None:
        self.used -= self.sizes.pop(entry, 0)

    def admit(self, entry, nbytes: int, *, last_used: dict, upcoming: list
              ) -> tuple[bool, list]:
        """Makes room for `entry` of `nbytes` by evicting other sessions whole, in policy
        order, and takes it. Returns `(admitted, evicted entries)`; an entry larger than
        the tier, or one that cannot fit without evicting its own session, is refused."""
        self.remove(entry)
        if nbytes > self.capacity:
            return False, []
        evicted = []
        others = self.sessions() - {entry[0]}
        for victim in eviction_order(others, last_used=last_used, upcoming=upcoming):
            if self.used + nbytes <= self.capacity:
                break
            for old in self.entries_of(victim):
                self.remove(old)
                evicted.append(old)
        if self.used + nbytes > self.capacity:
            return False, evicted
        self.sizes[entry] = nbytes
        self.used += nbytes
        return True, evicted
