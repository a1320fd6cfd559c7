"""jattn-serve end to end over loopback: both services, equality with the library,
concurrency, every bad input, fuzzing, shutdown, restart, TLS and token isolation."""

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jattn import LLM, StoreConfig
from jattn.block_allocator import BlockAllocator
from serve.client import Client
from serve.config import ServeConfig
from serve.protos import jattn_pb2
from serve.server import Server

MESSAGES = ["Once upon a time", "The dog ran to the park.", "Lily was happy.",
            "Then it started to rain.", "Tom found a big red ball."]


def start(**overrides):
    values = dict(port=0, http_port=0, max_tokens=256, default_max_tokens=16, num_blocks=2048,
                  hbm_bytes=1 << 26, host_bytes=1 << 26, shutdown_grace_s=5.0,
                  warm_up=False, compilation_cache_dir=None)
    values.update(overrides)
    server = Server(ServeConfig(**values)).start()
    return server, Client(f"127.0.0.1:{server.port}")


@pytest.fixture(scope="module")
def served():
    server, client = start(metrics_port=0)
    client.wait_ready()
    yield server, client
    client.close()
    server.stop()


def test_conversation_and_one_off_equal_the_library(served):
    _, client = served
    library = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    for message in MESSAGES[:3]:
        reply = client.chat("lib", message, max_tokens=20, ignore_eos=True, logprobs=2)
        expected = library.chat("lib", message, max_tokens=20, ignore_eos=True, logprobs=2)
        assert reply.token_ids == expected.token_ids and reply.text == expected.text
        assert [list(lp.top_token_ids) for lp in reply.logprobs] == \
            [[token for token, _ in lp.top] for lp in expected.logprobs]
        np.testing.assert_allclose([lp.logprob for lp in reply.logprobs],
                                   [lp.logprob for lp in expected.logprobs], atol=1e-6)
        assert reply.finish_reason == "length"
        assert reply.facts.cached_tokens == expected.cached_tokens
        assert dict(reply.facts.tier_blocks) == expected.tiers
    generated = library.generate("The cat sat on", max_tokens=24)
    responses = list(client.decode(text="The cat sat on", max_tokens=24))
    assert all(len(r.stream_content.samples) == 1 for r in responses)
    assert [t for r in responses for t in r.stream_content.samples[0].token_ids] == \
        generated.token_ids
    info = client.describe("lib")
    assert info.turns == 3 and info.history_tokens > 0
    sessions = client.stats().active_sessions
    one_off = client.chat("", text="The cat sat on", max_tokens=24)  # no session: a one-off
    assert list(one_off.token_ids) == generated.token_ids
    assert one_off.facts.cached_tokens == 0 and client.stats().active_sessions == sessions


def test_jetstream_session_continues_a_conversation(served):
    _, client = served
    first = [t for r in client.decode(text="Once upon a time", max_tokens=10,
                                      session_id="js") for t in r.stream_content.samples[0].token_ids]
    assert len(first) == 10
    assert client.describe("js").turns == 1
    list(client.decode(token_ids=[5, 6, 7], max_tokens=5, session_id="js"))
    assert client.describe("js").turns == 2
    assert client.end_session("js") and not client.end_session("js")


def test_32_sessions_5_turns_equal_single_session_runs(served):
    _, client = served
    reference = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26),
                    num_blocks=2048)
    expected = {(s, t): reference.chat(f"c{s}", MESSAGES[t], max_tokens=12,
                                       ignore_eos=True).token_ids
                for s in range(32) for t in range(5)}
    got, errors = {}, []

    def converse(s):
        try:
            for t in range(5):
                got[(s, t)] = client.chat(f"c{s}", MESSAGES[t], max_tokens=12,
                                          ignore_eos=True).token_ids
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=converse, args=(s,)) for s in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert got == expected


@pytest.mark.parametrize("call, code, pattern", [
    (lambda c: c.chat("x", ""), "INVALID_ARGUMENT", "message is empty"),
    (lambda c: c.chat("x", "a" * 100_000), "INVALID_ARGUMENT", "longer than the limit"),
    (lambda c: c.chat("x", token_ids=[1, 99999]), "INVALID_ARGUMENT", "token ids must be"),
    (lambda c: c.chat("x", "hi", temperature=-1), "INVALID_ARGUMENT", "temperature"),
    (lambda c: c.chat("x", "hi", top_p=2.0), "INVALID_ARGUMENT", "top_p"),
    (lambda c: c.chat("x", "hi", max_tokens=10_000), "INVALID_ARGUMENT", "max_tokens"),
    (lambda c: c.describe(""), "INVALID_ARGUMENT", "session_id is empty"),
    (lambda c: c.chat("x"), "INVALID_ARGUMENT", "no input"),
    (lambda c: c.describe("nobody"), "NOT_FOUND", "no such session"),
    (lambda c: list(c.decode(text="hi", max_tokens=5).__iter__()) and
     c.orchestrator.Decode(__import__("serve.protos.jetstream_pb2").protos.jetstream_pb2
                           .DecodeRequest(num_samples=3)).next(),
     "INVALID_ARGUMENT", "num_samples"),
])
def test_bad_input_gets_a_status_that_names_it(served, call, code, pattern):
    _, client = served
    with pytest.raises(grpc.RpcError) as raised:
        call(client)
    assert raised.value.code().name == code
    assert pattern in raised.value.details()
    assert client.chat("ok", "Hello", max_tokens=3).token_ids  # still serving


