"""Replaying a Mooncake-format trace against jattn, in process or over gRPC.

Each request is a one-off carrying its whole prompt as token ids (no session), as an
OpenAI-style client sends it, with `max_tokens` its output length (end-of-sequence
ignored). Requests start at their timestamps divided by `speedup` and run concurrently,
on a bounded pool of client threads; nothing groups them into conversations. Whatever the
engine reuses it finds by content. Per request, the time to first token counts from the
request's arrival (its timestamp), so waiting for a free client thread counts too; reuse
is measured against what the trace allows by content (`reusable_prefix_tokens`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from jattn.bench.trace import TRACE_BLOCK_TOKENS, TraceRequest, prompt_token_ids, \
    reusable_prefix_tokens
from jattn.sampling import SamplingParams
from jattn.engine import Engine, TurnRequest


@dataclass
class RequestOutcome:
    """What one replayed request cost: seconds to first token and per later token,
    tokens generated, prompt tokens whose KV was reused (and blocks per tier), or the
    error."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0
    tokens: int = 0
    cached_tokens: int = 0
    tier_blocks: dict | None = None
    error: str | None = None


def check_block_alignment(scale: float, kv_block_tokens: int) -> None:
    """Raises ValueError unless `scale` makes a trace block (512 tokens times `scale`) a
    whole number of the engine's KV blocks of `kv_block_tokens` tokens. Reuse by content
    works on whole KV blocks: a KV block straddling two trace blocks is found again only
    where both match, so the replay's reuse would not follow the trace's blocks."""
    trace_block = TRACE_BLOCK_TOKENS * scale
    if trace_block % kv_block_tokens == 0:
        return
    below = math.floor(trace_block / kv_block_tokens) * kv_block_tokens
    near = " or ".join(f"{tokens / TRACE_BLOCK_TOKENS:g}"
                       for tokens in (below, below + kv_block_tokens)
                       if 0 < tokens <= TRACE_BLOCK_TOKENS)
    raise ValueError(
        f"--scale {scale:g} makes trace blocks of {trace_block:g} tokens, not a whole number "
        f"of the engine's {kv_block_tokens}-token KV blocks (reuse by content needs trace "
        f"blocks made of whole KV blocks): 512 * scale must be a multiple of "
        f"{kv_block_tokens}, e.g. --scale {near}")


def run_in_process(engine: Engine):
    """A request runner over an in-process engine: `run(token_ids, max_tokens)`."""

    def run(token_ids: list[int], max_tokens: int) -> RequestOutcome:
        start = time.perf_counter()
        stream = engine.submit(TurnRequest(None, "tokens", tuple(token_ids),
                                           SamplingParams(max_tokens=max_tokens),
                                           ignore_eos=True))
        first = None
        tokens = 0
        for _ in stream:
            first = first or time.perf_counter()
            tokens += 1
        end = time.perf_counter()
        result = stream.result
        return RequestOutcome(ttft_s=(first or end) - start,
                              tpot_s=(end - first) / (tokens - 1) if tokens > 1 else 0.0,
                              tokens=tokens, cached_tokens=result.cached_tokens,
                              tier_blocks=dict(result.tiers or {}))

    return run


def run_over_grpc(client):
    """A request runner over a `serve.client.Client`: `run(token_ids, max_tokens)`, a
    `Chat` with no session."""

    def run(token_ids: list[int], max_tokens: int) -> RequestOutcome:
        start = time.perf_counter()
        first = None
        facts = None
        tokens = 0
        for event in client.chat_events("", token_ids=token_ids, max_tokens=max_tokens,
                                        ignore_eos=True):
            if event.token_ids:
                first = first or time.perf_counter()
                tokens += len(event.token_ids)
            facts = event.facts if event.HasField("facts") else facts
        end = time.perf_counter()
        return RequestOutcome(ttft_s=(first or end) - start,
                              tpot_s=(end - first) / (tokens - 1) if tokens > 1 else 0.0,
                              tokens=tokens, cached_tokens=facts.cached_tokens if facts else 0,
                              tier_blocks=dict(facts.tier_blocks) if facts else {})

    return run


def round_robin(runners: list):
    """A request runner that sends each request to the next of `runners` in turn (as a
    load balancer without stickiness does)."""
    turns = itertools.cycle(runners)
    lock = threading.Lock()

    def run(token_ids: list[int], max_tokens: int) -> RequestOutcome:
        with lock:
            runner = next(turns)
        return runner(token_ids, max_tokens)

    return run


