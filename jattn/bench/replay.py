"""Replaying a Mooncake-format trace against jattn, in process or over gRPC.

Each request runs as a turn of its conversation (`jattn.bench.trace.conversations`): the
prompt tokens past the blocks it shares with the conversation's previous turn are sent
as token ids, with `max_tokens` the request's output length (end-of-sequence ignored).
Without reuse (`stateless`), each request is a one-off carrying its whole prompt.
Requests start at their timestamps, divided by `speedup`, but a turn waits for the
answer to its conversation's previous turn, as a user does. Per request the time to
first token is measured from its start; reused prompt tokens are those whose KV the turn did
not recompute, up to the prefix the request shares with the previous turn.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from jattn.bench.trace import Turn, prompt_token_ids, reusable_tokens
from jattn.sampling import SamplingParams
from jattn.serving import Engine, TurnRequest


@dataclass
class TurnOutcome:
    """What one replayed request cost: seconds to first token and per later token,
    tokens generated, context tokens reused (and blocks per tier), or the error."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0
    tokens: int = 0
    cached_tokens: int = 0
    tier_blocks: dict | None = None
    error: str | None = None


def run_in_process(engine: Engine):
    """A turn runner over an in-process engine."""

    def run(session: str, token_ids: list[int], max_tokens: int) -> TurnOutcome:
        start = time.perf_counter()
        stream = engine.submit(TurnRequest(session, "tokens", tuple(token_ids),
                                           SamplingParams(max_tokens=max_tokens),
                                           ignore_eos=True))
        first = None
        tokens = 0
        for _ in stream:
            first = first or time.perf_counter()
            tokens += 1
        end = time.perf_counter()
        result = stream.result
        return TurnOutcome(ttft_s=(first or end) - start,
                           tpot_s=(end - first) / (tokens - 1) if tokens > 1 else 0.0,
                           tokens=tokens, cached_tokens=result.cached_tokens,
                           tier_blocks=dict(result.tiers or {}))

    return run


def run_over_grpc(client):
    """A turn runner over a `serve.client.Client`."""

    def run(session: str, token_ids: list[int], max_tokens: int) -> TurnOutcome:
        start = time.perf_counter()
        first = None
        facts = None
        tokens = 0
        for event in client.chat_events(session, token_ids=token_ids, max_tokens=max_tokens,
                                        ignore_eos=True):
            if event.token_ids:
                first = first or time.perf_counter()
                tokens += len(event.token_ids)
            facts = event.facts if event.HasField("facts") else facts
        end = time.perf_counter()
        return TurnOutcome(ttft_s=(first or end) - start,
                           tpot_s=(end - first) / (tokens - 1) if tokens > 1 else 0.0,
                           tokens=tokens, cached_tokens=facts.cached_tokens if facts else 0,
                           tier_blocks=dict(facts.tier_blocks) if facts else {})

    return run


def replay(turns: list[Turn], run_turn, *, vocab_size: int, speedup: float = 1.0,
           max_workers: int = 64, stateless: bool = False) -> dict:
    """Replays `turns` through `run_turn(session, token_ids, max_tokens)` and summarises.

    `stateless`: every request is a one-off (`session` None) carrying its whole prompt,
    as a client of a server without KV reuse sends it, and the server prefills all of
    it; a conversation's turns still wait for each other."""
    outcomes: list[TurnOutcome | None] = [None] * len(turns)
    turns_before: list[int | None] = [None] * len(turns)
    start = time.perf_counter()
    progress = tqdm(total=len(turns), desc="replay", unit="request")
    lock = threading.Lock()

    finished = [threading.Event() for _ in turns]
    previous: dict[str, int] = {}
    for index, turn in enumerate(turns):
        before = previous.get(turn.session)
        previous[turn.session] = index
        turns_before[index] = before

    def one(index: int, turn: Turn) -> None:
        delay = turn.request.timestamp_s / speedup - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        if turns_before[index] is not None:  # a user sends a turn once it has the answer
            finished[turns_before[index]].wait()
        ids = prompt_token_ids(turn.request, vocab_size=vocab_size,
                               first_block=0 if stateless else turn.shared_blocks)
        try:
            outcome = run_turn(None if stateless else turn.session, ids or [3],
                               turn.request.output_length)
        except Exception as error:  # recorded: a replay reports failures, it does not stop
            outcome = TurnOutcome(error=f"{type(error).__name__}: {error}")
        with lock:
            outcomes[index] = outcome
            progress.update()
        finished[index].set()

    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        list(pool.map(one, range(len(turns)), turns))
    progress.close()
    return summarise(turns, outcomes, wall_s=time.perf_counter() - start)


def summarise(turns: list[Turn], outcomes: list[TurnOutcome], *, wall_s: float) -> dict:
    ok = [(t, o) for t, o in zip(turns, outcomes) if o.error is None]
    ttft = np.array([o.ttft_s for _, o in ok]) if ok else np.zeros(1)
    tpot = [o.tpot_s for _, o in ok if o.tokens > 1]
    total = sum(t.request.input_length for t, _ in ok)
    reused = 0
    by_tier: dict[str, float] = {}
    for turn, outcome in ok:
        allowed = min(turn.shared_blocks * turn.request.block_tokens, turn.request.input_length)
        got = min(outcome.cached_tokens, allowed)
        reused += got
        blocks = sum((outcome.tier_blocks or {}).values())
        for tier, count in (outcome.tier_blocks or {}).items():
            by_tier[tier] = by_tier.get(tier, 0) + got * count / blocks
    requests = [t.request for t in turns]
    errors = [o.error for o in outcomes if o.error is not None]
    return {
        "requests": len(turns), "completed": len(ok), "errors": len(errors),
        "first_errors": errors[:5], "wall_s": wall_s,
        "ttft_p50_s": float(np.quantile(ttft, 0.5)), "ttft_p90_s": float(np.quantile(ttft, 0.9)),
        "ttft_p99_s": float(np.quantile(ttft, 0.99)),
        "tpot_p50_s": float(np.median(tpot)) if tpot else None,
        "prefill_tokens_total": total, "prefill_tokens_reused": reused,
        "prefill_tokens_computed": total - reused,
        "reused_tokens_by_tier": {k: round(v) for k, v in sorted(by_tier.items())},
        "trace_reusable_tokens": reusable_tokens(requests),
        "reuse_fraction": reused / total if total else 0.0,
        "trace_reuse_fraction": reusable_tokens(requests) / max(
            sum(r.input_length for r in requests), 1),
    }
