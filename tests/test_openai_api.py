"""The OpenAI HTTP API, driven with the official `openai` package and raw HTTP: reuse by
content for clients that re-send the conversation, sessions equal to gRPC Chat, the error
table, concurrency, draining on SIGTERM, and malformed bodies never answered 500."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import openai
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

MODEL = "stories260K"
SYSTEM = ("You are a storyteller. You tell short tales about a cat named Tom, a dog named "
          "Max and their friends in the park.")
USER_TURNS = ["Once upon a time there was a little cat.", "What did the cat find?",
              "Then the dog came.", "How did the story end?"]


def start(**overrides) -> Server:
    values = dict(port=0, http_port=0, warm_up=False, compilation_cache_dir=None,
                  max_tokens=256, default_max_tokens=16)
    values.update(overrides)
    return Server(ServeConfig(**values)).start()


def sdk(server: Server, token: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=token,
                         max_retries=0)


def post(server: Server, path: str, body, headers=None) -> tuple[int, dict]:
    """Status and JSON body of a raw POST (`body` bytes, or JSON-able)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    return _send(request)


def _send(request) -> tuple[int, dict | bytes]:
    """Status and body: parsed if JSON, else bytes."""
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, kind, data = response.status, response.headers["content-type"], \
                response.read()
    except urllib.error.HTTPError as error:
        status, kind, data = error.code, error.headers["content-type"], error.read()
    return status, json.loads(data) if "json" in (kind or "") else data


def get(server: Server, path: str, method: str = "GET", headers=None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}",
                                     method=method, headers=headers or {})
    return _send(request)


def conversation(client: openai.OpenAI, *, stream: bool) -> list:
    """Four turns, each re-sending the whole conversation; (text, usage) per turn."""
    messages = [{"role": "system", "content": SYSTEM}]
    turns = []
    for user in USER_TURNS:
        messages.append({"role": "user", "content": user})
        if stream:
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[0].choices[0].delta.role == "assistant"
            assert chunks[-2].choices[0].finish_reason in ("stop", "length")
            usage = chunks[-1].usage
        else:
            reply = client.chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=24, temperature=0)
            text, usage = reply.choices[0].message.content, reply.usage
        turns.append((text, usage))
        messages.append({"role": "assistant", "content": text})
    return turns


@pytest.fixture(scope="module")
def without_reuse():
    server = start(store=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served():
    server = start()
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_resent_conversation_reuses_its_prefix_and_gives_the_stateless_tokens(
        served, without_reuse, stream):
    want = conversation(sdk(without_reuse), stream=stream)
    got = conversation(sdk(served), stream=stream)
    assert [text for text, _ in got] == [text for text, _ in want]
    assert all(u.prompt_tokens_details.cached_tokens == 0 for _, u in want)
    for turn, (_, usage) in enumerate(got[1:], start=2):
        cached = usage.prompt_tokens_details.cached_tokens
        assert 0 < cached <= usage.prompt_tokens, f"turn {turn} reused nothing"
        assert usage.prompt_tokens == want[turn - 1][1].prompt_tokens
        assert usage.completion_tokens == want[turn - 1][1].completion_tokens


def test_text_completions_stream_and_not(served, without_reuse):
    prompt = "Once upon a time, there was a little girl named Lily. She liked to play."
    plain = sdk(without_reuse).completions.create(model=MODEL, prompt=prompt, max_tokens=20)
    again = sdk(served).completions.create(model=MODEL, prompt=prompt, max_tokens=20)
    streamed = list(sdk(served).completions.create(model=MODEL, prompt=prompt, max_tokens=20,
                                                   stream=True))
    assert again.choices[0].text == plain.choices[0].text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text
    assert again.usage.prompt_tokens == plain.usage.prompt_tokens
    tokens = sdk(served).completions.create(model=MODEL, prompt=[1, 403, 407, 261],
                                            max_tokens=5)
    assert tokens.usage.prompt_tokens == 4 and tokens.usage.completion_tokens == 5


def test_session_mode_equals_grpc_chat(served):
    grpc_client = Client(f"127.0.0.1:{served.port}")
    http = sdk(served)
    for turn, user in enumerate(USER_TURNS):
        want = grpc_client.chat("over-grpc", user, max_tokens=20)
        got = http.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": user}], max_tokens=20,
            extra_headers={"X-Session-ID": "over-http"})
        assert got.choices[0].message.content == want.text
        if turn:
            assert got.usage.prompt_tokens_details.cached_tokens > 0
    status, info = get(served, "/v1/sessions/over-http")
    assert status == 200 and info["turns"] == len(USER_TURNS)
    assert get(served, "/v1/sessions/over-http", "DELETE")[0] == 200
    status, error = get(served, "/v1/sessions/over-http", "DELETE")
    assert status == 404 and error["error"]["type"] == "not_found_error"
    grpc_client.close()


