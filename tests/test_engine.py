"""The serving engine: many conversations at once give the tokens of one at a time;
cancellation, limits and shutdown."""

import contextlib
import logging
import threading
import time

import jax
import numpy as np
import pytest

from jattn import LLM, StoreConfig
from jattn.sampling import SamplingParams
from jattn.engine import (Engine, EngineLimits, InvalidRequest, QueueFull, SessionNotFound,
                          TooManySessions, TurnRequest)
from jattn.engine.session_table import SessionTable
from jattn.model.compile_queue import THREAD_NAME

MESSAGES = ["Once upon a time", "The dog ran to the park.", "Lily was happy.",
            "Then it started to rain."]
GREEDY = SamplingParams(max_tokens=24)


def store():
    return StoreConfig(hbm_bytes=10**8, host_bytes=10**8)


def turn(session, message, params=GREEDY, kind="message"):
    return TurnRequest(session, kind, message, params, ignore_eos=True)


@pytest.fixture(scope="module")
def alone():
    """Each session's answers, one turn at a time, without a store."""
    llm = LLM(store=None)
    return {(s, t): llm.chat(f"s{s}", MESSAGES[t], max_tokens=24, ignore_eos=True).token_ids
            for s in range(8) for t in range(len(MESSAGES))}


def test_concurrent_sessions_equal_one_at_a_time(alone):
    engine = LLM(store=store(), num_blocks=512).start_engine(EngineLimits(max_running=8))
    answers, errors = {}, []

    def client(s):
        try:
            for t, message in enumerate(MESSAGES):
                stream = engine.submit(turn(f"s{s}", message))
                answers[(s, t)] = [token.id for token in stream]
                assert stream.result.token_ids == answers[(s, t)]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert answers == alone
    stats = engine.stats()
    assert stats["completed"] == 32 and stats["tokens_reused"] > 0
    assert engine.describe("s3")["turns"] == len(MESSAGES)
    engine.shutdown()


@pytest.mark.parametrize("prefill_seqs", [1, 8])
def test_turns_arriving_together_prefill_together_and_equal_alone(prefill_seqs):
    """Eight one-offs submitted at once, with prompts longer and shorter than a step's
    token budget: packed steps (several prompts' chunks per step, beside the decodes)
    give each the tokens it gets alone; `max_prefill_seqs=1` prefills one per step."""
    rng = np.random.default_rng(prefill_seqs)
    prompts = [rng.integers(3, 512, size=n).tolist() for n in (5, 70, 33, 1, 130, 16, 64, 9)]
    sequential = LLM(store=None, prefill_chunk=64)
    alone = [sequential.generate(p, max_tokens=6, ignore_eos=True).token_ids for p in prompts]
    engine = LLM(store=None, prefill_chunk=64).start_engine(
        EngineLimits(max_running=8, max_prefill_seqs=prefill_seqs))
    streams = [engine.submit(TurnRequest(None, "tokens", tuple(p), SamplingParams(max_tokens=6),
                                         ignore_eos=True)) for p in prompts]
    assert [[token.id for token in stream] for stream in streams] == alone
    stats = engine.stats()
    engine.shutdown()
    assert stats["prefill_chunks"] >= len(prompts)
    if prefill_seqs == 1:
        assert stats["prefill_chunks"] == stats["prefill_steps"]
    else:  # at least the first step packs every prompt that fits its budget
        assert stats["prefill_chunks"] >= stats["prefill_steps"] + 4


def test_one_off_equals_a_stateless_generation_and_leaves_nothing():
    expected = LLM(store=None).generate("The cat sat", max_tokens=30,
                                        ignore_eos=True).token_ids
    llm = LLM(store=store())
    engine = llm.start_engine()
    one_off = turn(None, "The cat sat", SamplingParams(max_tokens=30), "text")
    assert [t.id for t in engine.submit(one_off)] == expected  # publishes its blocks
    free = engine.block_census().free
    stream = engine.submit(one_off)
    assert [t.id for t in stream] == expected
    assert engine.block_census().free == free and engine.stats()["sessions"] == 0
    engine.shutdown()


