"""Engine errors as gRPC status codes, with messages that say what was wrong."""

from __future__ import annotations

import logging

import grpc

from jattn.engine import EngineStopped, QueueFull, SessionNotFound, TooManySessions

log = logging.getLogger("jattn.serve")

_CODES = (
    (SessionNotFound, grpc.StatusCode.NOT_FOUND),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooManySessions, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStopped, grpc.StatusCode.UNAVAILABLE),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_of(error: Exception) -> grpc.StatusCode:
    """The status code an error of the engine calls for (INTERNAL if unexpected)."""
    return next((code for kind, code in _CODES if isinstance(error, kind)),
                grpc.StatusCode.INTERNAL)


def abort(context: grpc.ServicerContext, error: Exception):
    """Ends the call with the status `error` calls for; an unexpected error is logged
    and reported as INTERNAL without its details."""
    code = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed", exc_info=error)
        context.abort(code, "internal error (logged by the server)")
    context.abort(code, "no such session" if isinstance(error, SessionNotFound)
                  else str(error))