def test_concurrent_clients_match_sequential_runs(served):
    prompts = [f"{SYSTEM} Tale number {i}: once upon a time" for i in range(32)]

    def ask(prompt):
        return sdk(served).completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                              temperature=0).choices[0].text

    sequential = [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(ask, prompts)) == sequential


def error_of(status_body, status: int, kind: str, code=None, param=None) -> dict:
    got_status, body = status_body
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == kind
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi there"}],
            "max_tokens": 4, **fields}


def test_every_error_gets_its_status_and_json(served):
    invalid = "invalid_request_error"
    error_of(post(served, "/v1/chat/completions", b"{not json"), 400, invalid)
    error_of(post(served, "/v1/chat/completions", [1, 2]), 400, invalid)
    error_of(post(served, "/v1/chat/completions", chat_body(messages=[])), 400, invalid,
             param="messages")
    error_of(post(served, "/v1/chat/completions", chat_body(temperature=-1)), 400, invalid,
             param="temperature")
    error_of(post(served, "/v1/chat/completions", chat_body(n=0)), 400, invalid, param="n")
    error_of(post(served, "/v1/chat/completions", chat_body(seed=2**64)), 400, invalid,
             param="seed")
    error_of(post(served, "/v1/chat/completions",
                  chat_body(messages=[{"role": "robot", "content": "x"}])), 400, invalid)
    error_of(post(served, "/v1/chat/completions", chat_body(stop=["s"] * 17)), 400, invalid)
    error_of(post(served, "/v1/chat/completions", chat_body(max_tokens=10**6)), 400, invalid)
    error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}), 400,
             invalid)
    error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}), 400,
             invalid, param="prompt")
    error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": [5] * 600}), 400,
             invalid, code="context_length_exceeded")
    error_of(post(served, "/v1/chat/completions", chat_body(model="gpt-9")), 404,
             "not_found_error", code="model_not_found", param="model")
    error_of(get(served, "/v1/models/gpt-9"), 404, "not_found_error")
    error_of(get(served, "/v1/no-such-route"), 404, "not_found_error")
    error_of(post(served, "/v1/chat/completions", b"x" * 100,
                  {"Content-Length": str(64 << 20)}), 413, invalid, code="body_too_large")
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        sdk(served).chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                    "content": "hi"}],
                                            frequency_penalty=0.5)
    assert get(served, "/health") == (200, {"status": "ok"})


