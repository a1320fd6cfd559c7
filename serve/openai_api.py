"""The OpenAI HTTP API (FastAPI), a thin adapter over `serve.service.Service`.

    POST /v1/chat/completions   messages through the chat template; stream or not
    POST /v1/completions        a prompt (text or token ids); stream or not
    GET  /v1/models, /v1/models/{id}
    GET|DELETE /v1/sessions/{id}  a session's facts / forget it
    GET  /health                200 once the engine is up and warmed, else 503 (open)
    GET  /metrics               Prometheus text (needs a token when tokens are set)

Requests are stateless and reuse KV by content (the whole conversation is re-sent each
turn; `usage.prompt_tokens_details.cached_tokens` says how much of it was reused). A
`session_id` body field or an `X-Session-ID` header makes a request a turn of that
session instead: send only the new messages. `cache_salt` narrows who shares the KV.
Errors are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with
the status of `HTTP_STATUS`; malformed bodies are 400, never 500. `RequestGate` decides
authentication and the body limit before any body is read and counts every answer; a
request whose client leaves cancels its turn (`until_gone`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import urllib.parse
import uuid
from typing import Literal

import anyio
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException

from jattn.sampling import MAX_TOP_LOGPROBS
from serve.metrics import Metrics
from serve.service import Caller, ErrorKind, Service, TurnFacts, error_kind, error_message

log = logging.getLogger("jattn.serve")

MAX_BODY_BYTES = 16 << 20
DISCONNECT_POLL_S = 0.2  # how often a waiting request checks that its client is there
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit on `logprobs`
MAX_CHOICES = 16  # the most answers (`n`) one request draws

HTTP_STATUS = {
    ErrorKind.INVALID: 400,
    ErrorKind.TOO_LONG: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.SESSION_LOST: 409,
    ErrorKind.BUSY: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}
_ERROR_TYPES = {
    ErrorKind.INVALID: "invalid_request_error",
    ErrorKind.TOO_LONG: "invalid_request_error",
    ErrorKind.UNAUTHENTICATED: "authentication_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.SESSION_LOST: "invalid_request_error",
    ErrorKind.BUSY: "rate_limit_error",
    ErrorKind.UNAVAILABLE: "service_unavailable_error",
    ErrorKind.INTERNAL: "server_error",
}
_ERROR_CODES = {
    ErrorKind.TOO_LONG: "context_length_exceeded",
    ErrorKind.UNAUTHENTICATED: "invalid_api_key",
    ErrorKind.BUSY: "queue_full",
    ErrorKind.SESSION_LOST: "session_lost",
}


class ApiError(Exception):
    """An error answered as it is: `kind`, what to say, the body `param` it concerns and
    a machine-readable `code`."""

    def __init__(self, kind: ErrorKind, message: str, *, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.kind, self.param, self.code = kind, param, code


def _error_body(kind: ErrorKind, message: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES[kind], "param": param,
                      "code": code or _ERROR_CODES.get(kind)}}


def _error_response(kind: ErrorKind, message: str, param=None, code=None) -> JSONResponse:
    return JSONResponse(_error_body(kind, message, param, code), status_code=HTTP_STATUS[kind])


def _as_api_error(error: Exception) -> ApiError:
    """An engine or service error as the `ApiError` it is answered with (an unexpected
    one is logged, and answered without details)."""
    if isinstance(error, ApiError):
        return error
    kind = error_kind(error)
    if kind == ErrorKind.INTERNAL:
        log.error("HTTP request failed", exc_info=error)
    return ApiError(kind, error_message(error))


class RequestGate:
    """ASGI middleware deciding what it can from the headers, before any body is read:
    a request without a token `authenticate` accepts (every path but `/health`) is
    answered 401, one whose Content-Length passes `limit` bytes (or is not a number) 413.
    A body sent without a length (chunked) is counted as it arrives and answered 413 as
    soon as it passes `limit`: no more of it is read or kept. Every answer but `/health`'s
    and a stream's (which counts itself: it may fail after its 200) is counted,
    `count(method, status)`, whoever gave it."""

    def __init__(self, app, *, authenticate, count, limit: int = MAX_BODY_BYTES):
        self.app, self.authenticate, self.count, self.limit = app, authenticate, count, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        method = _method_of(scope["path"])
        headers = dict(scope["headers"])

        async def counted(message):
            if message["type"] == "http.response.start":
                kind = dict(message.get("headers", ())).get(b"content-type", b"")
                if not kind.startswith(b"text/event-stream"):
                    self.count(method, str(message["status"]))
            await send(message)

        refusal = None
        try:
            self.authenticate(_header_text(headers.get(b"authorization")))
        except Exception as error:
            refusal = _error_response(error_kind(error), error_message(error), None, None)
        length = headers.get(b"content-length")
        if refusal is None and length is not None and (
                not length.isdigit() or int(length) > self.limit):
            refusal = self._too_large()
        if refusal is not None:
            await refusal(scope, receive, counted)
            return
        received, answered = 0, False

        async def limited_receive():
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit and not answered:
                answered = True
                await self._too_large()(scope, receive, counted)
            return {"type": "http.disconnect"} if answered else message

        async def unless_answered(message):
            if not answered:
                await counted(message)

        await self.app(scope, limited_receive, unless_answered)

    def _too_large(self) -> JSONResponse:
        return JSONResponse(_error_body(
            ErrorKind.INVALID, f"request body over {self.limit} bytes (or a bad "
            "Content-Length)", code="body_too_large"), status_code=413)


_METHODS = {"/v1/chat/completions": "chat.completions", "/v1/completions": "completions",
            "/v1/models": "models", "/v1/sessions": "sessions", "/metrics": "metrics"}


def _method_of(path: str) -> str:
    """The method label of a request to `path` in the request metrics ("other" for an
    unknown path: labels stay few whatever clients send)."""
    for prefix, method in _METHODS.items():
        if path == prefix or path.startswith(prefix + "/"):
            return method
    return "other"


def _session_header(request: Request) -> str | None:
    """The `X-Session-ID` header: UTF-8, percent-decoded (as an id in a path is)."""
    raw = next((value for name, value in request.scope["headers"]
                if name == b"x-session-id"), None)
    return None if raw is None else urllib.parse.unquote(_header_text(raw))


def _header_text(value: bytes | None) -> str | None:
    """A header's value as text: UTF-8, as clients send it (latin-1 if it is not)."""
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


