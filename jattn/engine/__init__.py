"""The engine: the turn procedure (`turns`: reuse by content, recovery, publishing,
sessions), and serving many turns at once (`scheduler`: the request queue and
continuous batching, over `requests`' typed requests, their validation and streams,
and `encoding`'s tokenization of their input)."""

from jattn.engine.scheduler import Engine, EngineLimits
from jattn.engine.errors import (
    EngineStopped,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RecordUnavailable,
    SessionLost,
    SessionNotFound,
    TooManySessions,
)
from jattn.engine.requests import TurnRequest, TurnStream

__all__ = ["Engine", "EngineLimits", "EngineStopped", "InvalidRequest", "PromptTooLong",
           "QueueFull", "RecordUnavailable", "SessionLost", "SessionNotFound", "TooManySessions",
           "TurnRequest", "TurnStream"]
