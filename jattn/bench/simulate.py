"""The AttentionStore's placement at a trace's full size, without a model.

The store's own `Tier` accounting (one per tier, with its eviction policy) is driven by a
Mooncake-format trace: each request reuses the longest prefix of its blocks that some
tier holds (a block after a miss is recomputed), then every block of the request is
placed in the device tier; what it evicts (or cannot take) falls to host memory, from
there to disk, and from there to the remote tier (a Redis shared by replicas: 0 bytes by
default; size it with `remote_bytes` and its network bandwidth). `scheduler` passes the blocks of the next `lookahead` requests as the upcoming
window; `lru` passes none.

TTFT is modelled per request from a model shape's KV bytes per token and the machine's
rates: `recompute_s = computed tokens / prefill_tokens_per_s`, `load_s = sum over tiers of
reused bytes / that tier's bandwidth`, and, loads overlapping compute layer by layer,
`ttft_s = max(recompute_s, load_s)`; without a store every prompt token is computed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from jattn.bench.trace import TraceRequest
from jattn.store.placement import Tier

TIERS = ("hbm", "host", "disk", "remote")


@dataclass(frozen=True)
class Machine:
    """Budgets (bytes), load bandwidths to the device (bytes/s) and the prefill rate
    (tokens/s) of the machine modelled."""

    hbm_bytes: int
    host_bytes: int
    disk_bytes: int
    remote_bytes: int = 0
    hbm_bytes_per_s: float = 1.0e12
    host_bytes_per_s: float = 25.0e9
    disk_bytes_per_s: float = 5.0e9
    remote_bytes_per_s: float = 1.25e9
    prefill_tokens_per_s: float = 10_000.0

    def bandwidth(self, tier: str) -> float:
        return getattr(self, f"{tier}_bytes_per_s")


def simulate(requests: list[TraceRequest], machine: Machine, *, kv_bytes_per_token: int,
             policy: str, lookahead: int = 16) -> dict:
    """Runs the trace through the tiers; returns hit fractions of prefix blocks per tier
    ("miss": recomputed), and modelled TTFT percentiles with the store and without."""
    if policy not in ("lru", "scheduler"):
        raise ValueError(f"policy must be 'lru' or 'scheduler', got {policy!r}")
    tiers = [(name, Tier(getattr(machine, f"{name}_bytes"))) for name in TIERS]
    hits = dict.fromkeys(TIERS, 0)
    clock = itertools.count()
    last_used: dict[str, int] = {}
    keys = [[str(h) for h in r.hash_ids] for r in requests]
    flat = list(itertools.chain.from_iterable(keys))  # request i's: starts[i]:starts[i + 1]
    starts = list(itertools.accumulate(map(len, keys), initial=0))
    total = 0
    ttft, ttft_without = [], []
    for index, request in enumerate(requests):
        block_bytes = request.block_tokens * kv_bytes_per_token
        upcoming = [] if policy == "lru" else flat[
            starts[index + 1]:starts[min(index + 1 + lookahead, len(keys))]]
        reusing = True
        reused_tokens = 0
        load_s = 0.0
        for position, key in enumerate(keys[index]):
            entry = (key, 0)
            total += 1
            where = next((name for name, tier in tiers if entry in tier), None)
            if reusing and where is not None:
                hits[where] += 1
                tokens = min(request.block_tokens,
                             max(request.input_length - position * request.block_tokens, 0))
                reused_tokens += tokens
                load_s += tokens * kv_bytes_per_token / machine.bandwidth(where)
            else:
                reusing = False
            for _, tier in tiers:
                tier.remove(entry)
            last_used[key] = next(clock)
            falling = [entry]
            for _, tier in tiers:
                evicted = []
                for item in falling:
                    admitted, out = tier.admit(item, block_bytes, last_used=last_used,
                                               upcoming=upcoming)
                    evicted += out if admitted else out + [item]
                falling = evicted
        computed = request.input_length - reused_tokens
        ttft.append(max(computed / machine.prefill_tokens_per_s, load_s))
        ttft_without.append(request.input_length / machine.prefill_tokens_per_s)
    rates = {name: count / max(total, 1) for name, count in hits.items()}
    rates["miss"] = 1 - sum(rates.values())
    return {"policy": policy, "lookahead": lookahead, "requests": len(requests),
            "blocks": total, "hit_rate": rates,
            "ttft_p50_s": float(np.quantile(ttft, 0.5)),
            "ttft_p90_s": float(np.quantile(ttft, 0.9)),
            "ttft_p99_s": float(np.quantile(ttft, 0.99)),
            "ttft_without_store_p50_s": float(np.quantile(ttft_without, 0.5)),
            "ttft_mean_ratio": float(np.mean(ttft) / np.mean(ttft_without))}
