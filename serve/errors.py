"""Errors as gRPC status codes (the HTTP table is in `serve.openai_api`), with messages
that say what was wrong."""

from __future__ import annotations

import logging

import grpc

from serve.service import ErrorKind, error_kind, error_message

log = logging.getLogger("jattn.serve")

GRPC_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TOO_LONG: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.SESSION_LOST: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(error: Exception) -> grpc.StatusCode:
    """The status code an error calls for (INTERNAL if unexpected)."""
    return GRPC_STATUS[error_kind(error)]


def abort(context: grpc.ServicerContext, error: Exception):
    """Ends the call with the status `error` calls for; an unexpected error is logged
    and reported as INTERNAL without its details."""
    code = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("request failed", exc_info=error)
    context.abort(code, error_message(error))
