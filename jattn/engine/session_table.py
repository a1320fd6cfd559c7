"""The named sessions an engine holds, by tenant, and when each was last active: each
tenant's share of the session table, and the expiry of idle sessions.

A tenant is whoever owns a session (a server's token; "" for a library's caller). One
tenant's sessions never keep another's first session out: each holds at most
`per_tenant`. A session idle (no turn waiting or running) for `idle_s` seconds is
expired: the engine ends it, as `EndSession` would.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

from jattn.engine.errors import TooManySessions


class SessionTable:
    """Sessions by tenant, with their last activity (`time.monotonic()` seconds).
    `per_tenant`: most sessions a tenant holds; `idle_s`: seconds of idleness that
    expire a session (0: never)."""

    def __init__(self, *, per_tenant: int, idle_s: float = 0.0):
        self.per_tenant = per_tenant
        self.idle_s = idle_s
        self._tenant_of: dict[str, str] = {}
        self._count = collections.Counter()
        self._active: dict[str, float] = {}

    def admit(self, session: str, tenant: str, held: Callable[[str], bool]) -> None:
        """Makes room for `tenant`'s new session `session`, or raises TooManySessions
        naming the limit. `held(s)`: whether session s is still in memory (one that is
        not, ended or forgotten since, no longer counts)."""
        if session in self._tenant_of or self._count[tenant] < self.per_tenant:
            return
        for gone in [s for s, t in self._tenant_of.items() if t == tenant and not held(s)]:
            self.close(gone)
        if self._count[tenant] >= self.per_tenant:
            raise TooManySessions(f"this tenant's {self.per_tenant} sessions are open (the "
                                  f"limit per tenant): end one, or wait for idle ones to "
                                  f"expire")

    def touch(self, session: str, tenant: str, now: float | None = None) -> None:
        """`session`, of `tenant`, was active at `now` (default: now)."""
        if session not in self._tenant_of:
            self._tenant_of[session] = tenant
            self._count[tenant] += 1
        self._active[session] = time.monotonic() if now is None else now

    def close(self, session: str) -> None:
        """`session` is no longer held (ended, expired or forgotten)."""
        tenant = self._tenant_of.pop(session, None)
        if tenant is not None:
            self._count[tenant] -= 1
        self._active.pop(session, None)

    def count(self, tenant: str) -> int:
        return self._count[tenant]

    def expired(self, now: float, in_use: set) -> list[str]:
        """The sessions idle for `idle_s` at `now`, those in `in_use` (a turn waiting or
        running) aside, taken off the table; none when expiry is off."""
        if not self.idle_s:
            return []
        gone = [s for s, last in self._active.items()
                if now - last >= self.idle_s and s not in in_use]
        for session in gone:
            self.close(session)
        return gone

    def next_expiry(self, now: float) -> float | None:
        """Seconds from `now` until the next session may expire; None if none can."""
        if not self.idle_s or not self._active:
            return None
        return max(min(self._active.values()) + self.idle_s - now, 0.0)
