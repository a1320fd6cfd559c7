"""Trace replay: synthetic tokens are a function of hash ids, the reuse a trace allows is
the longest prefix an earlier prompt shares, the shared-system-prompt generator writes the
conversations it describes, and a replay of one-off requests reuses by content what the
trace allows with the store and nothing without it (in process and over gRPC)."""

import json

import pytest

from jattn import LLM, StoreConfig
from jattn.bench.replay import (
    check_block_alignment,
    replay,
    run_in_process,
    run_over_grpc,
    run_trace,
    summarise,
)
from jattn.bench.trace import (
    block_token_ids,
    load_trace,
    main as trace_main,
    make_shared_prefix_trace,
    prompt_token_ids,
    reusable_prefix_tokens,
)
from serve.cli import main as cli_main

SCALE = 1 / 32  # 16-token trace blocks: one engine block each


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def shared_prefix_trace(tmp_path):
    """24 requests (8 conversations x 3 turns) that open with a 4-block system prompt;
    at SCALE every prompt and answer fits the embedded model's 512-token window."""
    rows = make_shared_prefix_trace(conversations=8, turns=3, system_tokens=2048,
                                    message_tokens=(200, 600), output_tokens=(64, 160),
                                    mean_arrival_gap_ms=500, think_ms=(1000, 3000), seed=1)
    return write_rows(tmp_path / "shared.jsonl", rows)


def brute_force_allowed(requests, vocab_size, unit):
    """Per request: its longest common token prefix with any earlier prompt, leaving the
    last prompt token, in whole blocks of `unit` tokens."""
    prompts = [prompt_token_ids(r, vocab_size=vocab_size) for r in requests]
    allowed = []
    for i, mine in enumerate(prompts):
        best = 0
        for theirs in prompts[:i]:
            common = 0
            while common < min(len(mine), len(theirs)) and mine[common] == theirs[common]:
                common += 1
            best = max(best, common)
        allowed.append(min(best, len(mine) - 1) // unit * unit)
    return allowed


def test_trace_tokens_are_a_function_of_hash_ids(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 512 * 5 - 200, "output_length": 300,
         "hash_ids": [0, 1, 2, 3, 4]},
        {"timestamp": 40, "input_length": 512 * 6, "output_length": 300,
         "hash_ids": [0, 1, 2, 3, 9, 10]}])
    first, second = load_trace(path, scale=SCALE)
    assert first.block_tokens == 16 and first.input_length == 74
    ids = prompt_token_ids(first, vocab_size=512)
    assert len(ids) == 74 and min(ids) >= 3
    assert ids[:16] == block_token_ids(0, 16, vocab_size=512).tolist()
    assert prompt_token_ids(second, vocab_size=512)[:64] == ids[:64]  # four shared blocks
    assert prompt_token_ids(second, vocab_size=512)[64:80] != ids[64:80]


def test_bad_trace_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not a Mooncake trace line"):
        load_trace(str(path))
    with pytest.raises(ValueError, match="scale must be in"):
        load_trace(str(path), scale=2)


@pytest.mark.parametrize("unit", [16, 8])
def test_reusable_prefix_tokens_match_a_brute_force_count(tmp_path, unit):
    full = 512
    rows = [
        ([1, 2, 3], 3 * full - 100),        # first: nothing earlier
        ([1, 2, 4, 5], 4 * full),           # two blocks of the first
        ([1, 2, 3, 6], 4 * full),           # block 3 was partial in the first: 14 tokens
        ([1, 2, 3, 6], 4 * full),           # all of the one before, but its last token
        ([7, 2, 3], 3 * full),              # block 2 after another first block: nothing
        ([1], 10),                          # inside the first's first block
        ([1, 2, 4, 5, 8], 4 * full + 300),  # all of the second
        ([1, 2, 4, 11], 3 * full + 5),      # three blocks of the second
    ]
    path = write_rows(tmp_path / "hand.jsonl", [
        {"timestamp": i, "input_length": length, "output_length": 8, "hash_ids": ids}
        for i, (ids, length) in enumerate(rows)])
    requests = load_trace(path, scale=SCALE)
    expected = brute_force_allowed(requests, 512, unit)
    assert reusable_prefix_tokens(requests, block_tokens=unit) == expected
    assert expected[0] == expected[4] == expected[5] == 0 and expected[6] == 64