def test_cancel_frees_blocks_and_keeps_the_history():
    llm = LLM(store=store(), num_blocks=256)
    engine = llm.start_engine()
    list(engine.submit(turn("a", MESSAGES[0])))
    before = engine.describe("a")
    free = engine.block_census().free
    stream = engine.submit(turn("a", MESSAGES[1], SamplingParams(max_tokens=400)))
    first = next(iter(stream))
    stream.cancel()
    rest = list(stream)
    assert first.id is not None and len(rest) < 399
    assert stream.result.finish_reason == "cancelled"
    assert engine.describe("a")["history_tokens"] == before["history_tokens"]
    assert engine.block_census().free >= free - 4  # only resident context blocks
    assert engine.stats()["cancelled"] == 1
    engine.shutdown()


def test_each_tenant_holds_its_share_of_sessions_and_idle_ones_expire():
    llm = LLM(store=None, num_blocks=256)  # (an engine's shutdown closes a store)
    short = SamplingParams(max_tokens=2)

    def run(engine, session, tenant, message=MESSAGES[0]):
        return list(engine.submit(TurnRequest(session, "message", message, short,
                                              tenant=tenant)))

    shares = Engine(llm.chats, EngineLimits(max_sessions_per_tenant=2))
    run(shares, "a1", "alice")
    run(shares, "a2", "alice")
    with pytest.raises(TooManySessions, match="limit per tenant"):
        run(shares, "a3", "alice")
    run(shares, "b1", "bob")  # another tenant's first session is not kept out
    run(shares, "a1", "alice", MESSAGES[1])  # a session alice holds takes more turns
    shares.end_session("a2")
    run(shares, "a3", "alice")  # ended: its place is free
    shares.shutdown()

    # Another engine over the same (compiled) model: the turns take well under a second.
    expiring = Engine(llm.chats, EngineLimits(max_sessions_per_tenant=1, session_idle_s=1))
    run(expiring, "x", "carol")
    started = time.monotonic()
    while expiring.stats().get("expired_sessions", 0) < 1:
        assert time.monotonic() - started < 10, expiring.stats()
        time.sleep(0.05)
    assert time.monotonic() - started >= 0.9  # not before its time
    with pytest.raises(SessionNotFound):  # ended as EndSession would
        expiring.describe("x")
    run(expiring, "y", "carol")  # its place in carol's share is free
    expiring.shutdown()


def test_the_session_table_expires_idle_sessions_only():
    table = SessionTable(per_tenant=2, idle_s=10)
    table.touch("a", "t", now=0.0)
    table.touch("b", "t", now=5.0)
    assert table.next_expiry(6.0) == 4.0
    assert table.expired(9.9, in_use=set()) == []
    assert table.expired(12.0, in_use={"a"}) == []  # a turn of it waits or runs
    assert table.expired(12.0, in_use=set()) == ["a"] and table.count("t") == 1
    table.touch("b", "t", now=11.0)  # active again
    assert table.expired(16.0, in_use=set()) == [] and table.next_expiry(16.0) == 5.0
    table.touch("c", "t", now=16.0)
    with pytest.raises(TooManySessions):
        table.admit("d", "t", held=lambda session: True)
    table.admit("d", "t", held=lambda session: session != "c")  # c was forgotten since
    assert table.count("t") == 1
    assert SessionTable(per_tenant=1).expired(1e9, in_use=set()) == []  # no expiry


