"""The engine: the turn procedure (`turns`: reuse by content, recovery, publishing,
sessions), and serving many turns at once (`scheduler`: the request queue and
continuous batching, over `requests`' typed requests and streams)."""

from jattn.engine.scheduler import Engine, EngineLimits
from jattn.engine.errors import (
    EngineStopped,
    PromptTooLong,
    QueueFull,
    SessionNotFound,
    TooManySessions,
)
from jattn.engine.requests import TurnRequest, TurnStream

__all__ = ["Engine", "EngineLimits", "EngineStopped", "PromptTooLong", "QueueFull",
           "SessionNotFound", "TooManySessions", "TurnRequest", "TurnStream"]
