"""Byte accounting and eviction of one tier, without the data.

The store keeps its data beside a `Tier` per memory and asks it what to evict; the
policy simulator drives the same `Tier` objects with a trace. Entries are `(group, item)`
and eviction takes whole groups, in `eviction_order`: the simulator files each block as
its own group `(block key, 0)`, and so does the store (a block, or a session's record
log, per group). The names below say "session" for a group.

A victim is found without scanning the sessions: two heaps with lazy deletion (an item
whose session has left, or whose key is out of date, is dropped or re-keyed when it
reaches the top). This relies on `last_used` being a monotone use counter: a held
session's value may grow between calls, never shrink (a session that has left may be
forgotten, and comes back at any value).
"""

from __future__ import annotations

import heapq

from jattn.store.policy import window_rank


class Tier:
    """Which entries a tier of `capacity` bytes holds, and their sizes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.sizes: dict[tuple[str, int], int] = {}
        self._by_session: dict[str, set[tuple[str, int]]] = {}
        self.used = 0
        # (last_used value when pushed, session): every held session that is not parked
        # has an item whose value is at most its current `last_used`.
        self._lru: list[tuple[int, str]] = []
        # The look-ahead window the next three describe (a copy of the last `upcoming`
        # an eviction was made under).
        self._window: list[str] = []
        self._rank: dict[str, int] = {}
        # (-first position in the window, session): every held session of the window
        # has one; the top is the one needed farthest ahead.
        self._near: list[tuple[int, str]] = []
        # `_lru` items of window sessions, set aside while the window lasts.
        self._parked: list[tuple[int, str]] = []

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
        the tier, or one that cannot fit without evicting its own session, is refused.
        Among sessions outside the window with the same `last_used`, the smaller key
        goes first."""
        self.remove(entry)
        if nbytes > self.capacity:
            return False, []
        evicted = []
        while self.used + nbytes > self.capacity:
            gone = self.evict_next(keep=entry[0], last_used=last_used, upcoming=upcoming)
            if not gone:
                break
            evicted += gone
        if self.used + nbytes > self.capacity:
            return False, evicted
        key = entry[0]
        if key not in self._by_session:
            self._by_session[key] = set()
            heapq.heappush(self._lru, (last_used.get(key, -1), key))
            if key in self._rank:
                heapq.heappush(self._near, (-self._rank[key], key))
            if len(self._lru) + len(self._near) > 4 * len(self._by_session) + 64:
                self._reindex(last_used)
        self._by_session[key].add(entry)
        self.sizes[entry] = nbytes
        self.used += nbytes
        return True, evicted

    def evict_next(self, *, keep: str, last_used: dict, upcoming: list) -> list:
        """Evicts the whole session that goes first in policy order, other than `keep`,
        and returns its entries (sorted); [] when no other session is held. For callers
        whose room depends on more than the entries' sizes (the store's directories):
        they evict one session at a time until what they need fits."""
        self._set_window(upcoming)
        kept = []
        victim = self._next_victim(keep, kept, last_used)
        for heap, item in kept:
            heapq.heappush(heap, item)
        if victim is None:
            return []
        gone = self.entries_of(victim)
        for old in gone:
            self.remove(old)
        return gone

    def _next_victim(self, own: str, kept: list, last_used: dict):
        """The held session to evict next, other than `own` (whose items go to `kept`,
        as `(heap, item)`, to be pushed back), or None when only `own` is left."""
        lru, near = self._lru, self._near
        while lru:
            value, key = lru[0]
            if key not in self._by_session:
                heapq.heappop(lru)
            elif last_used.get(key, -1) != value:
                heapq.heapreplace(lru, (last_used.get(key, -1), key))
            elif key in self._rank:
                self._parked.append(heapq.heappop(lru))
            elif key == own:
                kept.append((lru, heapq.heappop(lru)))
            else:
                heapq.heappop(lru)
                return key
        while near:
            item = heapq.heappop(near)
            if item[1] == own:
                kept.append((near, item))
            elif item[1] in self._by_session:
                return item[1]
        return None

    def _set_window(self, upcoming: list) -> None:
        """Makes `upcoming` the window eviction works under, if it is not already."""
        if upcoming == self._window:
            return
        for item in self._parked:
            heapq.heappush(self._lru, item)
        self._parked = []
        self._window = list(upcoming)
        self._rank = window_rank(upcoming)
        self._near = [(-i, key) for key, i in self._rank.items() if key in self._by_session]
        heapq.heapify(self._near)

    def _reindex(self, last_used: dict) -> None:
        """Rebuilds both heaps from the held sessions (drops the items of departed ones)."""
        self._lru = [(last_used.get(key, -1), key) for key in self._by_session]
        heapq.heapify(self._lru)
        self._parked = []
        self._near = [(-self._rank[key], key) for key in self._by_session if key in self._rank]
        heapq.heapify(self._near)
