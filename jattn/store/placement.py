"""Byte accounting and eviction of one tier, without the data.

The store keeps its data beside a `Tier` per memory and asks it what to evict; the
policy simulator drives the same `Tier` objects with a trace. Entries are
`(session_key, serial)`; eviction takes whole sessions, in `eviction_order`.
"""

from __future__ import annotations

from jattn.store.policy import first_victim, window_rank


class Tier:
    """Which entries a tier of `capacity` bytes holds, and their sizes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.sizes: dict[tuple[str, int], int] = {}
        self._by_session: dict[str, set[tuple[str, int]]] = {}
        self.used = 0

    def __contains__(self, entry) -> bool:
        return entry in self.sizes

    def sessions(self) -> set[str]:
        return set(self._by_session)

    def entries_of(self, key: str) -> list[tuple[str, int]]:
        return sorted(self._by_session.get(key, ()))

    def remove(self, entry) -> None:
        if entry not in self.sizes:
            return
        self.used -= self.sizes.pop(entry)
        members = self._by_session[entry[0]]
        members.discard(entry)
        if not members:
            del self._by_session[entry[0]]

    def admit(self, entry, nbytes: int, *, last_used: dict, upcoming: list
              ) -> tuple[bool, list]:
        """Makes room for `entry` of `nbytes` by evicting other sessions whole, in policy
        order, and takes it. Returns `(admitted, evicted entries)`; an entry larger than
        the tier, or one that cannot fit without evicting its own session, is refused."""
        self.remove(entry)
        if nbytes > self.capacity:
            return False, []
        evicted = []
        if self.used + nbytes > self.capacity:
            rank = window_rank(upcoming)
            others = self.sessions() - {entry[0]}
            while others and self.used + nbytes > self.capacity:
                victim = first_victim(others, last_used=last_used, upcoming_rank=rank)
                others.discard(victim)
                for old in self.entries_of(victim):
                    self.remove(old)
                    evicted.append(old)
        if self.used + nbytes > self.capacity:
            return False, evicted
        self.sizes[entry] = nbytes
        self._by_session.setdefault(entry[0], set()).add(entry)
        self.used += nbytes
        return True, evicted