# ----- request bodies ------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _GenerationBody(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as OpenAI's servers do;
    known ones jattn does not implement are refused unless left at their defaults."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    ignore_eos: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict | None = None

    def refuse_unsupported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(ErrorKind.INVALID, f"{name} is not supported (leave it 0)",
                               param=name)
        if self.logit_bias:
            raise ApiError(ErrorKind.INVALID, "logit_bias is not supported",
                           param="logit_bias")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(ErrorKind.INVALID, "top_logprobs needs logprobs: true",
                           param="top_logprobs")

    def logprob_count(self) -> int | None:
        """How many alternatives each token's log-probabilities list; None: none."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(_GenerationBody):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]  # (true is no token id)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix"):
            if getattr(self, name):
                raise ApiError(ErrorKind.INVALID, f"{name} is not supported", param=name)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def input(self) -> tuple[str, object]:
        """("text", the prompt) or ("tokens", its ids); one prompt per request."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(ErrorKind.INVALID, f"{len(prompt)} prompts: send one per "
                               "request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return "text", prompt
        return "tokens", tuple(prompt)


# ----- the app -------------------------------------------------------------------------


def _finish_reason(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


def _usage(results: list) -> dict:
    """The usage of a request's turns (one per choice): the prompt as the first choice
    saw it, every choice's completion tokens, and jattn's facts of the first choice but
    `recomputed_tokens`, which counts every choice's prefill."""
    facts = TurnFacts.of(results[0])
    completion_tokens = sum(len(result.token_ids) for result in results)
    return {"prompt_tokens": facts.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": facts.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": facts.cached_tokens},
            "jattn": {"recomputed_tokens": sum(r.recomputed_tokens for r in results),
                      "tier_blocks": facts.tier_blocks, "ttft_s": facts.ttft_s,
                      "dropped_tokens": facts.dropped_tokens, "durable": facts.durable}}


