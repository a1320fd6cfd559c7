"""The placement simulator: with room for everything it reuses exactly the prefix blocks
the trace repeats; with none, nothing; saves write through to every tier; scheduler-aware
eviction keeps what the queue needs next where LRU does not, and its prefetch brings it
from disk into host memory; TTFT follows the stated model."""

import json

import pytest

from jattn.bench.simulate import Machine, simulate
from jattn.bench.trace import TraceRequest, load_trace

TRACE = "../shared/data/mooncake_synthetic_trace.jsonl"
BIG = 1 << 50


def request(ids, tokens=None, t=0.0):
    return TraceRequest(t, tokens or 512 * len(ids), 1, tuple(ids))


def repeated_prefix_tokens(requests) -> int:
    """Brute force: prompt tokens of each request's leading blocks whose hash ids some
    earlier request had (in a Mooncake trace a hash id names its whole prefix)."""
    seen, total = set(), 0
    for request in requests:
        for index, hash_id in enumerate(request.hash_ids):
            if hash_id not in seen:
                break
            total += min(request.block_tokens,
                         request.input_length - index * request.block_tokens)
        seen.update(request.hash_ids)
    return total


def test_unbounded_budgets_reuse_every_repeated_prefix_block(tmp_path):
    rows = [{"timestamp": i, "input_length": 512 * 4, "output_length": 1,
             "hash_ids": [i % 3, 10 + i % 2, 20 + i, 30 + i]} for i in range(12)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    requests = load_trace(str(path))
    result = simulate(requests, Machine(BIG, BIG, BIG), kv_bytes_per_token=1024,
                      policy="lru")
    assert result["blocks"] == 48
    assert 1 - result["hit_rate"]["miss"] == pytest.approx(repeated_prefix_tokens(requests) /
                                                           (48 * 512))
    assert result["hit_rate"]["hbm"] == pytest.approx(1 - result["hit_rate"]["miss"])


def test_no_budget_recomputes_everything():
    requests = [request([1, 2]), request([1, 2])]
    result = simulate(requests, Machine(0, 0, 0), kv_bytes_per_token=1024, policy="lru")
    assert result["hit_rate"]["miss"] == 1.0
    assert result["ttft_mean_ratio"] == 1.0


def test_scheduler_keeps_what_the_queue_needs_next():
    block = 512 * 1024
    # Room for two blocks on the device, nothing else. A, B, C, then A again: LRU
    # evicts A for C; with A in the look-ahead window, B goes instead.
    requests = [request([1]), request([2]), request([3]), request([1])]
    machine = Machine(2 * block, 0, 0)
    lru = simulate(requests, machine, kv_bytes_per_token=1024, policy="lru")
    scheduler = simulate(requests, machine, kv_bytes_per_token=1024, policy="scheduler",
                         lookahead=2)
    assert lru["hit_rate"]["hbm"] == 0
    assert scheduler["hit_rate"]["hbm"] == 0.25


def test_saves_write_through_to_every_tier():
    """One block of host memory and one of disk: saving block 2 evicts block 1 from both
    (each tier took every save), so block 1 is not found again."""
    block = 512 * 1024
    requests = [request([1]), request([2]), request([1])]
    result = simulate(requests, Machine(0, block, block), kv_bytes_per_token=1024,
                      policy="lru")
    assert result["hit_rate"]["miss"] == 1.0


def test_scheduler_prefetches_the_next_request_from_disk_into_host_memory():
    """Two blocks of host memory, a large disk, look-ahead one request. Blocks 1, 2, 3, 4
    are saved to both; saving 3 evicts 1 from host memory. While 4 runs, the hint names
    1: it is read back into host memory (evicting 2), and saving 4 evicts 3, not the
    hinted 1, so the last request finds 1 in host memory. Without hints 1 stays on disk."""
    block = 512 * 1024
    requests = [request([n]) for n in (1, 2, 3, 4, 1)]
    machine = Machine(0, 2 * block, BIG)
    scheduler = simulate(requests, machine, kv_bytes_per_token=1024, policy="scheduler",
                         lookahead=1)
    lru = simulate(requests, machine, kv_bytes_per_token=1024, policy="lru")
    assert scheduler["prefetched_blocks"] == 1 and lru["prefetched_blocks"] == 0
    assert scheduler["hit_rate"]["host"] == lru["hit_rate"]["disk"] == pytest.approx(1 / 5)
    assert scheduler["hit_rate"]["disk"] == lru["hit_rate"]["host"] == 0


def test_ttft_model():
    machine = Machine(0, BIG, 0, host_bytes_per_s=512 * 1024 * 10,
                      prefill_tokens_per_s=1000)
    requests = [request([1, 2], tokens=1000), request([1, 2, 3], tokens=1500)]
    result = simulate(requests, machine, kv_bytes_per_token=1024, policy="lru")
    # Second request: its two full blocks (1,024 tokens) come from host memory, 0.2 s of
    # loading, overlapping 476 computed tokens, 0.476 s. First: 1 s, all computed.
    # Without a store: 1 s and 1.5 s.
    assert result["hit_rate"]["host"] == pytest.approx(2 / 5)
    assert result["ttft_p50_s"] == pytest.approx((1.0 + 0.476) / 2)
    assert result["ttft_mean_ratio"] == pytest.approx((1.0 + 0.476) / 2.5)


def test_policy_is_checked():
    with pytest.raises(ValueError, match="policy must be 'lru' or 'scheduler'"):
        simulate([], Machine(0, 0, 0), kv_bytes_per_token=1, policy="fifo")


def test_the_remote_tier_catches_what_local_tiers_cannot_hold_at_its_bandwidth():
    """A device tier of one block and no host memory or disk: the last request's two
    blocks come from the remote tier, which every save was written through to, loaded at
    its rate."""
    block_tokens, kv = 512, 1024
    requests = [request([1, 2]), request([3]), request([1, 2])]
    machine = Machine(block_tokens * kv, 0, 0, remote_bytes=BIG, remote_bytes_per_s=1e9,
                      prefill_tokens_per_s=1e12)
    result = simulate(requests, machine, kv_bytes_per_token=kv, policy="lru")
    assert result["hit_rate"]["remote"] == pytest.approx(2 / 5)
    assert result["hit_rate"]["hbm"] == 0 and result["hit_rate"]["miss"] == pytest.approx(3 / 5)
    load_s = 2 * block_tokens * kv / 1e9  # the last request's, the slowest
    assert result["ttft_p99_s"] == pytest.approx(load_s, rel=0.05)
