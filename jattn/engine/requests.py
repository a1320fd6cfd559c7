"""What a client hands the engine, its validation (InvalidRequest naming what is wrong),
and what the client gets back."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jattn.engine.errors import InvalidRequest
from jattn.generation import StreamedToken
from jattn.sampling import SamplingParams

if TYPE_CHECKING:
    from jattn.engine.turns import ChatTurn

INPUT_KINDS = ("message", "messages", "text", "tokens")
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_SESSION_ID_CHARS = 1024
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_unicode(text: str, field: str) -> None:
    """Raises InvalidRequest, naming `field`, if `text` holds a lone surrogate (a string
    no UTF-8 can carry, e.g. JSON's "\\ud800" alone)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRequest(f"{field} is not valid Unicode: a lone surrogate "
                             f"U+{ord(text[error.start]):04X} at character {error.start}") from None


def check_session_id(session_id) -> None:
    """Raises InvalidRequest unless `session_id` is a non-empty string of at most
    `MAX_SESSION_ID_CHARS` characters, valid Unicode."""
    if not isinstance(session_id, str) or not session_id:
        raise InvalidRequest(f"session_id must be a non-empty string, got {session_id!r}")
    check_unicode(session_id, "session_id")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidRequest(f"session_id of {len(session_id)} characters is longer than "
                             f"{MAX_SESSION_ID_CHARS}")


def check_stop_strings(stop: tuple[str, ...]) -> None:
    """Raises InvalidRequest for more than `MAX_STOP_STRINGS` stop strings or one longer
    than `MAX_STOP_CHARS` characters (each is searched for after every token)."""
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"{len(stop)} stop strings: at most {MAX_STOP_STRINGS}")
    long = [s for s in stop if len(s) > MAX_STOP_CHARS]
    if long:
        raise InvalidRequest(f"a stop string of {len(long[0])} characters is longer than "
                             f"{MAX_STOP_CHARS}")
    for i, text in enumerate(stop):
        check_unicode(text, f"stop[{i}]")


def check_token_ids(ids, vocab_size: int) -> None:
    """Raises InvalidRequest, naming the first few offenders, unless every id of `ids` is
    an integer in [0, `vocab_size`)."""
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
           or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest(f"token ids must be integers in [0, {vocab_size}), got {bad[:5]}")


def require_tokenizer(tokenizer):
    """`tokenizer`; InvalidRequest if the model has none (None): text needs one."""
    if tokenizer is None:
        raise InvalidRequest("this model has no tokenizer: send token ids")
    return tokenizer


def message_texts(messages) -> list[str]:
    """The contents of "messages" input: `(role, content)` pairs; InvalidRequest naming
    the first that is not one, or whose role is not one of `CHAT_ROLES`."""
    if not isinstance(messages, (tuple, list)):
        raise InvalidRequest("messages must be a list of (role, content) pairs")
    for i, message in enumerate(messages):
        if not (isinstance(message, (tuple, list)) and len(message) == 2):
            raise InvalidRequest(f"messages[{i}] is not a (role, content) pair")
        if message[0] not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}] has role {message[0]!r}; roles are "
                                 f"{', '.join(CHAT_ROLES)}")
    return [content for _, content in messages]


@dataclass(frozen=True)
class TurnRequest:
    """One turn to run.

    `session_id` None is a one-off generation that keeps no history. `kind` says what
    `value` is: "message" (a user message, through the chat template), "messages"
    (`(role, content)` pairs, roles from `CHAT_ROLES`, through the chat template), "text"
    (raw text, appended as is) or "tokens" (token ids). `cache_scope` names who may share the KV
    the turn computes and reuses (a tenant's namespace, plus any per-request salt): KV
    of different scopes never mixes; a session's scope is the one of its first turn.
    `tenant` owns the session (its share of the session table: `SessionTable`).
    """

    session_id: str | None
    kind: str
    value: str | tuple[int, ...] | tuple[tuple[str, str], ...]
    params: SamplingParams
    ignore_eos: bool = False
    cache_scope: str = ""
    tenant: str = ""


_DONE = object()


class TurnStream:
    """The tokens of a submitted turn as they are produced.

    Iterating yields `StreamedToken`s (`chunks()`: lists of those that have arrived) and
    ends when the turn does; it raises the turn's
    error if it failed (`InvalidRequest` for input that cannot run). `result` is the
    `ChatTurn` (filled as the turn runs: its reuse facts are set before the first token).
    `cancel()` stops the turn and frees its blocks at the engine's next step.
    """

    def __init__(self, request: TurnRequest, cancel):
        self.request = request
        self.result: ChatTurn | None = None
        self.started = threading.Event()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()
        self._cancel = cancel
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._cancel(self)

    def __iter__(self):
        for tokens in self.chunks():
            yield from tokens

    def chunks(self, interval_s: float = 0.0):
        """Like iterating, but yields lists: every token that has arrived by the time the
        reader asks (at least one), so a reader slower than the engine (a network
        stream under load) sends one message for several tokens. With `interval_s`
        (seconds), the reader asks at most that often while the turn runs: the first
        token comes at once, then one list per interval, and the last as soon as the
        turn ends. Each message a network stream sends costs the server and the
        client far more than a token costs the engine."""
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
            if interval_s:
                self._ended.wait(interval_s)

    # ----- the engine's side --------------------------------------------------------------

    def start(self, result: ChatTurn) -> None:
        self.result = result
        self.started.set()

    def push(self, token: StreamedToken) -> None:
        self._events.put(token)

    def close(self) -> None:
        self.started.set()
        self._events.put(_DONE)
        self._ended.set()

    def fail(self, error: BaseException) -> None:
        self.started.set()
        self._events.put(error)
        self._ended.set()
