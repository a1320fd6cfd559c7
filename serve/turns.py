"""One turn for one gRPC call: sampling parameters from the request, the engine's
stream, cancellation when the client goes away, errors as status codes, metrics."""

from __future__ import annotations

import time

import grpc

from jattn.sampling import SamplingParams
from jattn.engine import Engine, TurnStream
from serve.errors import abort, status_of
from serve.metrics import Metrics


def sampling(request, *, default_max_tokens: int) -> SamplingParams:
    """`SamplingParams` from a request's fields, where 0 means "the default"."""
    return SamplingParams(
        max_tokens=request.max_tokens or default_max_tokens,
        temperature=getattr(request, "temperature", 0.0),
        top_p=getattr(request, "top_p", 0.0) or 1.0,
        top_k=getattr(request, "top_k", 0),
        seed=request.seed if hasattr(request, "seed") and request.HasField("seed") else None,
        stop=tuple(getattr(request, "stop", ())))


def run_turn(engine: Engine, metrics: Metrics, method: str, context: grpc.ServicerContext,
             build_request):
    """Submits `build_request()` and yields `(stream, token)` as tokens arrive, then
    `(stream, None)` once the turn has ended. Bad input, a full queue or a failed turn
    abort the call with the matching status. A client that cancels or disconnects
    cancels the turn, which frees its blocks."""
    started = time.perf_counter()
    try:
        stream: TurnStream = engine.submit(build_request())
        context.add_callback(stream.cancel)
        for token in stream:
            yield stream, token
    except Exception as error:
        metrics.call(method, status_of(error).name)
        abort(context, error)
    metrics.call(method, "OK")
    metrics.turn(stream.result, started)
    yield stream, None
