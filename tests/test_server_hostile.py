"""jattn-serve against a hostile client: every RPC's authentication, every field of every
request fuzzed (extreme ints, NaN/inf, huge strings, invalid UTF-8), seeds past 2**63,
turns that fail inside the engine, an engine thread that dies, client-chosen names of
one-off sessions, and a burst of turns on tiny budgets that must not leak a block."""

import threading
import time

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_references import reference_cases
from serve.client import Client
from serve.config import ServeConfig
from serve.protos import jattn_pb2, jetstream_pb2
from serve.server import Server

GOOD, WRONG = "token-of-alice", "token-of-mallory"
# The statuses a client's own mistake may get (docs/failure_model.md).
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED}


def start(**overrides) -> Server:
    values = dict(port=0, http_port=0, max_tokens=64, default_max_tokens=8, num_blocks=256,
                  hbm_bytes=1 << 22, host_bytes=1 << 22, shutdown_grace_s=2.0,
                  warm_up=False, compilation_cache_dir=None)
    values.update(overrides)
    return Server(ServeConfig(**values)).start()


def services():
    """Every (full method name, request type, response streams?) of every service the
    server offers, from the descriptors, so a new RPC cannot be left out."""
    from grpc_reflection.v1alpha import reflection_pb2

    files = (jattn_pb2.DESCRIPTOR, jetstream_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR,
             reflection_pb2.DESCRIPTOR)
    return [(f"/{service.full_name}/{method.name}", method.input_type,
             method.client_streaming, method.server_streaming)
            for file in files for service in file.services_by_name.values()
            for method in service.methods]


def call_raw(channel, method, request: bytes, *, client_streaming, server_streaming,
             metadata=(), timeout=30):
    """Calls `method` with serialized `request` bytes; returns the status code."""
    kind = ("stream" if client_streaming else "unary") + "_" + \
        ("stream" if server_streaming else "unary")
    stub = getattr(channel, kind)(method)
    argument = iter([request]) if client_streaming else request
    try:
        reply = stub(argument, metadata=list(metadata), timeout=timeout)
        if server_streaming:
            for _ in reply:
                if method.endswith("/Watch"):  # the health watch streams forever
                    reply.cancel()
                    break
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_every_rpc_needs_a_token_but_health():
    server = start(auth_tokens=[GOOD, "token-of-bob"])
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    seen = set()
    for method, _, client_streaming, server_streaming in services():
        seen.add(method)
        codes = {name: call_raw(channel, method, b"", client_streaming=client_streaming,
                                server_streaming=server_streaming, metadata=metadata)
                 for name, metadata in (("none", ()),
                                        ("wrong", [("authorization", f"Bearer {WRONG}")]),
                                        ("basic", [("authorization", f"Basic {GOOD}")]),
                                        ("good", [("authorization", f"Bearer {GOOD}")]))}
        if method.startswith("/grpc.health.v1.Health/"):  # open: the same for everyone
            assert len(set(codes.values())) == 1, (method, codes)
            assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), (method, codes)
            continue
        assert codes["none"] == codes["wrong"] == codes["basic"] == \
            grpc.StatusCode.UNAUTHENTICATED, (method, codes)
        assert codes["good"] != grpc.StatusCode.UNAUTHENTICATED, (method, codes)
    assert {"/jattn.v1.Conversations/Chat", "/jattn.v1.Conversations/ServerStats",
            "/jetstream_proto.Orchestrator/Decode",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} <= seen
    # A one-off Chat (no session id) is refused like any other call.
    one_off = jattn_pb2.ChatRequest(text="Once upon a time", max_tokens=4)
    assert call_raw(channel, "/jattn.v1.Conversations/Chat", one_off.SerializeToString(),
                    client_streaming=False, server_streaming=True) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert Client(f"127.0.0.1:{server.port}", token=GOOD).chat(
        "", text="Once upon a time", max_tokens=4).token_ids
    assert server.engine.stats()["requests"] == 1  # only the authenticated one ran
    page = server.metrics.exposition().decode()  # every refusal counted, by method
    assert 'jattn_requests_total{code="UNAUTHENTICATED",method="Chat"} 4.0' in page
    assert 'jattn_requests_total{code="UNAUTHENTICATED",method="ServerStats"} 3.0' in page
    channel.close()
    server.stop()


# ----- fuzzing every field of every request message ----------------------------------

_INT_RANGES = {
    pb_descriptor.FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1e-50, 1e-45, 1e308, float("nan"),
                                     float("inf"), -float("inf"), 1.0, 0.5]))