@pytest.mark.parametrize("request_, pattern", [
    (turn("a", ""), "message is empty"),
    (turn("a", (), kind="tokens"), "tokens is empty"),
    (turn("a", (5, 99999), kind="tokens"), r"token ids must be integers in \[0, 512\)"),
    (turn("a", "hi", SamplingParams(max_tokens=5000)), "max_tokens 5000 is more than"),
    (turn("", "hi"), "session_id must be a non-empty string"),
    (TurnRequest("a", "audio", "hi", GREEDY), "input kind must be one of"),
])
def test_bad_requests_are_refused_by_name(request_, pattern):
    engine = LLM(store=None).start_engine(EngineLimits(max_tokens=1000))
    with pytest.raises(InvalidRequest, match=pattern):
        engine.submit(request_)
    assert [t.id for t in engine.submit(turn("b", "Hello"))]  # still serving
    with pytest.raises(SessionNotFound):
        engine.describe("nobody")
    engine.shutdown()


def test_full_queue_and_shutdown_with_turns_in_flight():
    engine = LLM(store=store(), num_blocks=512).start_engine(
        EngineLimits(max_queue=2, max_running=1))
    streams = []
    with pytest.raises(QueueFull):
        for s in range(10):
            streams.append(engine.submit(turn(f"q{s}", MESSAGES[0])))
    engine.shutdown()
    for stream in streams:  # every accepted turn ran to its end
        assert len(list(stream)) == 24


@pytest.fixture(scope="module")
def warming():
    """An engine just warmed up on one device (4 turns a step, steps of up to 64
    tokens): only its 8-token packed step and the saves' copies are compiled; the 16-,
    32- and 64-token steps and the steps taking KV from host memory compile in the
    background. Every block saved goes to host memory (no device tier). The dict
    keeps the long prompt's answer from one test to the next."""
    llm = LLM(store=StoreConfig(hbm_bytes=0, host_bytes=10**8), max_context=128,
              prefill_chunk=64, max_running=4)
    engine = llm.start_engine(EngineLimits(max_running=4), warm_up=True)
    yield llm, engine, {}
    engine.shutdown()


LONG_PROMPT = tuple(range(3, 103))
"""100 tokens: more than the first packed step takes."""


@contextlib.contextmanager
def compilations(caplog):
    """The XLA compilations logged meanwhile (`jax_log_compiles`): a list of log
    records, filled when the block ends."""
    compiled = []
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            yield compiled
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled += [r for r in caplog.records if r.getMessage().startswith("Compiling")]


def on_request_path(records) -> list[str]:
    """The compilations of `records` not made by the background compilation."""
    return [r.getMessage()[:160] for r in records if r.threadName != THREAD_NAME]


def generate_long_prompt(engine):
    stream = engine.submit(TurnRequest(None, "tokens", LONG_PROMPT, GREEDY, ignore_eos=True))
    for _ in stream:
        pass
    return stream.result


def test_before_the_background_compilation_a_long_prompt_runs_in_small_steps(warming, caplog):
    """Right after the warm-up, a prompt longer than the compiled steps is cut into
    chunks they take, recomputes rather than loading from the store, and compiles
    nothing on its path."""
    llm, engine, answers = warming
    assert llm.chats.step_tokens == 8 and not llm.runner.arrivals_ready
    with compilations(caplog) as compiled:
        first = generate_long_prompt(engine)
    assert not on_request_path(compiled), on_request_path(compiled)
    assert len(first.token_ids) == GREEDY.max_tokens and first.cached_tokens == 0
    answers["long prompt"] = first.token_ids


def test_after_the_background_compilation_nothing_compiles(warming, caplog):
    """Once the background compilation is done, steps of up to 64 tokens run, and turns
    that prefill, decode in batches, save to host memory and load their history back
    layer by layer (the long prompt among them) compile nothing."""
    llm, engine, answers = warming
    assert llm.chats.wait_compiled(timeout=600)
    assert llm.chats.step_tokens == 64 and llm.runner.arrivals_ready
    loads = llm.store.stats()["layerwise_loads"]
    with compilations(caplog) as compiled:
        def client(s):
            for t, message in enumerate(MESSAGES[:3]):
                params = SamplingParams(max_tokens=4 + 3 * s + t)
                list(engine.submit(turn(f"w{s}", message * (1 + s % 2), params)))

        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for thread in threads:
            thread.start()
        again = generate_long_prompt(engine)
        for thread in threads:
            thread.join()
    assert not compiled, [r.getMessage()[:160] for r in compiled]
    assert llm.store.stats()["layerwise_loads"] - loads >= 5
    assert again.cached_tokens == 96
    assert again.token_ids == answers.get("long prompt", again.token_ids)