def test_tokens_queue_and_shutdown_statuses():
    server = start(auth_tokens=["token-of-alice"], max_queue=1, max_running=1)
    try:
        assert get(server, "/health")[0] == 200  # open: for load balancers
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "x"}):
            error_of(post(server, "/v1/chat/completions", chat_body(), headers), 401,
                     "authentication_error", code="invalid_api_key")
            error_of(get(server, "/v1/models", headers=headers), 401, "authentication_error")
            error_of(get(server, "/metrics", headers=headers), 401, "authentication_error")
        alice = {"Authorization": "Bearer token-of-alice"}
        assert post(server, "/v1/chat/completions", chat_body(), alice)[0] == 200
        error_of(post(server, "/v1/chat/completions", chat_body(temperature=-1), alice), 400,
                 "invalid_request_error")
        error_of(post(server, "/v1/chat/completions", b"x", {**alice, "Content-Length":
                                                             str(64 << 20)}), 413,
                 "invalid_request_error")
        status, page = get(server, "/metrics", headers=alice)
        assert status == 200 and b"jattn_time_to_first_token_seconds_count 1.0" in page
        for code, count in (("200", 1), ("401", 3), ("400", 1), ("413", 1)):
            assert (b'jattn_requests_total{code="%s",method="chat.completions"} %d.0'
                    % (code.encode(), count)) in page, code
        assert b'jattn_requests_total{code="401",method="metrics"} 3.0' in page
        with pytest.raises(openai.AuthenticationError):
            sdk(server, "bad-token").models.list()
        long = chat_body(max_tokens=200, ignore_eos=True)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            statuses = sorted(s for s, _ in pool.map(
                lambda _: post(server, "/v1/chat/completions", long, alice), range(6)))
        assert 429 in statuses and 200 in statuses, statuses
        server.engine.shutdown()
        error_of(post(server, "/v1/chat/completions", chat_body(), alice), 503,
                 "service_unavailable_error")
        assert get(server, "/health")[0] == 503
    finally:
        server.stop()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.text(st.characters(categories=["Cs", "Ll"]), max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options", "session_id",
          "cache_salt", "logprobs", "ignore_eos", "user", "echo"]


@st.composite
def bodies(draw):
    """A mostly well-formed request body with some fields replaced by arbitrary JSON."""
    body = draw(st.sampled_from([chat_body(), {"model": MODEL, "prompt": "Once upon",
                                                "max_tokens": 3}]))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        body[field] = draw(JSON_VALUES)
    return body


@pytest.fixture(scope="module")
def fuzzed():
    server = start(max_tokens=8, default_max_tokens=4)
    yield server
    server.stop()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=bodies(),
       raw=st.one_of(st.none(), st.binary(max_size=40)))
def test_malformed_bodies_get_4xx_never_500(fuzzed, path, body, raw):
    status, answer = post(fuzzed, path, raw if raw is not None else body)
    assert status < 500, (body, answer)
    if status >= 400:
        assert answer["error"]["message"]
    assert get(fuzzed, "/health")[0] == 200


LONE = "Hi \ud800 there"  # a lone surrogate: JSON can escape it, UTF-8 cannot carry it


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": LONE}]),
     "messages[0] content"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": LONE}]}]), "messages[0] content"),
    ("/v1/completions", {"model": MODEL, "prompt": LONE, "max_tokens": 3}, "text"),
    ("/v1/chat/completions", chat_body(session_id=LONE), "session_id"),
    ("/v1/chat/completions", chat_body(cache_salt=LONE), "cache_salt"),
    ("/v1/chat/completions", chat_body(stop=[LONE]), "stop[0]"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(fuzzed, path, body, field):
    error = error_of(post(fuzzed, path, body), 400, "invalid_request_error")
    assert field in error["message"] and "surrogate" in error["message"]
    assert get(fuzzed, "/health")[0] == 200


@pytest.mark.parametrize("prompt", [[True, False], [[True]], [5, True]])
def test_booleans_are_not_token_ids(fuzzed, prompt):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3}
    error_of(post(fuzzed, "/v1/completions", body), 400, "invalid_request_error")