def _scalar(field):
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        edges = [low, high, 0, 1] + ([-1] if low < 0 else [2**31, 2**32 - 1])
        return st.one_of(st.integers(low, high), st.sampled_from(edges))
    if field.type in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return _FLOATS
    if field.type == field.TYPE_BOOL:
        return st.booleans()
    if field.type == field.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["", "\x00one-off-0", "\x00",
                                                                "x" * 5000, "é" * 300_000]))
    raise AssertionError(f"no strategy for {field.full_name}")


@st.composite
def messages(draw, descriptor, depth=0):
    """A message of type `descriptor` with any subset of its fields set to any value."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == field.TYPE_MESSAGE:
            if depth > 2 or field.message_type.GetOptions().map_entry:
                continue
            values = draw(st.lists(messages(field.message_type, depth + 1), max_size=2)
                          if field.is_repeated
                          else messages(field.message_type, depth + 1).map(lambda m: [m]))
            for value in values:
                if field.is_repeated:
                    getattr(message, field.name).add().CopyFrom(value)
                else:
                    getattr(message, field.name).CopyFrom(value)
        elif field.is_repeated:
            values = draw(st.lists(_scalar(field), max_size=20))
            if field.type == field.TYPE_STRING:
                values = values[:20]
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, draw(_scalar(field)))
    return message


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string_paths(descriptor, depth=0):
    """Field-number paths to every string field (through nested messages)."""
    for field in descriptor.fields:
        if field.type == field.TYPE_STRING:
            yield (field.number,)
        elif field.type == field.TYPE_MESSAGE and depth < 2 and \
                not field.message_type.GetOptions().map_entry:
            for path in _string_paths(field.message_type, depth + 1):
                yield (field.number,) + path


def invalid_utf8(path, payload: bytes) -> bytes:
    """Wire bytes that set the string field at `path` to `payload` (not UTF-8):
    appended to a message, they override that field."""
    data = payload
    for number in reversed(path):
        data = _varint(number << 3 | 2) + _varint(len(data)) + data
    return data


FUZZED = [(method, descriptor, cs, ss) for method, descriptor, cs, ss in services()
          if method.split("/")[1] in ("jattn.v1.Conversations", "jetstream_proto.Orchestrator")]


@pytest.fixture(scope="module")
def open_server():
    server = start(max_queue=8, max_running=4, max_prompt_tokens=256)
    yield server
    server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_fields_of_every_request_get_ok_or_a_client_error(open_server, data):
    channel = grpc.insecure_channel(f"127.0.0.1:{open_server.port}",
                                    options=[("grpc.max_send_message_length", 1 << 24)])
    method, descriptor, client_streaming, server_streaming = data.draw(st.sampled_from(FUZZED))
    message = data.draw(messages(descriptor))
    if "max_tokens" in descriptor.fields_by_name and 16 < message.max_tokens <= 64:
        message.max_tokens = 16  # long answers within the limit only cost time
    request = message.SerializeToString()
    paths = list(_string_paths(descriptor))
    if paths and data.draw(st.booleans()):
        request += invalid_utf8(data.draw(st.sampled_from(paths)),
                                data.draw(st.sampled_from([b"\xff", b"ok\xc3", b"\xed\xa0\x80",
                                                           b"\xc0\xaf", b"a\x80b"])))
    code = call_raw(channel, method, request, client_streaming=client_streaming,
                    server_streaming=server_streaming, timeout=60)
    channel.close()
    assert code == grpc.StatusCode.OK or code in CLIENT_ERRORS, (method, message, code)


def test_invalid_utf8_is_invalid_argument_and_the_server_still_serves(open_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{open_server.port}")
    request = jattn_pb2.ChatRequest(session_id="u", max_tokens=3).SerializeToString() + \
        invalid_utf8((2,), b"hello \xff")
    chat = channel.unary_stream("/jattn.v1.Conversations/Chat")
    with pytest.raises(grpc.RpcError) as raised:
        list(chat(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in raised.value.details() and "Chat" in raised.value.details()
    channel.close()
    reference_tokens_still_come(open_server)


def reference_tokens_still_come(server):
    """A normal one-off turn gives transformers' greedy tokens."""
    case = reference_cases("stories260K")[1]
    client = Client(f"127.0.0.1:{server.port}")
    reply = client.chat("", token_ids=case["prompt_ids"], max_tokens=16, ignore_eos=True)
    client.close()
    assert list(reply.token_ids) == case["greedy_ids"][:16]


def test_after_the_fuzz_a_turn_gives_the_reference_tokens(open_server):
    reference_tokens_still_come(open_server)
    assert open_server.engine.block_census().balanced


# ----- the engine never dies from a request ---------------------------------------------

