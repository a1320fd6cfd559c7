"""Which sessions leave a full tier first: scheduler-aware, then least recently used."""

from __future__ import annotations


def eviction_order(candidates, *, last_used: dict, upcoming: list) -> list:
    """Orders `candidates` (session keys) from first to evict to last.

    Sessions outside the scheduler's look-ahead window `upcoming` go first, least
    recently used first. Sessions inside it go last, the one needed farthest in the
    future first (the most imminent is kept longest). `last_used` maps a session to a
    monotone use counter; unknown sessions count as never used.
    """
    rank = {session: i for i, session in reversed(list(enumerate(upcoming)))}
    outside = [s for s in candidates if s not in rank]
    inside = [s for s in candidates if s in rank]
    outside.sort(key=lambda s: last_used.get(s, -1))
    inside.sort(key=lambda s: -rank[s])
    return outside + inside
