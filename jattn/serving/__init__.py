"""Serving many conversations at once: the request queue and continuous batching."""

from jattn.serving.engine import Engine, EngineLimits
from jattn.serving.requests import (
    EngineStopped,
    QueueFull,
    SessionNotFound,
    TooManySessions,
    TurnRequest,
    TurnStream,
)

__all__ = ["Engine", "EngineLimits", "EngineStopped", "QueueFull", "SessionNotFound",
           "TooManySessions", "TurnRequest", "TurnStream"]
