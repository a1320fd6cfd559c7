"""What a client hands the engine, what it gets back, and the errors it may see."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from jattn.chat import ChatTurn
from jattn.generation import StreamedToken
from jattn.sampling import SamplingParams

INPUT_KINDS = ("message", "text", "tokens")


class QueueFull(Exception):
    """The engine's queue is at its limit; try again later."""


class TooManySessions(Exception):
    """A new session would pass the engine's session limit."""


class SessionNotFound(KeyError):
    """No session has this id."""


class EngineStopped(Exception):
    """The engine no longer accepts work (it is shutting down)."""


@dataclass(frozen=True)
class TurnRequest:
    """One turn to run.

    `session_id` None is a one-off generation that leaves nothing behind. `kind` says what
    `value` is: "message" (a user message, through the chat template), "text" (raw text,
    appended as is) or "tokens" (token ids).
    """

    session_id: str | None
    kind: str
    value: str | tuple[int, ...]
    params: SamplingParams
    ignore_eos: bool = False


_DONE = object()


class TurnStream:
    """The tokens of a submitted turn as they are produced.

    Iterating yields `StreamedToken`s and ends when the turn does; it raises the turn's
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
        while True:
            event = self._events.get()
            if event is _DONE:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

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