def test_an_internal_error_as_a_turn_begins_is_internal_and_the_server_serves_on(
        served, monkeypatch):
    """A double free while a turn begins is a bug, not bad input: gRPC INTERNAL and HTTP
    500 without its details, counted as failed (not invalid), and the server keeps
    serving with every pool block accounted for."""
    server, client = served
    allocate = BlockAllocator.allocate
    armed = []

    def allocate_then_free_twice(self, count):
        blocks = allocate(self, count)
        if armed:
            armed.pop()
            self.free(blocks)
            self.free(blocks)  # the injected bug: these blocks are free already
        return blocks

    monkeypatch.setattr(BlockAllocator, "allocate", allocate_then_free_twice)
    before = server.engine.stats()
    armed.append(True)
    with pytest.raises(grpc.RpcError) as raised:
        client.chat("double-free", "Once upon a time", max_tokens=4)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "block" not in raised.value.details()
    armed.append(True)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v1/chat/completions",
        data=json.dumps({"model": "stories260K", "max_tokens": 4, "messages": [
            {"role": "user", "content": "Once upon a time"}]}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as answered:
        urllib.request.urlopen(request, timeout=60)
    assert answered.value.code == 500
    assert json.loads(answered.value.read())["error"]["type"] == "server_error"
    assert not armed
    after = server.engine.stats()
    assert after.get("failed", 0) == before.get("failed", 0) + 2
    assert after.get("invalid", 0) == before.get("invalid", 0)
    assert client.chat("double-free", "Once upon a time", max_tokens=4).token_ids
    assert server.engine.block_census().balanced


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(session=st.text(max_size=12), kind=st.sampled_from(["message", "text", "tokens", None]),
       text=st.text(max_size=40), ids=st.lists(st.integers(-5, 600), max_size=20),
       max_tokens=st.integers(-3, 300), temperature=st.floats(allow_nan=True),
       top_p=st.floats(allow_nan=True), top_k=st.integers(-3, 50))
def test_fuzzed_requests_never_break_the_server(served, session, kind, text, ids, max_tokens,
                                                temperature, top_p, top_k):
    _, client = served
    request = jattn_pb2.ChatRequest(session_id=session, max_tokens=max_tokens,
                                    temperature=temperature, top_p=top_p, top_k=top_k)
    if kind == "tokens":
        request.token_ids.ids.extend(ids)
    elif kind is not None:
        setattr(request, kind, text)
    try:
        for _ in client.conversations.Chat(request, timeout=60):
            pass
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.RESOURCE_EXHAUSTED), error.details()


def test_health_reflection_and_metrics(served):
    server, client = served
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "jattn.v1.Conversations", "jetstream_proto.Orchestrator"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    reply = next(reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"jattn.v1.Conversations", "jetstream_proto.Orchestrator",
            "grpc.health.v1.Health"} <= names
    assert client.orchestrator.HealthCheck(
        __import__("serve.protos.jetstream_pb2").protos.jetstream_pb2.HealthCheckRequest()
    ).is_live
    client.chat("metrics", "Hello", max_tokens=4)
    page = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics.port}/metrics").read()
    assert b"jattn_time_to_first_token_seconds_count" in page and b"jattn_store_hbm_hits" in page


def test_full_queue_is_resource_exhausted():
    server, client = start(max_queue=1, max_running=1)
    calls = [client.chat_events(f"q{i}", "Once upon a time", max_tokens=200,
                                ignore_eos=True) for i in range(6)]
    codes = []
    for call in calls:
        try:
            for _ in call:
                pass
            codes.append("OK")
        except grpc.RpcError as error:
            codes.append(error.code().name)
    assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
    server.stop()


def test_stop_with_streams_in_flight_and_restart_finds_sessions(tmp_path):
    disk = dict(disk_bytes=1 << 26, disk_path=str(tmp_path), shutdown_grace_s=0.0)
    server, client = start(**disk)
    client.chat("kept", MESSAGES[0], max_tokens=40, ignore_eos=True)  # 2 full blocks
    long_call = client.chat_events("long", MESSAGES[1], max_tokens=250, ignore_eos=True)
    next(iter(long_call))  # the turn is running
    server.stop()
    events = list(long_call)  # ends: cancelled by the stop, not hung
    assert events[-1].finish_reason == "cancelled"
    client.close()

    server, client = start(**disk)
    assert client.describe("kept").turns == 1
    reply = client.chat("kept", MESSAGES[1], max_tokens=8, ignore_eos=True)
    assert reply.facts.cached_tokens > 0 and "disk" in reply.facts.tier_blocks
    server.stop()


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_pem