def test_seed_past_2_63_samples_and_the_engine_lives(open_server):
    client = Client(f"127.0.0.1:{open_server.port}")
    replies = [client.chat("", text="Once upon a time", max_tokens=8, temperature=1.0,
                           seed=seed, ignore_eos=True).token_ids
               for seed in (2**63, 2**63, 2**64 - 1)]
    assert replies[0] == replies[1] and len(replies[2]) == 8
    assert open_server.engine.is_live()
    client.close()
    reference_tokens_still_come(open_server)


def test_a_turn_that_fails_in_the_engine_fails_alone(open_server, monkeypatch):
    chats = open_server.engine.chats
    real = chats.run

    def broken(plan):
        if any(segment.tokens[-3:] == (7, 8, 9) for segment in plan.segments):
            raise RuntimeError("a kernel fault")
        return real(plan)

    monkeypatch.setattr(chats, "run", broken)
    client = Client(f"127.0.0.1:{open_server.port}")
    with pytest.raises(grpc.RpcError) as raised:
        client.chat("doomed", token_ids=[5, 6, 7, 8, 9], max_tokens=4)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "kernel fault" not in raised.value.details()  # internals stay in the log
    monkeypatch.setattr(chats, "run", real)
    assert open_server.engine.is_live()
    assert open_server.engine.block_census().balanced
    client.close()
    reference_tokens_still_come(open_server)


class _Fatal(BaseException):
    """Stands for whatever might end the engine's thread."""


def test_a_dead_engine_says_not_serving_fails_fast_and_stops():
    server = start()
    client = Client(f"127.0.0.1:{server.port}")
    client.chat("before", "Once upon a time", max_tokens=2)
    held = client.chat_events("held", "Once upon a time", max_tokens=60, ignore_eos=True)
    next(iter(held))  # a turn is running

    def die(*args, **kwargs):
        raise _Fatal("the engine's thread ends")

    server.engine.chats.begin = die  # the next turn to begin ends the thread
    waiting = client.chat_events("waiting", "Once upon a time", max_tokens=4)
    with pytest.raises(grpc.RpcError) as raised:
        list(waiting)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as raised:
        list(held)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "jattn.v1.Conversations"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
    started = time.perf_counter()
    for call in (lambda: client.chat("after", "Hi", max_tokens=2),
                 lambda: client.describe("before")):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.perf_counter() - started < 5  # fast, not at the deadline
    assert not client.orchestrator.HealthCheck(jetstream_pb2.HealthCheckRequest(),
                                               metadata=client.metadata).is_live
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() hung after the engine died"
    client.close()


# ----- one-offs live where no client can name them ------------------------------------

def test_a_client_cannot_name_a_one_off_session():
    server = start()
    client = Client(f"127.0.0.1:{server.port}")
    prompt = "Once upon a time"
    first = client.chat("", text=prompt, max_tokens=12, ignore_eos=True).token_ids
    for number in range(4):  # the names earlier versions gave one-offs
        client.chat(f"\x00one-off-{number}", text="The dog ran to the park and then",
                    max_tokens=12, ignore_eos=True)
    again = client.chat("", text=prompt, max_tokens=12, ignore_eos=True)
    assert again.token_ids == first and again.facts.cached_tokens == 0
    client.close()
    server.stop()


# ----- no block leaks under pressure ----------------------------------------------------

def test_a_burst_on_tiny_budgets_leaks_no_block(tmp_path):
    """20 clients x 5 turns with a 64-block pool, 512 KiB of host memory and 1 MiB of
    disk: turns run, wait for blocks, recompute lost blocks, replay truncated histories
    and are refused; afterwards every block is free or held by the device tier (within
    its 64 KiB: 3 blocks), and a prompt as long as the pool allows still runs."""
    server = start(num_blocks=64, max_context=256, max_running=8, hbm_bytes=1 << 16,
                   host_bytes=512 << 10, disk_bytes=1 << 20, disk_path=str(tmp_path),
                   max_tokens=64)
    errors = []

    def converse(c):
        client = Client(f"127.0.0.1:{server.port}")
        for turn in range(5):
            try:
                client.chat(f"burst{c}", "Once upon a time there was a dog " * (1 + turn % 3),
                            max_tokens=24, ignore_eos=True)
            except grpc.RpcError as error:
                errors.append(error.code())
        client.close()

    threads = [threading.Thread(target=converse, args=(c,)) for c in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(errors) <= CLIENT_ERRORS, errors
    census = server.engine.block_census()
    assert census.balanced and census.in_flight == 0, census
    client = Client(f"127.0.0.1:{server.port}")
    for c in range(20):
        client.end_session(f"burst{c}")
    census = server.engine.block_census()
    # Ended sessions leave only cached blocks, within the device tier's budget.
    assert census.balanced and census.in_flight == 0 and census.resident <= 3, census
    long = client.chat("", token_ids=[5] * 180, max_tokens=40, ignore_eos=True)
    assert len(long.token_ids) == 40
    client.close()
    server.stop()
