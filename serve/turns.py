"""What the gRPC services share: the caller of a call, sampling parameters from a
request, and one turn's stream with cancellation when the client goes away, errors as
status codes and metrics."""

from __future__ import annotations

import time

import grpc

from jattn.engine import TurnStream
from jattn.sampling import SamplingParams
from serve.auth import authorization_of
from serve.errors import abort, status_of
from serve.metrics import Metrics
from serve.service import Caller, Service, Unauthenticated


def caller_of(service: Service, context: grpc.ServicerContext) -> Caller:
    """The call's caller; aborts it with UNAUTHENTICATED if its token is missing or
    unknown (the interceptor has refused those already: this is the namespace lookup)."""
    try:
        return service.caller(authorization_of(context.invocation_metadata()))
    except Unauthenticated as error:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))


def sampling(service: Service, request) -> SamplingParams:
    """`SamplingParams` from a request's fields, where 0 or unset means "the default"."""
    return service.sampling(
        max_tokens=request.max_tokens, temperature=getattr(request, "temperature", None),
        top_p=getattr(request, "top_p", None), top_k=getattr(request, "top_k", None),
        seed=request.seed if hasattr(request, "seed") and request.HasField("seed") else None,
        stop=tuple(getattr(request, "stop", ())),
        logprobs=request.logprobs if hasattr(request, "logprobs")
        and request.HasField("logprobs") else None)


def run_turn(metrics: Metrics, method: str, context: grpc.ServicerContext, start, *,
             interval_s: float = 0.0):
    """Runs `start()` (which submits a turn and returns its stream) and yields
    `(stream, tokens)` as tokens arrive (each time, all that have arrived, at most once
    per `interval_s` seconds after the first: a list of `StreamedToken`s), then
    `(stream, None)` once the turn has ended.
    Bad input, a full queue or a failed turn abort the call with the matching status. A
    client that cancels or disconnects cancels the turn, which frees its blocks."""
    started = time.perf_counter()
    try:
        stream: TurnStream = start()
        context.add_callback(stream.cancel)
        for tokens in stream.chunks(interval_s):
            yield stream, tokens
    except Exception as error:
        metrics.call(method, status_of(error).name)
        abort(context, error)
    metrics.call(method, "OK")
    metrics.turn(stream.result, started)
    yield stream, None
