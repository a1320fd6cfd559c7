"""Which key leaves a full tier first: the one eviction order of every tier.

Keys outside the scheduler's look-ahead window (the keys its next requests read, most
imminent first) leave first, least recently used first; keys inside it leave last, the
one needed farthest ahead first, so that the most imminent is kept longest.
`EvictionOrder` keeps that order over the keys a tier may evict: the host and disk tiers
hold one through `placement.Placement`, the device tier (`device.DeviceBlocks`) one over
its cached blocks, and `jattn bench simulate` drives those same classes.

A key names what a tier evicts as a whole (a block by its content key, a file by its
relative path); keys need only be hashable.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable, Iterable


class EvictionOrder:
    """The keys a tier may evict, each with its last use, under the scheduler's window.

    Costs (n: keys held): `use` O(log n) amortised, `remove` O(1), `hint` O(log n) per
    key of the old and new windows, `take` O(log n) amortised per key it takes or
    passes over. The heaps below are
    updated lazily: an item whose key has left, been used again or entered or left the
    window is dropped when it reaches the top, and the heaps are rebuilt once stale items
    outnumber live ones.
    """

    def __init__(self):
        self._clock = itertools.count()
        self._last_use: dict[Hashable, int] = {}  # held key -> the clock at its last use
        self._window: dict[Hashable, int] = {}  # hinted key -> its rank, most imminent 0
        # (last use, key): holds the current item of every held key outside the window.
        self._recency: list[tuple[int, Hashable]] = []
        # (-rank, key): holds an item of every held key inside the window.
        self._imminence: list[tuple[int, Hashable]] = []

    def __contains__(self, key: Hashable) -> bool:
        return key in self._last_use

    def __len__(self) -> int:
        return len(self._last_use)

    def use(self, key: Hashable) -> None:
        """Holds `key` (again, if held) as just used."""
        held = key in self._last_use
        self._last_use[key] = use = next(self._clock)
        if key not in self._window:
            heapq.heappush(self._recency, (use, key))
        elif not held:
            heapq.heappush(self._imminence, (-self._window[key], key))
        self._compact()

    def remove(self, key: Hashable) -> None:
        """Forgets `key` (a key not held is fine)."""
        self._last_use.pop(key, None)

    def hint(self, upcoming: Iterable[Hashable]) -> None:
        """The keys the scheduler's next requests read, most imminent first (keys not held
        are fine): until the next hint, they leave last."""
        # Each key's rank among the distinct keys, in order of first appearance.
        window = {key: rank for rank, key in enumerate(dict.fromkeys(upcoming))}
        for key in self._window.keys() - window.keys():  # back under recency
            if key in self._last_use:
                heapq.heappush(self._recency, (self._last_use[key], key))
        self._window = window
        self._imminence = [(-rank, key) for key, rank in window.items()
                           if key in self._last_use]
        heapq.heapify(self._imminence)
        self._compact()

    def take(self, count: int, where: Callable[[Hashable], bool] | None = None) -> list:
        """Removes and returns up to `count` held keys, first to leave first, among those
        `where(key)` accepts (all, without `where`)."""
        taken, passed = [], []
        for heap, current in ((self._recency, self._current_outside),
                              (self._imminence, self._current_inside)):
            while heap and len(taken) < count:
                item = heapq.heappop(heap)
                if not current(item):
                    continue
                key = item[1]
                if where is None or where(key):
                    del self._last_use[key]
                    taken.append(key)
                else:
                    passed.append((heap, item))
        for heap, item in passed:
            heapq.heappush(heap, item)
        return taken

    def _current_outside(self, item: tuple[int, Hashable]) -> bool:
        use, key = item
        return self._last_use.get(key) == use and key not in self._window

    def _current_inside(self, item: tuple[int, Hashable]) -> bool:
        rank, key = item
        return key in self._last_use and self._window.get(key) == -rank

    def _compact(self) -> None:
        """Rebuilds both heaps from the held keys alone once stale items outnumber them
        (so each rebuild follows as many pushes as it costs)."""
        if len(self._recency) + len(self._imminence) <= 2 * len(self._last_use) + 64:
            return
        self._recency = [(use, key) for key, use in self._last_use.items()
                         if key not in self._window]
        heapq.heapify(self._recency)
        self._imminence = [(-self._window[key], key) for key in self._last_use
                           if key in self._window]
        heapq.heapify(self._imminence)
