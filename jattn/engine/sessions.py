"""The conversations an engine knows, by session id, and their records in the store.

A session's conversation lives in memory while the engine runs; the store keeps its
record (one entry per turn), from which a restarted engine — or a replica sharing the
store — rebuilds it. `Sessions` is the one place that reads records into conversations.
"""

from __future__ import annotations

from typing import Callable

from jattn.conversation import Conversation
from jattn.engine.errors import SessionLost
from jattn.store.kv_store import KVStore


class Sessions:
    """Conversations by session id (a string a client chose, or a one-off's private
    name), backed by `store`'s records. `root_key(scope)`: the root of a new
    conversation's content keys in cache `scope`."""

    def __init__(self, store: KVStore, *, block_size: int, root_key: Callable[[str], bytes]):
        self._store = store
        self._block_size = block_size
        self._root_key = root_key
        self._conversations: dict = {}

    def get(self, session_id, *, scope: str = "", check_remote: bool = True) -> Conversation:
        """The session's conversation: in memory, from the store's record if the store
        has more turns of it (a restart, or another replica's turns), or new (its keys
        rooted in cache `scope`). `check_remote`: whether the store may ask a remote
        tier."""
        held = self._conversations.get(session_id)
        entries = (self._store.newer_record(session_id, None if held is None else len(held.turns),
                                            check_remote=check_remote)
                   if isinstance(session_id, str) else None)
        if entries:
            self._conversations[session_id] = Conversation.from_entries(entries, self._block_size)
        elif held is None:
            self._conversations[session_id] = Conversation(context_key=self._root_key(scope))
        return self._conversations[session_id]

    def __contains__(self, session_id) -> bool:
        """True if the session is in memory."""
        return session_id in self._conversations

    def __len__(self) -> int:
        """Sessions in memory."""
        return len(self._conversations)

    def known(self, session_id: str, *, check_remote: bool = True) -> bool:
        """True if the session is in memory or recorded in the store (a lost one too:
        it can be ended). `check_remote`: whether the store may ask a remote tier."""
        if session_id in self._conversations:
            return True
        try:
            return self._store.newer_record(session_id, None,
                                            check_remote=check_remote) is not None
        except SessionLost:
            return True

    def forget(self, session_id) -> None:
        """Forgets the session in memory only (a one-off's, one that never ran, or one
        whose record `drop_record` drops)."""
        self._conversations.pop(session_id, None)

    def drop_record(self, session_id: str) -> None:
        """Forgets the session's record in the store."""
        self._store.drop(session_id)

    def context_of(self, session_ids) -> list[Conversation]:
        """The conversations in memory among `session_ids`, in order."""
        return [self._conversations[s] for s in session_ids if s in self._conversations]