def test_a_slow_reader_gets_every_token_that_arrived_in_one_chunk():
    from jattn.engine.requests import TurnStream
    from jattn.generation import StreamedToken

    stream = TurnStream(turn(None, "x"), cancel=lambda s: None)
    for i in range(3):
        stream.push(StreamedToken(i, str(i)))
    chunks = stream.chunks()
    assert [t.id for t in next(chunks)] == [0, 1, 2]
    stream.push(StreamedToken(3, "3"))
    stream.fail(ValueError("late"))
    assert [t.id for t in next(chunks)] == [3]  # what came before the error, then it
    with pytest.raises(ValueError, match="late"):
        next(chunks)
    closed = TurnStream(turn(None, "x"), cancel=lambda s: None)
    closed.push(StreamedToken(7, "7"))
    closed.close()
    assert [[t.id for t in chunk] for chunk in closed.chunks()] == [[7]]


def test_a_stream_interval_sends_the_first_token_at_once_then_one_chunk_per_interval():
    from jattn.engine.requests import TurnStream
    from jattn.generation import StreamedToken

    stream = TurnStream(turn(None, "x"), cancel=lambda s: None)
    stream.push(StreamedToken(0, "0"))
    chunks = stream.chunks(interval_s=30.0)
    assert [t.id for t in next(chunks)] == [0]

    def produce():
        for i in range(1, 10):
            stream.push(StreamedToken(i, str(i)))
            time.sleep(0.005)
        stream.close()

    started = time.perf_counter()
    threading.Thread(target=produce).start()
    assert [t.id for t in next(chunks)] == list(range(1, 10))  # within one interval
    assert list(chunks) == []
    assert time.perf_counter() - started < 30.0  # the end cut the interval short


def test_overlapped_steps_give_the_tokens_of_steps_taken_one_by_one():
    """With overlap, step N+1 is dispatched before step N's tokens reach the host and
    reads them on the device; a mix of greedy and seeded turns of every length, ending
    by end-of-sequence, stop string or budget, arriving together, gets the tokens and
    endings of an engine that takes each step's tokens before planning the next, and
    every block comes back."""
    rng = np.random.default_rng(11)
    requests = []
    for i in range(14):
        prompt = rng.integers(3, 500, int(rng.integers(4, 70))).tolist()
        sampling = dict(max_tokens=int(rng.integers(1, 40)))
        if i % 2:
            sampling.update(temperature=0.9, top_k=int(rng.integers(0, 40)),
                            top_p=float(rng.uniform(0.5, 1.0)), seed=int(rng.integers(2**63)))
        if i % 5 == 4:
            sampling["stop"] = ("e",)
        requests.append(TurnRequest(None, "tokens", tuple(prompt), SamplingParams(**sampling)))

    def run(overlap):
        engine = Engine(LLM(store=store(), num_blocks=256).chats, EngineLimits(max_running=6),
                        overlap=overlap)
        streams = [engine.submit(request) for request in requests]
        answers = [([t.id for t in stream], stream.result.finish_reason) for stream in streams]
        census = engine.block_census()
        assert census.balanced and census.in_flight == 0
        engine.shutdown()
        return answers

    overlapped, one_by_one = run(True), run(False)
    assert overlapped == one_by_one
    assert {reason for _, reason in overlapped} == {"stop", "length"}