def run_trace(requests: list[TraceRequest], run_request, *, vocab_size: int,
              speedup: float = 1.0, max_workers: int = 64
              ) -> tuple[list[RequestOutcome], float, int]:
    """Sends each request's whole prompt through `run_request(token_ids, max_tokens)` at
    its timestamp / `speedup`, at most `max_workers` at once. Returns the outcomes (in
    trace order; a request's time to first token counts from its arrival), the wall time
    in seconds and the most requests that were in flight at once."""
    outcomes: list[RequestOutcome | None] = [None] * len(requests)
    progress = tqdm(total=len(requests), desc="replay", unit="request")
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most
    start = time.perf_counter()

    def one(index: int, request: TraceRequest) -> None:
        arrival = start + request.timestamp_s / speedup
        delay_s = arrival - time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)
        late_s = max(time.perf_counter() - arrival, 0.0)  # waiting for a free client thread
        ids = prompt_token_ids(request, vocab_size=vocab_size)
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        try:
            outcome = run_request(ids, request.output_length)
            outcome.ttft_s += late_s
        except Exception as error:  # recorded: a replay reports failures, it does not stop
            outcome = RequestOutcome(error=f"{type(error).__name__}: {error}")
        with lock:
            in_flight[0] -= 1
            outcomes[index] = outcome
            progress.update()

    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        list(pool.map(one, range(len(requests)), requests))
    progress.close()
    return outcomes, time.perf_counter() - start, in_flight[1]


def replay(requests: list[TraceRequest], run_request, *, vocab_size: int,
           speedup: float = 1.0, max_workers: int = 64, kv_block_tokens: int = 16) -> dict:
    """Replays `requests` (`run_trace`) and summarises them (`summarise`);
    `kv_block_tokens` is the engine's KV block size, in tokens."""
    outcomes, wall_s, peak = run_trace(requests, run_request, vocab_size=vocab_size,
                                       speedup=speedup, max_workers=max_workers)
    summary = summarise(requests, outcomes, wall_s=wall_s, kv_block_tokens=kv_block_tokens)
    summary["peak_in_flight"] = peak
    return summary


def summarise(requests: list[TraceRequest], outcomes: list[RequestOutcome], *,
              wall_s: float, kv_block_tokens: int = 16) -> dict:
    """Latencies (seconds), prefill tokens, and reuse against what the trace allows by
    content: per request at most `reusable_prefix_tokens` (in whole KV blocks of
    `kv_block_tokens`) counts, and `reuse_of_allowed` is the share of that reused. The
    `nothing_to_reuse_*` latencies are over the requests the trace allows no reuse: the
    same requests whether the store is on or off."""
    allowed = reusable_prefix_tokens(requests, block_tokens=kv_block_tokens)
    ok = [(r, o, a) for r, o, a in zip(requests, outcomes, allowed) if o.error is None]
    ttft = np.array([o.ttft_s for _, o, _ in ok]) if ok else np.zeros(1)
    tpot = [o.tpot_s for _, o, _ in ok if o.tokens > 1]
    total = sum(r.input_length for r, _, _ in ok)
    reused = sum(o.cached_tokens for _, o, _ in ok)
    allowed_ok = sum(a for _, _, a in ok)
    reused_of_allowed = 0
    by_tier: dict[str, float] = {}
    for _, outcome, most in ok:
        got = min(outcome.cached_tokens, most)
        reused_of_allowed += got
        blocks = sum((outcome.tier_blocks or {}).values())
        for tier, count in (outcome.tier_blocks or {}).items():
            by_tier[tier] = by_tier.get(tier, 0) + outcome.cached_tokens * count / blocks
    errors = [o.error for o in outcomes if o.error is not None]
    # The requests the trace allows nothing to reuse: the same ones with the store or
    # without, so their latencies compare directly (what the store costs them).
    fresh = [o for _, o, most in ok if most == 0]
    fresh_ttft = np.array([o.ttft_s for o in fresh]) if fresh else np.zeros(1)
    fresh_tpot = [o.tpot_s for o in fresh if o.tokens > 1]
    return {
        "requests": len(requests), "completed": len(ok), "errors": len(errors),
        "first_errors": errors[:5], "wall_s": wall_s,
        "ttft_p50_s": float(np.quantile(ttft, 0.5)), "ttft_p90_s": float(np.quantile(ttft, 0.9)),
        "ttft_p99_s": float(np.quantile(ttft, 0.99)),
        "tpot_p50_s": float(np.median(tpot)) if tpot else None,
        "prefill_tokens_total": total, "prefill_tokens_reused": reused,
        "prefill_tokens_computed": total - reused,
        "reused_tokens_by_tier": {k: round(v) for k, v in sorted(by_tier.items())},
        "allowed_tokens": allowed_ok, "reused_of_allowed_tokens": reused_of_allowed,
        "reuse_of_allowed": reused_of_allowed / allowed_ok if allowed_ok else 0.0,
        "reuse_fraction": reused / total if total else 0.0,
        "trace_reuse_fraction": allowed_ok / total if total else 0.0,
        "nothing_to_reuse_requests": len(fresh),
        "nothing_to_reuse_ttft_p50_s": float(np.quantile(fresh_ttft, 0.5)),
        "nothing_to_reuse_ttft_p99_s": float(np.quantile(fresh_ttft, 0.99)),
        "nothing_to_reuse_tpot_p50_s": float(np.median(fresh_tpot)) if fresh_tpot else None,
    }