class _Bodies:
    """The response bodies of one request: the whole answer, or its stream's chunks.
    `token_text(id)` is one token's text, for log-probabilities."""

    kind = ""  # the "object" of a whole answer; chunks add ".chunk" where OpenAI does
    chunk_kind = ""
    prefix = ""

    def __init__(self, model: str, created: int, token_text):
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.model, self.created = model, created
        self.token_text = token_text

    def _body(self, kind: str, choices: list, results: list | None = None) -> dict:
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices}
        if results is not None:
            body["usage"] = _usage(results)
        return body

    def whole(self, results: list) -> dict:
        """The answer: one choice per turn of `results`, in order."""
        choices = [self._choice(index, result.text, result, whole=True, logprobs=None
                                if result.logprobs is None else self._logprobs(index, list(
                                    zip(result.token_ids, result.logprobs))))
                   for index, result in enumerate(results)]
        return self._body(self.kind, choices, results)

    def opening(self, index: int) -> list[dict]:
        """Chunks sent before choice `index`'s first token."""
        return []

    def piece(self, token, index: int) -> dict:
        """The chunk of one `StreamedToken` of choice `index`."""
        logprobs = None if token.logprob is None else self._logprobs(
            index, [(token.id, token.logprob)])
        return self._body(self.chunk_kind, [self._choice(index, token.text,
                                                         logprobs=logprobs)])

    def _logprobs(self, index: int, tokens: list) -> dict:
        """The "logprobs" of choice `index` holding `tokens`, `(id, TokenLogprob)`
        pairs."""
        raise NotImplementedError

    def _logprob_of(self, token_id: int, logprob: float) -> dict:
        """One token's entry as OpenAI's chat API writes it (-inf as -9999.0, which
        JSON can carry)."""
        text = self.token_text(token_id)
        return {"token": text, "logprob": max(logprob, -9999.0),
                "bytes": list(text.encode("utf-8", "surrogatepass"))}

    def closing(self, result, index: int) -> dict:
        """The last chunk of choice `index`: its finish reason."""
        return self._body(self.chunk_kind, [self._choice(index, "", result)])

    def usage(self, results: list) -> dict:
        """The chunk `stream_options.include_usage` asks for: usage, no choices."""
        return self._body(self.chunk_kind, [], results)

    def _choice(self, index: int, text: str, result=None, *, whole: bool = False,
                logprobs: dict | None = None) -> dict:
        raise NotImplementedError


