"""Trace replay: synthetic tokens are a function of hash ids, requests become turns of
their conversation, and with the store the reused prefill reaches what the trace allows
(in process and over gRPC); without it nothing is reused."""

import json

import pytest

from jattn import LLM, StoreConfig
from jattn.bench.replay import replay, run_in_process, run_over_grpc
from jattn.bench.trace import (
    block_token_ids,
    conversations,
    load_trace,
    prompt_token_ids,
    reusable_tokens,
)
from jattn.serving import Engine


def write_trace(path):
    """Four conversations of three turns; each turn extends the previous turn's full
    blocks (its last, partial block changes), as multi-turn traffic does."""
    rows, t = [], 0
    for c in range(4):
        base = [1000 * c + i for i in range(3)]
        for turn in range(3):
            ids = base + [1000 * c + 100 + 10 * turn + j for j in range(2)]
            base = ids[:-1]
            rows.append({"timestamp": t, "input_length": 512 * len(ids) - 200,
                         "output_length": 300, "hash_ids": ids})
            t += 40
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_trace_tokens_and_conversations(tmp_path):
    requests = load_trace(write_trace(tmp_path / "t.jsonl"), scale=1 / 32)
    assert requests[0].block_tokens == 16 and requests[0].input_length == 74
    first = prompt_token_ids(requests[0], vocab_size=512)
    assert len(first) == 74
    assert first[:16] == block_token_ids(0, 16, vocab_size=512).tolist()
    second = prompt_token_ids(requests[1], vocab_size=512)
    assert second[:64] == first[:64]  # four shared blocks, identical tokens
    turns = conversations(requests)
    assert [t.shared_blocks for t in turns[:3]] == [0, 4, 5]
    assert len({t.session for t in turns}) == 4
    assert reusable_tokens(requests) == sum(t.shared_blocks * 16 for t in turns)


def test_bad_trace_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a Mooncake trace line"):
        load_trace(str(path))
    with pytest.raises(ValueError, match="scale must be in"):
        load_trace(str(path), scale=2)


@pytest.mark.parametrize("store", [True, False])
def test_replay_in_process_reuses_what_the_trace_allows(tmp_path, store):
    turns = conversations(load_trace(write_trace(tmp_path / "t.jsonl"), scale=1 / 32))
    llm = LLM(store=StoreConfig(hbm_bytes=1 << 24, host_bytes=1 << 24) if store else None)
    engine = Engine(llm)
    summary = replay(turns, run_in_process(engine), vocab_size=llm.config.vocab_size,
                     speedup=20, stateless=not store)
    engine.shutdown()
    assert not llm.chats.sessions or store  # without reuse every request is a one-off
    assert summary["completed"] == summary["requests"] == 12
    assert summary["prefill_tokens_total"] == sum(t.request.input_length for t in turns)
    if store:
        assert summary["prefill_tokens_reused"] == summary["trace_reusable_tokens"] > 0
        assert summary["reused_tokens_by_tier"]["hbm"] > 0
    else:
        assert summary["prefill_tokens_reused"] == 0
    assert summary["prefill_tokens_computed"] == \
        summary["prefill_tokens_total"] - summary["prefill_tokens_reused"]
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s"):
        assert summary[key] > 0


def test_replay_over_grpc(tmp_path):
    from serve.client import Client
    from serve.config import ServeConfig
    from serve.server import Server

    server = Server(ServeConfig(port=0, warm_up=False, compilation_cache_dir=None)).start()
    client = Client(f"127.0.0.1:{server.port}")
    turns = conversations(load_trace(write_trace(tmp_path / "t.jsonl"), scale=1 / 32))
    summary = replay(turns, run_over_grpc(client), vocab_size=512, speedup=20)
    server.stop()
    assert summary["completed"] == 12
    assert summary["prefill_tokens_reused"] == summary["trace_reusable_tokens"] > 0
