"""Byte accounting and eviction of one tier, without the data.

`Tier` keeps entries `(group, item)` and evicts whole groups, in `eviction_order`, under
a use clock and a look-ahead window its caller passes in: the policy simulator drives it
with a trace, filing each block as its own group `(block key, 0)`. `Placement` is the
same accounting for one tier of the store, one group per key, with the tier's own use
clock and window. The names below say "session" for a group.

A victim is found without scanning the sessions: two heaps with lazy deletion (an item
whose session has left, or whose key is out of date, is dropped or re-keyed when it
reaches the top). This relies on `last_used` being a monotone use counter: a held
session's value may grow between calls, never shrink (a session that has left may be
forgotten, and comes back at any value).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable

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


class Placement:
    """The keys one tier of the store holds, their bytes, when each was last used and
    the scheduler's window: which key leaves first when the tier is full (see
    `eviction_order`). Keys are hashable and ordered (bytes, or relative paths). Not
    thread-safe: the tier's lock guards it."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._tier = Tier(capacity)
        self._clock = itertools.count()
        self._last_used: dict = {}  # held key -> use counter
        self._upcoming: list = []  # the last hint, most imminent first

    def __contains__(self, key: Hashable) -> bool:
        return (key, 0) in self._tier

    def __len__(self) -> int:
        return len(self._tier.sizes)

    @property
    def used(self) -> int:
        """Bytes of the held keys."""
        return self._tier.used

    def keys(self) -> list:
        return [key for key, _ in self._tier.sizes]

    def size_of(self, key: Hashable) -> int | None:
        """The bytes `key` counts, or None if it is not held."""
        return self._tier.sizes.get((key, 0))

    def make_room(self, keep: Hashable, fits: Callable[[], bool],
                  evict: Callable[[Hashable], None]) -> bool:
        """Evicts held keys other than `keep`, in policy order, until `fits()`;
        `evict(key)` forgets each victim's data (so that `fits` sees it gone). Returns
        whether it then fits."""
        while not fits():
            gone = self._tier.evict_next(keep=keep, last_used=self._last_used,
                                         upcoming=self._upcoming)
            if not gone:
                return False
            ((victim, _),) = gone
            self._last_used.pop(victim, None)
            evict(victim)
        return True

    def admit(self, key: Hashable, nbytes: int) -> None:
        """Holds `key` at `nbytes` (again, if held), as just used. The caller made the
        room first (`make_room`)."""
        self._tier.remove((key, 0))
        self._last_used[key] = next(self._clock)
        admitted, evicted = self._tier.admit((key, 0), nbytes, last_used=self._last_used,
                                             upcoming=self._upcoming)
        assert admitted and not evicted, "admit without room"

    def remove(self, key: Hashable) -> None:
        self._tier.remove((key, 0))
        self._last_used.pop(key, None)

    def touch(self, key: Hashable) -> None:
        """Marks `key` as just used, if held."""
        if key in self:
            self._last_used[key] = next(self._clock)

    def hint(self, upcoming: list) -> None:
        """The keys the scheduler's next requests read, most imminent first: until the
        next hint, they are evicted last, the most imminent last of all."""
        self._upcoming = list(upcoming)