def chunked_post(port: int, headers: dict, total: int, chunk: int = 1 << 20) -> tuple[int, int]:
    """Sends a chunked POST of up to `total` bytes, stopping once the server answers:
    its status and how many body bytes were sent before the answer came."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = "".join(f"{name}: {value}\r\n" for name, value in {
        "Host": "x", "Content-Type": "application/json", "Transfer-Encoding": "chunked",
        **headers}.items())
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode())
    sent, piece = 0, b"%x\r\n" % chunk + b" " * chunk + b"\r\n"
    while sent < total and not select.select([sock], [], [], 0.3 if not sent else 0)[0]:
        try:
            sock.sendall(piece)
        except OSError:  # the server closed its side: its answer is waiting
            break
        sent += chunk
    answer = sock.recv(4096)
    sock.close()
    return int(answer.split()[1]), sent


def test_bodies_are_judged_by_their_headers_and_limited_as_they_stream():
    server = start(auth_tokens=["token-of-alice"])
    try:
        status, sent = chunked_post(server.http_port, {}, 64 << 20)  # no token
        assert status == 401 and sent <= 2 << 20  # answered before the body was read
        alice = {"Authorization": "Bearer token-of-alice"}
        status, sent = chunked_post(server.http_port, alice, 64 << 20)
        assert status == 413 and sent <= 24 << 20  # read up to the 16 MiB limit, no more
        assert get(server, "/health")[0] == 200
    finally:
        server.stop()


def test_a_client_that_leaves_cancels_its_non_streamed_turn(served):
    body = json.dumps(chat_body(max_tokens=256, ignore_eos=True)).encode()
    sock = socket.create_connection(("127.0.0.1", served.http_port), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.monotonic() + 30
    while served.engine.stats()["running"] == 0:
        assert time.monotonic() < deadline, "the turn never started"
        time.sleep(0.01)
    cancelled = served.engine.stats().get("cancelled", 0)
    sock.close()
    left = time.monotonic()
    while served.engine.stats()["running"]:
        time.sleep(0.01)
    assert time.monotonic() - left < 1.0
    assert served.engine.stats().get("cancelled", 0) == cancelled + 1  # not run to its end


@pytest.mark.parametrize("session", ["été-ünïcode", "team/a/b", "50% off"])
def test_every_session_id_is_reachable_over_http(served, session):
    quoted = urllib.parse.quote(session, safe="")
    status, answer = post(served, "/v1/chat/completions", chat_body(),
                          {"X-Session-ID": quoted})  # a header carries it percent-encoded
    assert status == 200 and answer["usage"]["jattn"]["durable"] is True
    status, described = get(served, f"/v1/sessions/{urllib.parse.quote(session)}")
    assert status == 200 and described["turns"] == 1
    assert get(served, f"/v1/sessions/{quoted}", method="DELETE")[0] == 200
    assert get(served, f"/v1/sessions/{quoted}")[0] == 404


def test_sigterm_drains_a_streaming_request(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--http-port", "0",
         "--no-warm-up", "--compilation-cache-dir", ""], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    port = None
    for line in process.stdout:
        if "HTTP (OpenAI API) on" in line:
            port = int(line.rsplit(":", 1)[1].split("/")[0])
            break
    assert port, "the server did not start"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="Once upon a time",
                                       max_tokens=120, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    process.send_signal(signal.SIGTERM)
    rest = list(stream)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert rest[-1].choices[0].finish_reason == "length" and text
    assert process.wait(timeout=60) == 0


def test_chat_command_over_http(served, monkeypatch, capsys):
    from serve.cli import main

    lines = iter(["Once upon a time", "The dog ran to the park.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--server", f"http://127.0.0.1:{served.http_port}", "--session",
                 "cli-http", "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2
    second = out.split("model> ")[2]
    assert "tokens reused (blocks: hbm" in second and " 0 tokens reused" not in second
    status, info = get(served, "/v1/sessions/cli-http")
    assert status == 200 and info["turns"] == 2


def test_the_dashboard_queries_only_metrics_a_server_exports(served):
    """Every metric that deploy/'s Grafana dashboard and Prometheus config name is on a
    live server's /metrics (with its store on), after a turn has been served."""
    conversation(sdk(served), stream=False)
    status, page = get(served, "/metrics")
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0] for line in page.decode().splitlines()
                if line and not line.startswith("#")}
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")
    with open(os.path.join(root, "grafana", "jattn-dashboard.json")) as f:
        dashboard = json.load(f)
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bjattn_[a-z0-9_]+", target["expr"])}
    assert len(queried) >= 20 and len(dashboard["panels"]) >= 10
    assert not queried - exported, f"the dashboard queries {sorted(queried - exported)}"
    with open(os.path.join(root, "prometheus", "prometheus.yml")) as f:
        scrape = yaml.safe_load(f)["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics"
    assert scrape["static_configs"][0]["targets"] == [f"127.0.0.1:{ServeConfig().http_port}"]


def test_logprobs_in_both_apis_streamed_and_not_equal_the_librarys(served):
    """Through the `openai` SDK: each token's log-probability and alternatives, as the
    library computes them (whose values test_logprobs checks against a float64
    reference), in OpenAI's chat and completions formats, streamed and not."""
    from jattn import LLM

    client, prompt_ids = sdk(served), [1, 403, 407, 261, 366, 300]
    library = LLM(store=None)
    want = library.generate(prompt_ids, max_tokens=6, temperature=0.8, seed=3, logprobs=4,
                            ignore_eos=True)
    library.close()
    text_of = served.llm.tokenizer.decode
    common = dict(model=MODEL, prompt=prompt_ids, max_tokens=6, temperature=0.8, seed=3,
                  logprobs=4, extra_body={"ignore_eos": True})
    whole = client.completions.create(**common).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**common, stream=True)
              if c.choices and c.choices[0].logprobs]
    streamed = {name: sum((getattr(c.logprobs, name) for c in chunks), [])
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for got in (whole.logprobs.model_dump(), streamed):
        assert got["tokens"] == [text_of([t]) for t in want.token_ids]
        np.testing.assert_allclose(got["token_logprobs"], [lp.logprob for lp in want.logprobs],
                                   atol=1e-5)
        for top, lp in zip(got["top_logprobs"], want.logprobs):
            assert top == pytest.approx({text_of([t]): v for t, v in lp.top}, abs=1e-5)
        assert got["text_offset"] == list(np.cumsum([0] + [len(t) for t in got["tokens"]])[:-1])
    messages = [{"role": "user", "content": "Tell me about a cat."}]
    chat = dict(model=MODEL, messages=messages, max_tokens=8, logprobs=True, top_logprobs=3)
    answer = client.chat.completions.create(**chat)
    content = answer.choices[0].logprobs.content
    pieces = [c.choices[0].logprobs.content[0] for c in client.chat.completions.create(
        **chat, stream=True) if c.choices and c.choices[0].logprobs]
    assert [p.model_dump() for p in pieces] == [c.model_dump() for c in content]
    assert len(content) == answer.usage.completion_tokens
    for entry in content:  # greedy: the token drawn is the most likely, listed first
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0 and sorted((t.logprob for t in entry.top_logprobs),
                                             reverse=True) == [t.logprob for t in
                                                               entry.top_logprobs]
    error_of(post(served, "/v1/chat/completions", chat_body(top_logprobs=2)), 400,
             "invalid_request_error")
    error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": "Hi", "logprobs": 6}),
             400, "invalid_request_error")


