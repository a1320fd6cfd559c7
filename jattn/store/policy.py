"""Which keys leave a full tier first: scheduler-aware, then least recently used.

A key names what a tier evicts as a whole: a block, by its content key (the store's host
and disk tiers evict blocks), or a session. The functions are pure, so any tier (a device
block pool too) can order its own keys with them."""

from __future__ import annotations


def eviction_order(candidates, *, last_used: dict, upcoming: list) -> list:
    """Orders `candidates` (keys) from first to evict to last.

    Keys outside the scheduler's look-ahead window `upcoming` (the keys its next
    requests read, most imminent first) go first, least recently used first. Keys
    inside it go last, the one needed farthest in the future first (the most imminent
    is kept longest). `last_used` maps a key to a monotone use counter; unknown keys
    count as never used. Of keys last used at the same count, the smaller goes first.
    """
    rank = window_rank(upcoming)
    outside = [s for s in candidates if s not in rank]
    inside = [s for s in candidates if s in rank]
    outside.sort(key=lambda s: (last_used.get(s, -1), s))
    inside.sort(key=lambda s: -rank[s])
    return outside + inside


def first_victim(candidates, *, last_used: dict, upcoming_rank: dict):
    """The head of `eviction_order` in one pass (no sort): the least recently used key
    outside the window, else the in-window key needed farthest ahead. `upcoming_rank`
    maps a key to its first position in the window."""
    outside = [s for s in candidates if s not in upcoming_rank]
    if outside:
        return min(outside, key=lambda s: (last_used.get(s, -1), s))
    return max(candidates, key=lambda s: upcoming_rank[s], default=None)


def window_rank(upcoming: list) -> dict:
    """Each key's first position in the look-ahead window."""
    return {session: i for i, session in reversed(list(enumerate(upcoming)))}
