"""Which sessions leave a full tier first: scheduler-aware, then least recently used."""

from __future__ import annotations


def eviction_order(candidates, *, last_used: dict, upcoming: list) -> list:
    """Orders `candidates` (session keys) from first to evict to last.

    Sessions outside the scheduler's look-ahead window `upcoming` go first, least
    recently used first. Sessions inside it go last, the one needed farthest in the
    future first (the most imminent is kept longest). `last_used` maps a session to a
    monotone use counter; unknown sessions count as never used. Of sessions last used
    at the same count, the smaller key goes first.
    """
    rank = window_rank(upcoming)
    outside = [s for s in candidates if s not in rank]
    inside = [s for s in candidates if s in rank]
    outside.sort(key=lambda s: (last_used.get(s, -1), s))
    inside.sort(key=lambda s: -rank[s])
    return outside + inside


def first_victim(candidates, *, last_used: dict, upcoming_rank: dict):
    """The head of `eviction_order` in one pass (no sort): the least recently used
    session outside the window, else the in-window session needed farthest ahead.
    `upcoming_rank` maps a session to its first position in the window."""
    outside = [s for s in candidates if s not in upcoming_rank]
    if outside:
        return min(outside, key=lambda s: (last_used.get(s, -1), s))
    return max(candidates, key=lambda s: upcoming_rank[s], default=None)


def window_rank(upcoming: list) -> dict:
    """Each session's first position in the look-ahead window."""
    return {session: i for i, session in reversed(list(enumerate(upcoming)))}