def test_shared_prefix_trace_is_the_conversations_it_describes(tmp_path):
    shape = dict(conversations=6, turns=4, system_tokens=1100, message_tokens=(500, 1000))
    rows = make_shared_prefix_trace(**shape, seed=3)
    assert rows == make_shared_prefix_trace(**shape, seed=3)
    assert len(rows) == 24
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in rows)
    assert all(r["hash_ids"][:2] == [0, 1] for r in rows)  # two whole system blocks
    by_conversation = {}
    for row in rows:  # its first own block (system tail + message, whole) names a conversation
        by_conversation.setdefault(row["hash_ids"][2], []).append(row)
    assert sorted(len(turns) for turns in by_conversation.values()) == [4] * 6
    seen = set()
    for turns in by_conversation.values():
        for before, after in zip(turns, turns[1:]):
            whole = before["input_length"] // 512
            assert after["hash_ids"][:whole] == before["hash_ids"][:whole]
            assert after["hash_ids"][whole] not in before["hash_ids"]
            message = after["input_length"] - before["input_length"] - before["output_length"]
            assert 500 <= message <= 1000
            assert after["timestamp"] - before["timestamp"] >= 5000
        for row in turns:
            assert len(row["hash_ids"]) == -(-row["input_length"] // 512)
            seen.update(row["hash_ids"][2:])
    assert len(seen) == len({i for r in rows for i in r["hash_ids"][2:]})

    out = tmp_path / "cli.jsonl"
    assert trace_main(["make-shared-prefix", str(out), "--conversations", "6", "--turns", "4",
                       "--system-tokens", "1100", "--message-tokens", "500", "1000",
                       "--seed", "3"]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


def test_replay_with_the_store_reuses_what_the_trace_allows(tmp_path):
    requests = load_trace(shared_prefix_trace(tmp_path), scale=SCALE)
    llm = LLM(store=StoreConfig(hbm_bytes=1 << 24, host_bytes=1 << 24))
    engine = llm.start_engine()
    # One client thread: every earlier request has finished, so all it allows is there.
    outcomes, wall_s, _ = run_trace(requests, run_in_process(engine),
                                    vocab_size=llm.config.vocab_size, speedup=1e6,
                                    max_workers=1)
    engine.shutdown()
    allowed = reusable_prefix_tokens(requests, block_tokens=16)
    assert not any(o.error for o in outcomes)
    assert all(a >= 64 for a in allowed[1:])  # every later request shares the system prompt
    assert [o.cached_tokens for o in outcomes] == allowed
    summary = summarise(requests, outcomes, wall_s=wall_s, kv_block_tokens=16)
    assert summary["completed"] == summary["requests"] == 24
    assert summary["allowed_tokens"] == sum(allowed)
    assert summary["reuse_of_allowed"] >= 0.95
    assert summary["reused_tokens_by_tier"]["hbm"] > 0
    assert summary["prefill_tokens_computed"] == \
        summary["prefill_tokens_total"] - summary["prefill_tokens_reused"]
    for key in ("ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tpot_p50_s"):
        assert summary[key] > 0
    fresh = [o for o, most in zip(outcomes, allowed) if most == 0]  # the first request
    assert summary["nothing_to_reuse_requests"] == len(fresh) == 1
    assert summary["nothing_to_reuse_ttft_p50_s"] == fresh[0].ttft_s
    assert summary["nothing_to_reuse_tpot_p50_s"] == fresh[0].tpot_s


def test_replay_without_the_store_reuses_nothing(tmp_path):
    requests = load_trace(shared_prefix_trace(tmp_path), scale=SCALE)
    llm = LLM(store=None)
    engine = llm.start_engine()
    outcomes, wall_s, peak = run_trace(requests, run_in_process(engine),
                                       vocab_size=llm.config.vocab_size, speedup=1e6)
    engine.shutdown()
    assert not any(o.error for o in outcomes)
    assert [o.cached_tokens for o in outcomes] == [0] * 24
    assert peak > 1  # requests run concurrently: nothing waits for another
    summary = summarise(requests, outcomes, wall_s=wall_s)
    assert summary["prefill_tokens_reused"] == summary["reuse_of_allowed"] == 0
    assert summary["allowed_tokens"] > 0


def test_misaligned_scale_is_refused(tmp_path):
    check_block_alignment(SCALE, 16)
    check_block_alignment(1 / 16, 16)
    with pytest.raises(ValueError, match=r"5\.12 tokens.*multiple of 16.*--scale 0\.03125"):
        check_block_alignment(0.01, 16)
    path = write_rows(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 100, "output_length": 4, "hash_ids": [0]}])
    with pytest.raises(SystemExit, match=r"25\.6 tokens.*--scale 0\.03125 or 0\.0625"):
        cli_main(["bench", "replay", "--trace", path, "--scale", "0.05", "--no-warm-up"])


def test_replay_over_grpc(tmp_path):
    from serve.client import Client
    from serve.config import ServeConfig
    from serve.server import Server

    server = Server(ServeConfig(port=0, http_port=0, warm_up=False, compilation_cache_dir=None)).start()
    client = Client(f"127.0.0.1:{server.port}")
    requests = load_trace(shared_prefix_trace(tmp_path), scale=SCALE)
    summary = replay(requests, run_over_grpc(client), vocab_size=512, speedup=1e6,
                     max_workers=1)
    server.stop()
    assert summary["completed"] == 24
    assert summary["reuse_of_allowed"] >= 0.95