def test_n_answers_share_one_prefill_and_equal_single_requests_seeded_one_apart(served):
    """`n` = 4 with seed s: choice i equals the single request with seed s + i (the
    seeding rule), and the prompt is prefilled once: the later choices reuse its full
    blocks and compute only its last partial block (block size 16)."""
    client = sdk(served)
    prompt = [1] + np.random.default_rng(17).integers(3, 500, 39).tolist()  # 40 new tokens
    draw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.5, seed=100,
                extra_body={"ignore_eos": True})
    reply = client.completions.create(**draw, n=4)
    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == 40 and reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # (choice 0: a new prompt)
    assert reply.usage.model_extra["jattn"]["recomputed_tokens"] == 40 + 3 * (40 - 32)
    singles = [client.completions.create(**dict(draw, seed=100 + i)).choices[0].text
               for i in range(4)]
    assert [choice.text for choice in reply.choices] == singles and len(set(singles)) > 1

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "A cat and a dog."}],
                max_tokens=5, temperature=1.5, seed=7, n=2)
    whole = client.chat.completions.create(**chat)
    chunks = [c.choices[0] for c in client.chat.completions.create(**chat, stream=True)
              if c.choices]
    streamed = ["".join(c.delta.content or "" for c in chunks if c.index == i) for i in (0, 1)]
    assert streamed == [choice.message.content for choice in whole.choices]
    assert [c.index for c in chunks] == sorted(c.index for c in chunks)  # one after another
    error_of(post(served, "/v1/chat/completions", chat_body(n=2, session_id="s")), 400,
             "invalid_request_error")
    error_of(post(served, "/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 17}), 400,
             "invalid_request_error")