class ChatBodies(_Bodies):
    kind, chunk_kind, prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int) -> list[dict]:
        return [self._body(self.chunk_kind, [{"index": index, "logprobs": None,
                                              "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}])]

    def _choice(self, index: int, text: str, result=None, *, whole: bool = False,
                logprobs: dict | None = None) -> dict:
        finish = _finish_reason(result.finish_reason) if result is not None else None
        if whole:
            return {"index": index, "logprobs": logprobs, "finish_reason": finish,
                    "message": {"role": "assistant", "content": text}}
        return {"index": index, "logprobs": logprobs, "finish_reason": finish,
                "delta": {"content": text} if text or result is None else {}}

    def _logprobs(self, index: int, tokens: list) -> dict:
        return {"content": [dict(self._logprob_of(token_id, logprob.logprob), top_logprobs=[
                    self._logprob_of(other, value) for other, value in logprob.top])
                            for token_id, logprob in tokens], "refusal": None}


class CompletionBodies(_Bodies):
    kind, chunk_kind, prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, model: str, created: int, token_text):
        super().__init__(model, created, token_text)
        self._offsets: dict[int, int] = {}  # choice -> characters before its next token

    def _choice(self, index: int, text: str, result=None, *, whole: bool = False,
                logprobs: dict | None = None) -> dict:
        finish = _finish_reason(result.finish_reason) if result is not None else None
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _logprobs(self, index: int, tokens: list) -> dict:
        """The completions API's columns; `text_offset` counts from the choice's start
        (across a stream's chunks)."""
        texts = [self.token_text(token_id) for token_id, _ in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(text)
        return {"tokens": texts,
                "token_logprobs": [max(logprob.logprob, -9999.0) for _, logprob in tokens],
                "top_logprobs": [{self.token_text(other): max(value, -9999.0)
                                  for other, value in logprob.top} for _, logprob in tokens],
                "text_offset": offsets}


_END = object()


def _next_event(events):
    """The next token of a turn's iterator, or `_END` (its error raised)."""
    return next(events, _END)


def _drain(events) -> None:
    """Waits for the rest of a turn (its result holds the tokens and the text)."""
    for _ in events:
        pass


def create_app(service: Service, metrics: Metrics, *, ready, max_concurrency: int) -> FastAPI:
    """The API over `service`; `ready()` says whether the server has finished starting;
    at most `max_concurrency` turns are read at once (threads waiting for tokens)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = max_concurrency
        yield

    app = FastAPI(title="jattn", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    created = int(time.time())

    app.add_middleware(RequestGate, authenticate=service.caller, count=metrics.call)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return _error_response(error.kind, str(error), error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(where) or None
        message = first.get("msg", "invalid request body")
        return _error_response(ErrorKind.INVALID,
                               f"{param}: {message}" if param else message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        kind = ErrorKind.NOT_FOUND if error.status_code == 404 else ErrorKind.INVALID
        return JSONResponse(_error_body(kind, str(error.detail)),
                            status_code=error.status_code)

    def caller(authorization: str | None = Header(None)) -> Caller:
        try:
            return service.caller(authorization)
        except Exception as error:
            raise _as_api_error(error) from None

    async def in_thread(function, *args):
        """`function(*args)` on a worker thread (it may wait for the engine); its
        error as an `ApiError`."""
        try:
            return await anyio.to_thread.run_sync(function, *args)
        except Exception as error:
            raise _as_api_error(error) from None

    async def until_gone(request: Request, streams: list, function, *args):
        """`in_thread(function, *args)`, cancelling `streams` if the client leaves
        meanwhile (checked every `DISCONNECT_POLL_S`): their turns then end at the
        engine's next step, and `function` with them."""
        outcome = {}

        async def watch():
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            for stream in streams:
                stream.cancel()

        async def run():
            try:
                outcome["value"] = await in_thread(function, *args)
            except ApiError as error:
                outcome["error"] = error
            group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            group.start_soon(run)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def check_model(model: str) -> None:
        if model != service.model_name:
            raise ApiError(ErrorKind.NOT_FOUND, f"model {model!r} is not served here (this "
                           f"server serves {service.model_name!r})", param="model",
                           code="model_not_found")

    async def run(body: _GenerationBody, request: Request, who: Caller, kind: str, value,
                  method: str, bodies: "_Bodies") -> Response:
        """Submits the turn and answers, with the response bodies `bodies` builds: the
        whole turn as JSON once it ends, or SSE chunks from its first token on. With
        `n` > 1 the first choice's turn runs first; the others then run together, each
        reusing the prompt's blocks that the first computed (the prompt is prefilled
        once), choice i with seed `seed + i` when a seed is given."""
        started = time.perf_counter()
        session = body.session_id or _session_header(request) or None
        try:
            check_model(body.model)
            body.refuse_unsupported()
            if body.n > 1 and session:
                raise ApiError(ErrorKind.INVALID, f"n={body.n}: a session's turn takes one "
                               "answer; ask for several without a session", param="n")
            try:
                params = service.sampling(
                    max_tokens=getattr(body, "max_completion_tokens", None) or body.max_tokens,
                    temperature=body.temperature, top_p=body.top_p,
                    top_k=max(body.top_k or 0, 0), seed=body.seed, stop=body.stops(),
                    logprobs=body.logprob_count())
            except Exception as error:
                raise _as_api_error(error) from None

            def start(choice: int):
                """Submits choice `choice`'s turn (its seed the request's plus `choice`)."""
                seed = None if params.seed is None else (params.seed + choice) % 2**64
                try:
                    return service.start_turn(
                        who, session_id=session, kind=kind, value=value,
                        params=dataclasses.replace(params, seed=seed),
                        ignore_eos=body.ignore_eos, cache_salt=body.cache_salt or "")
                except Exception as error:
                    raise _as_api_error(error) from None

            streams = [start(0)]
            events = iter(streams[0])
            first = await until_gone(request, streams, _next_event, events)
            if streams[0].result is None:
                raise ApiError(ErrorKind.UNAVAILABLE, "the turn was cancelled before it "
                               "started (the server is shutting down)")
            if not body.stream:
                await until_gone(request, streams, _drain, events)
                streams += [start(choice) for choice in range(1, body.n)]
                for stream in streams[1:]:
                    await until_gone(request, streams, _drain, iter(stream))
        except ApiError:
            raise  # (counted by the gate, with every other answer that is not a stream)
        if not body.stream:
            for stream in streams:
                metrics.turn(stream.result, started)
            return JSONResponse(bodies.whole([stream.result for stream in streams]))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse():
            token, finished = first, False
            try:
                for choice in range(body.n):
                    if choice == 1:  # the first has published the prompt's blocks
                        streams.extend(start(later) for later in range(1, body.n))
                    stream = streams[choice]
                    tokens = events if choice == 0 else iter(stream)  # (0's first is read)
                    if choice:
                        token = await anyio.to_thread.run_sync(_next_event, tokens)
                    for opening in bodies.opening(choice):
                        yield _sse(opening)
                    while token is not _END:
                        yield _sse(bodies.piece(token, choice))
                        token = await anyio.to_thread.run_sync(_next_event, tokens)
                    metrics.turn(stream.result, started)
                    yield _sse(bodies.closing(stream.result, choice))
                finished = True
                metrics.call(method, "200")
                if include_usage:
                    yield _sse(bodies.usage([stream.result for stream in streams]))
            except Exception as error:  # a turn failed after the stream began
                error = _as_api_error(error)
                metrics.call(method, str(HTTP_STATUS[error.kind]))
                yield _sse(_error_body(error.kind, str(error)))
            finally:
                if not finished:
                    for stream in streams:
                        stream.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request,
                               who: Caller = Depends(caller)):
        messages = tuple((m.role, m.text()) for m in body.messages)
        return await run(body, request, who, "messages", messages, "chat.completions",
                         ChatBodies(body.model, created, service.token_text))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request,
                          who: Caller = Depends(caller)):
        kind, value = body.input()
        return await run(body, request, who, kind, value, "completions",
                         CompletionBodies(body.model, created, service.token_text))

    def model_card() -> dict:
        return {"id": service.model_name, "object": "model", "created": created,
                "owned_by": "jattn"}

    @app.get("/v1/models")
    async def models(who: Caller = Depends(caller)):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, who: Caller = Depends(caller)):
        check_model(model)
        return model_card()

    @app.get("/v1/sessions/{session_id:path}")
    async def describe_session(session_id: str, who: Caller = Depends(caller)):
        info = await in_thread(service.describe, who, session_id)
        return dict(info, session_id=session_id)

    @app.delete("/v1/sessions/{session_id:path}")
    async def end_session(session_id: str, who: Caller = Depends(caller)):
        await in_thread(service.end_session, who, session_id)
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/health")
    async def health():
        if ready() and service.is_live():
            store = service.stats().get("store", {})
            if store.get("remote_tier_enabled"):
                return {"status": "ok", "remote_tier": "available"
                        if store.get("remote_available") else "unavailable"}
            return {"status": "ok"}
        return _error_response(ErrorKind.UNAVAILABLE, "not serving (starting, stopping "
                               "or the engine has stopped)")

    @app.get("/metrics")
    async def prometheus(who: Caller = Depends(caller)):
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