def test_tls_and_tokens_keep_clients_apart(tmp_path):
    cert = self_signed(tmp_path)
    server = Server(ServeConfig(port=0, http_port=0, warm_up=False, compilation_cache_dir=None,
                                tls_cert=str(tmp_path / "cert.pem"),
                                tls_key=str(tmp_path / "key.pem"),
                                auth_tokens=["token-of-alice", "token-of-bob"])).start()
    address = f"localhost:{server.port}"
    alice = Client(address, token="token-of-alice", tls_ca=cert)
    bob = Client(address, token="token-of-bob", tls_ca=cert)
    nobody = Client(address, tls_ca=cert)
    alice.chat("shared-name", "Once upon a time", max_tokens=4)
    with pytest.raises(grpc.RpcError) as raised:
        bob.describe("shared-name")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert alice.describe("shared-name").turns == 1
    with pytest.raises(grpc.RpcError) as raised:
        nobody.chat("shared-name", "hi")
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as raised:  # TLS required: plaintext is refused
        Client(address, token="token-of-alice").chat("x", "hi", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    # The HTTP API: the same certificate and tokens.
    import ssl
    import urllib.error
    import urllib.request

    https = ssl.create_default_context(cadata=cert.decode())
    models = f"https://localhost:{server.http_port}/v1/models"
    request = urllib.request.Request(models, headers={"Authorization": "Bearer token-of-bob"})
    with urllib.request.urlopen(request, context=https) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(models, context=https)
    assert refused.value.code == 401
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # no plaintext HTTP
        urllib.request.urlopen(f"http://localhost:{server.http_port}/v1/models", timeout=5)
    server.stop()


def test_sigterm_stops_jattn_serve_cleanly(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--http-port", "0",
         "--disk-bytes", "64MiB",
         "--disk-path", str(tmp_path), "--no-warm-up", "--compilation-cache-dir", ""], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    port = None
    for line in process.stdout:
        if "listening on" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    assert port, "the server did not start"
    client = Client(f"127.0.0.1:{port}")
    client.chat("s", "Once upon a time", max_tokens=40, ignore_eos=True)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert any(name.endswith(".kv") for _, _, names in os.walk(tmp_path) for name in names)


def test_chat_command_holds_a_conversation(served, monkeypatch, capsys):
    from serve.cli import main

    server, _ = served
    lines = iter(["Once upon a time", "The dog ran to the park.", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--server", f"127.0.0.1:{server.port}", "--session", "cli",
                 "--max-tokens", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 2 and "tokens reused" in out
    address = f"127.0.0.1:{server.port}"
    assert main(["describe", "cli", "--server", address]) == 0
    table = capsys.readouterr().out
    assert main(["describe", "cli", "--server", address, "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["turns"] == 2 and "turns    2\n" in table
    assert f"{described['context_tokens']:,} in the context window" in table
    assert main(["stats", "--server", address, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert main(["stats", "--server", address]) == 0
    table = capsys.readouterr().out
    assert stats["ttft_turns"] >= 2 and 0 < stats["ttft_p50_s"] <= stats["ttft_p99_s"]
    assert f"{int(stats['requests']):,} requests" in table
    assert f"{int(stats['generated_tokens']):,} generated" in table
    hbm = next(line.split() for line in table.splitlines() if line.startswith("hbm "))
    assert hbm[1] == f"{int(stats['store']['hbm_blocks']):,}"
    assert hbm[3] == f"{int(stats['store']['hbm_hits']):,}"
    assert main(["end", "nobody", "--server", address]) == 0
    assert "no such session" in capsys.readouterr().out


def test_demo_reuses_history_and_matches_recompute(monkeypatch):
    from serve.demo import run_demo

    # The demo's servers keep compiled programs in the user's cache; here that would turn
    # the persistent cache on for every later test of this process.
    monkeypatch.setattr("serve.server.use_compilation_cache", lambda directory: None)
    rows = run_demo(turns=3, max_tokens=8)
    assert all(row["same_answer"] for row in rows)
    assert rows[0]["reused_tokens"] == 0
    assert all(row["reused_tokens"] > 0 and row["tiers"] for row in rows[1:])


def test_a_server_over_8_devices_serves_the_same_tokens(served):
    _, single = served
    server, client = start(kv_parallel=8)
    for message in MESSAGES[:2]:
        want = single.chat("mesh", message, max_tokens=12, ignore_eos=True).token_ids
        assert client.chat("mesh", message, max_tokens=12, ignore_eos=True).token_ids == want
    server.stop()
