"""What a client hands the engine and what it gets back."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from jattn.engine.turns import ChatTurn
from jattn.generation import StreamedToken
from jattn.sampling import SamplingParams

INPUT_KINDS = ("message", "messages", "text", "tokens")
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_SESSION_ID_CHARS = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_session_id(session_id) -> None:
    """Raises ValueError unless `session_id` is a non-empty string of at most
    `MAX_SESSION_ID_CHARS` characters."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise ValueError(f"session_id of {len(session_id)} characters is longer than "
                         f"{MAX_SESSION_ID_CHARS}")


def check_stop_strings(stop: tuple[str, ...]) -> None:
    """Raises ValueError for more than `MAX_STOP_STRINGS` stop strings or one longer
    than `MAX_STOP_CHARS` characters (each is searched for after every token)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"{len(stop)} stop strings: at most {MAX_STOP_STRINGS}")
    long = [s for s in stop if len(s) > MAX_STOP_CHARS]
    if long:
        raise ValueError(f"a stop string of {len(long[0])} characters is longer than "
                         f"{MAX_STOP_CHARS}")


@dataclass(frozen=True)
class TurnRequest:
    """One turn to run.

    `session_id` None is a one-off generation that keeps no history. `kind` says what
    `value` is: "message" (a user message, through the chat template), "messages"
    (`(role, content)` pairs, roles from `CHAT_ROLES`, through the chat template), "text"
    (raw text, appended as is) or "tokens" (token ids). `cache_scope` names who may share the KV
    the turn computes and reuses (a tenant's namespace, plus any per-request salt): KV
    of different scopes never mixes; a session's scope is the one of its first turn.
    """

    session_id: str | None
    kind: str
    value: str | tuple[int, ...] | tuple[tuple[str, str], ...]
    params: SamplingParams
    ignore_eos: bool = False
    cache_scope: str = ""


_DONE = object()


class TurnStream:
    """The tokens of a submitted turn as they are produced.

    Iterating yields `StreamedToken`s (`chunks()`: lists of those that have arrived) and
    ends when the turn does; it raises the turn's
    error if it failed (a `ValueError` for input that cannot run). `result` is the
    `ChatTurn` (filled as the turn runs: its reuse facts are set before the first token).
    `cancel()` stops the turn and frees its blocks at the engine's next step.
    """

    def __init__(self, request: TurnRequest, cancel):
        self.request = request
        self.result: ChatTurn | None = None
        self.started = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = cancel
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._cancel(self)

    def __iter__(self):
        for tokens in self.chunks():
            yield from tokens

    def chunks(self):
        """Like iterating, but yields lists: every token that has arrived by the time the
        reader asks (at least one), so a reader slower than the engine (a network
        stream under load) sends one message for several tokens."""
        while True:
            tokens = []
            event = self._events.get()
            while not (event is _DONE or isinstance(event, BaseException)):
                tokens.append(event)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    event = None
                    break
            if tokens:
                yield tokens
            if event is _DONE:
                return
            if isinstance(event, BaseException):
                raise event

    # ----- the engine's side --------------------------------------------------------------

    def start(self, result: ChatTurn) -> None:
        self.result = result
        self.started.set()

    def push(self, token: StreamedToken) -> None:
        self._events.put(token)

    def close(self) -> None:
        self.started.set()
        self._events.put(_DONE)

    def fail(self, error: BaseException) -> None:
        self.started.set()
        self._events.put(error)
