"""The service both transports share: who the caller is, the turn a request asks for,
what a finished turn reports, and what kind of error a failure is.

The gRPC services (`serve.conversations`, `serve.jetstream`) and the OpenAI HTTP API
(`serve.openai_api`) are thin adapters over `Service`: each turns its wire request into
a call here and maps `ErrorKind` to its own status table, so validation, tenant scoping,
cache salts and sessions behave the same whichever way a client connects.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from jattn.engine import (
    Engine,
    EngineStopped,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RecordUnavailable,
    SessionLost,
    SessionNotFound,
    TooManySessions,
    TurnRequest,
    TurnStream,
)
from jattn.sampling import SamplingParams
from serve.auth import Tenants, cache_scope, scoped


class Unauthenticated(Exception):
    """The call carries no token, or one the server does not accept."""


class ErrorKind(enum.Enum):
    """What went wrong, whatever the transport: each maps to one gRPC status code and one
    HTTP status."""

    INVALID = "invalid"  # the input can never run as given (an `InvalidRequest`)
    TOO_LONG = "too_long"  # the input does not fit the limits or the context window
    UNAUTHENTICATED = "unauthenticated"
    NOT_FOUND = "not_found"  # no such session (or model)
    SESSION_LOST = "session_lost"  # turns of the session may be gone (`SessionLost`)
    BUSY = "busy"  # the queue or the session table is full: retry later
    UNAVAILABLE = "unavailable"  # shutting down, or the engine has stopped
    INTERNAL = "internal"  # a bug: logged, reported without details


_KINDS = (
    (Unauthenticated, ErrorKind.UNAUTHENTICATED),
    (SessionNotFound, ErrorKind.NOT_FOUND),
    (QueueFull, ErrorKind.BUSY),
    (TooManySessions, ErrorKind.BUSY),
    (EngineStopped, ErrorKind.UNAVAILABLE),
    (RecordUnavailable, ErrorKind.UNAVAILABLE),
    (SessionLost, ErrorKind.SESSION_LOST),
    (PromptTooLong, ErrorKind.TOO_LONG),
    (InvalidRequest, ErrorKind.INVALID),
)


def error_kind(error: BaseException) -> ErrorKind:
    """The kind of a failure (INTERNAL for anything unexpected)."""
    return next((kind for cls, kind in _KINDS if isinstance(error, cls)), ErrorKind.INTERNAL)


def error_message(error: BaseException) -> str:
    """What a client is told: the error's own words, none for an internal error."""
    kind = error_kind(error)
    if kind == ErrorKind.INTERNAL:
        return "internal error (logged by the server)"
    if isinstance(error, SessionNotFound):
        return "no such session"
    return str(error)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its tenant's `namespace` ("" on an open server)."""

    namespace: str


@dataclass(frozen=True)
class TurnFacts:
    """What a finished (or started) turn reused and computed, in tokens; `tier_blocks`
    are blocks reused per tier; `prompt_tokens` is the context the answer follows
    (reused + prefilled), `input_tokens` what this request added to it."""

    ttft_s: float
    cached_tokens: int
    recomputed_tokens: int
    tier_blocks: dict
    input_tokens: int
    dropped_tokens: int
    durable: bool | None = None  # (`ChatTurn.durable`: known once the turn has ended)

    @property
    def prompt_tokens(self) -> int:
        return self.cached_tokens + self.recomputed_tokens

    @classmethod
    def of(cls, result) -> "TurnFacts":
        """The facts of a `ChatTurn`."""
        return cls(ttft_s=result.ttft_s or 0.0, cached_tokens=result.cached_tokens,
                   recomputed_tokens=result.recomputed_tokens,
                   tier_blocks=dict(result.tiers or {}),
                   input_tokens=len(result.prompt_token_ids),
                   dropped_tokens=result.dropped_tokens, durable=result.durable)


class Service:
    """Turns and sessions of one engine, for authenticated callers."""

    def __init__(self, engine: Engine, tenants: Tenants, *, default_max_tokens: int,
                 model_name: str, stream_interval_s: float = 0.0):
        self.engine = engine
        self.tenants = tenants
        self.default_max_tokens = default_max_tokens
        self.model_name = model_name
        # How often a streamed turn sends its tokens, at most (`TurnStream.chunks`).
        self.stream_interval_s = stream_interval_s

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `authorization` header value ("Bearer <token>") names;
        Unauthenticated if tokens are configured and it names none of them."""
        namespace = self.tenants.namespace_of(authorization)
        if namespace is None:
            raise Unauthenticated(Tenants.REFUSAL)
        return Caller(namespace)

    def sampling(self, *, max_tokens: int | None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, stop=(), logprobs: int | None = None
                 ) -> SamplingParams:
        """Sampling parameters, None (or 0 for `max_tokens` and `top_p`) meaning the
        default; InvalidRequest naming a parameter out of range."""
        return SamplingParams(max_tokens=max_tokens or self.default_max_tokens,
                              temperature=0.0 if temperature is None else temperature,
                              top_p=top_p or 1.0, top_k=top_k or 0, seed=seed,
                              stop=tuple(stop or ()), logprobs=logprobs)

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded alone."""
        return self.engine.token_text(token_id)

    def start_turn(self, caller: Caller, *, session_id: str | None, kind: str, value,
                   params: SamplingParams, ignore_eos: bool = False,
                   cache_salt: str = "") -> TurnStream:
        """Submits a turn: of the caller's session `session_id`, or a one-off (None).
        Raises InvalidRequest (bad input; PromptTooLong for input that does not fit),
        QueueFull or EngineStopped; the stream fails with TooManySessions when the turn
        would open a session past the limit."""
        session = scoped(caller.namespace, session_id) if session_id else None
        return self.engine.submit(TurnRequest(
            session, kind, value, params, ignore_eos,
            cache_scope=cache_scope(caller.namespace, cache_salt), tenant=caller.namespace))

    def end_session(self, caller: Caller, session_id: str) -> None:
        """Forgets the caller's session; SessionNotFound if it has none of that id."""
        self.engine.end_session(scoped(caller.namespace, session_id))

    def describe(self, caller: Caller, session_id: str) -> dict:
        """The caller's session: turns, history and context tokens, resident blocks."""
        return self.engine.describe(scoped(caller.namespace, session_id))

    def stats(self) -> dict:
        return self.engine.stats()

    def is_live(self) -> bool:
        return self.engine.is_live()
