"""Chat with the AttentionStore: reuse gives the tokens of recomputation, in every tier,
across truncation, restarts and corrupt entries, within budgets."""

import logging
import os

import jax
import numpy as np
import pytest

from jattn import LLM
from jattn.conversation import context_keys
from jattn.store import StoreConfig
from jattn.store.pinned_run import RunPart

MESSAGES = ["Once upon a time", "The dog ran to the park.", "Lily was happy.",
            "Then it started to rain.", "Tom found a big red ball.", "They played all day.",
            "At night the stars came out.", "The end."]
SESSIONS = ["alice", "bob", "carol"]
# Each session opens differently, so their histories (and blocks) differ from block 0.
OPENINGS = {"alice": MESSAGES[0], "bob": "One day a little dog", "carol": "The sun was bright"}


def message(session: str, turn: int) -> str:
    return OPENINGS[session] if turn == 0 else MESSAGES[turn]
BLOCK_BYTES = 2 * 5 * 4 * 8 * 4 * 16  # K and V, 5 layers, 4 KV heads, dim 8, f32, 16 tokens


def conversation_schedule():
    """Interleaved turns of three sessions, 8 turns each."""
    return [(session, turn) for turn in range(8) for session in SESSIONS]


def run(llm, max_tokens=64):
    answers = {}
    for session, turn in conversation_schedule():
        result = llm.chat(session, message(session, turn), max_tokens=max_tokens,
                          ignore_eos=True)
        answers[(session, turn)] = result
    return answers


@pytest.fixture(scope="module")
def recomputed():
    """The answers without a store: every turn recomputes its session's context."""
    llm = LLM(store=None)
    return {k: r.token_ids for k, r in run(llm).items()}


def assert_same_tokens(answers, recomputed):
    for key, result in answers.items():
        assert result.token_ids == recomputed[key], key


def test_recompute_path_truncates_past_the_window(recomputed):
    llm = LLM(store=None)
    results = run(llm)
    conversation = llm.engine.conversation("alice")
    assert len(conversation.tokens) > 512  # the history outgrew the 512-token window
    assert any(turn.dropped for turn in conversation.turns)
    assert conversation.blocks[0][1] == 0  # the sink block is kept
    assert all(r.cached_tokens == 0 for r in results.values())


def test_device_tier_reuse_equals_recompute(recomputed, tmp_path):
    llm = LLM(store=StoreConfig(hbm_bytes=10**9, host_bytes=10**9), num_blocks=200)
    answers = run(llm)
    assert_same_tokens(answers, recomputed)
    later = [r for (s, turn), r in answers.items() if turn >= 1]
    assert all(r.cached_tokens > 0 and set(r.tiers) == {"hbm"} for r in later)
    assert all(r.recomputed_tokens < 80 for r in later)


@pytest.mark.parametrize("kind", ["pinned_host", "numpy"])
def test_host_tier_reuse_equals_recompute(recomputed, kind, monkeypatch):
    """No device budget: every later turn loads its history from host memory, saved
    there through the memory kind asked for. In `pinned_host`, the tier holds the
    saves' pinned jax arrays and a load hands them to the device as they are."""
    llm = LLM(store=StoreConfig(hbm_bytes=0, host_bytes=10**9, host_memory_kind=kind))
    assert (llm.runner.save_memory_kind == "pinned_host") == (kind == "pinned_host")
    to_device = []  # the pinned arrays handed to a device_put to device memory
    device_put = jax.device_put

    def watched_put(x, device=None, *args, **kwargs):
        if getattr(device, "memory_kind", None) in (None, "device"):
            to_device.extend(a for a in jax.tree.leaves(x) if isinstance(a, jax.Array)
                             and a.sharding.memory_kind == "pinned_host")
        return device_put(x, device, *args, **kwargs)

    monkeypatch.setattr(jax, "device_put", watched_put)
    answers = run(llm)
    assert_same_tokens(answers, recomputed)
    later = [r for (_, turn), r in answers.items() if turn > 0]
    assert all(set(r.tiers) == {"host"} and r.cached_tokens > 0 for r in later)
    llm.store.flush()  # the last turns' saves
    found = [llm.store.get(key) for key in llm.chats.session_keys(SESSIONS)]
    assert found and all(tier == "host" for _, tier in found)
    held = [block for block, _ in found]
    if kind == "numpy":
        assert all(isinstance(b.k, np.ndarray) and isinstance(b.v, np.ndarray) for b in held)
        assert not to_device
        return
    assert all(isinstance(b.k, RunPart) and isinstance(b.v, RunPart) for b in held)
    layers = {id(a): a for b in held for part in (b.k, b.v) for a in part.run.layers[part.part]}
    assert all(a.sharding.memory_kind == "pinned_host" for a in layers.values())
    moved = {id(a) for a in to_device} & set(layers)
    assert len(moved) >= 2 * llm.config.num_layers  # a run's keys and values


def test_every_tier_and_misses_give_the_same_tokens(recomputed, tmp_path, caplog):
    """The device pool holds one session, host memory two sessions' worth of blocks,
    disk the rest: turns reuse from all three and lose some entries to eviction."""
    config = StoreConfig(hbm_bytes=32 * BLOCK_BYTES, host_bytes=40 * BLOCK_BYTES,
                         disk_bytes=70 * (BLOCK_BYTES + 1024), disk_path=str(tmp_path))
    llm = LLM(store=config, num_blocks=80)
    answers = {}
    for session, turn in conversation_schedule():
        result = llm.chat(session, message(session, turn), max_tokens=64, ignore_eos=True)
        answers[(session, turn)] = result
        llm.store.flush()
        stats = llm.store.stats()
        assert stats["host_bytes"] <= config.host_bytes
        assert stats["disk_bytes"] <= config.disk_bytes
        assert llm.engine.stats()["store"]["hbm_blocks"] * BLOCK_BYTES <= config.hbm_bytes
    assert_same_tokens(answers, recomputed)
    tiers = set().union(*(r.tiers or {} for r in answers.values()))
    assert {"hbm", "host", "disk"} <= tiers
    assert any(r.cached_tokens == 0 and turn > 0 for (_, turn), r in answers.items()), \
        "no turn had to recompute a lost context"
    stats = llm.store.stats()
    assert stats["host_evictions"] > 0 and stats["disk_evictions"] > 0
    loaded_turns = [r for r in answers.values() if {"host", "disk"} & set(r.tiers or {})]
    assert stats["layerwise_loads"] == len(loaded_turns)
    assert stats["load_seconds"] > 0
    assert 0 <= stats["load_hidden_seconds"] <= stats["load_seconds"]


def test_restart_finds_sessions_on_disk(recomputed, tmp_path):
    config = StoreConfig(hbm_bytes=10**9, host_bytes=10**9, disk_bytes=10**9,
                         disk_path=str(tmp_path))
    first = LLM(store=config)
    for session, turn in conversation_schedule()[:9]:  # three turns of each session
        first.chat(session, message(session, turn), max_tokens=64, ignore_eos=True)
    first.close()
    second = LLM(store=config)
    result = second.chat("alice", MESSAGES[3], max_tokens=64, ignore_eos=True)
    assert result.tiers == {"disk": result.cached_tokens // 16} and result.cached_tokens > 0
    assert result.token_ids == recomputed[("alice", 3)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_model", "missing"])
def test_corrupt_entries_are_dropped_and_recomputed(recomputed, tmp_path, caplog, damage):
    config = StoreConfig(hbm_bytes=10**9, host_bytes=10**9, disk_bytes=10**9,
                         disk_path=str(tmp_path))
    first = LLM(store=config)
    for turn in range(3):
        first.chat("alice", MESSAGES[turn], max_tokens=64, ignore_eos=True)
    keys = context_keys(first.engine.conversation("alice"))
    first.close()
    victim = block_file(tmp_path, first, keys[3])
    data = open(victim, "rb").read()
    if damage == "flip":
        data = data[:-10] + bytes([data[-10] ^ 0x40]) + data[-9:]
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "other_model":
        data = data.replace(first.store.fingerprint.encode(), b"0" * 64)
    if damage == "missing":
        os.unlink(victim)
    else:
        open(victim, "wb").write(data)
    second = LLM(store=config)
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        result = second.chat("alice", MESSAGES[3], max_tokens=64, ignore_eos=True)
    assert result.token_ids == recomputed[("alice", 3)]
    assert result.cached_tokens == 3 * 16  # the blocks before the lost one; then prefill
    if damage != "missing":
        assert "dropping KV block" in caplog.text
        assert second.store.stats()["corrupt_entries"] == 1


def test_a_block_of_another_history_is_never_used(recomputed, tmp_path):
    """Block files of bob's conversation copied over alice's (same model, valid
    checksums): after a restart alice's next turn recomputes them and gives her own
    tokens, because each file's header names the content key it was computed for."""
    import shutil

    config = StoreConfig(hbm_bytes=10**9, host_bytes=10**9, disk_bytes=10**9,
                         disk_path=str(tmp_path))
    first = LLM(store=config)
    for turn in range(3):
        first.chat("alice", MESSAGES[turn], max_tokens=64, ignore_eos=True)
        first.chat("bob", MESSAGES[turn + 4], max_tokens=64, ignore_eos=True)
    alice, bob = (context_keys(first.engine.conversation(s)) for s in ("alice", "bob"))
    first.close()
    for mine, theirs in zip(alice, bob):
        shutil.copyfile(block_file(tmp_path, first, theirs), block_file(tmp_path, first, mine))
    second = LLM(store=config)
    result = second.chat("alice", MESSAGES[3], max_tokens=64, ignore_eos=True)
    assert result.token_ids == recomputed[("alice", 3)]
    assert result.cached_tokens == 0 and second.store.stats()["stale_entries"] >= 1


def block_file(root, llm, key: bytes) -> str:
    """Where the disk tier under `root` keeps the block of `key`."""
    return os.path.join(str(root), llm.store.fingerprint[:16], "blocks", key.hex()[:2],
                        key.hex() + ".kv")


def test_disk_names_never_hold_the_session_id(tmp_path):
    config = StoreConfig(disk_bytes=10**8, disk_path=str(tmp_path))
    llm = LLM(store=config)
    llm.chat("secret-user@example.com", "Once upon a time", max_tokens=20)
    llm.close()
    names = [n for _, dirs, files in os.walk(tmp_path) for n in dirs + files]
    assert names and not any("secret" in n or "@" in n for n in names)


def test_end_session_forgets_the_session_and_keeps_its_blocks_by_content(tmp_path):
    """Ending a session removes its history and record everywhere; the blocks it
    computed stay a cache by content (another request with the same prefix reuses
    them) and every pool block stays accounted for."""
    config = StoreConfig(disk_bytes=10**8, disk_path=str(tmp_path))
    llm = LLM(store=config)
    prompt = [5, 6, 7] * 20
    first = llm.chat("a", prompt, max_tokens=8, ignore_eos=True)
    llm.end_session("a")
    llm.store.flush()
    assert llm.engine.conversation("a") is None and llm.store.get_record("a") is None
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".log")]
    assert llm.engine.block_census().balanced
    again = llm.chat("a", prompt, max_tokens=8, ignore_eos=True)
    assert again.token_ids == first.token_ids and again.cached_tokens == 48
    assert len(llm.engine.conversation("a").turns) == 1  # a new conversation


@pytest.mark.parametrize("args,pattern", [
    (("", "hi"), "session_id must be a non-empty string"),
    (("a", []), "tokens is empty"),
    (("a", [1, 9999]), r"token ids must be integers in \[0, 512\)"),
    (("a", [5] * 600), "600 tokens is more than the limit of 512 per turn"),
    (("a", [5] * 500), "message of 500 tokens does not fit the context window of 512"),
])
def test_bad_chat_input_changes_nothing(args, pattern):
    llm = LLM()
    llm.chat("a", "Once upon a time", max_tokens=10)
    before = llm.engine.conversation("a").tokens
    free = llm.engine.block_census().free
    with pytest.raises(ValueError, match=pattern):
        llm.chat(*args)
    assert llm.engine.conversation("a").tokens == before
    assert llm.engine.block_census().free == free
    assert np.isfinite(llm.chat("a", "The end.", max_tokens=3).ttft_s)


@pytest.mark.parametrize("failing_call", [1, 2, 3])
def test_a_recomputation_that_fails_midway_frees_every_block(failing_call):
    """Without a store a truncated session recomputes its context from the history each
    turn; a recomputation that stops partway (the pool running out, a failing step)
    gives back every block it took: the census balances, and the session still gives
    its tokens afterwards."""
    llm = LLM(store=None, num_blocks=96, max_context=96)
    for turn in range(4):
        llm.chat("a", MESSAGES[turn], max_tokens=24, ignore_eos=True)
    assert any(t.dropped for t in llm.engine.conversation("a").turns)  # truncated
    real, calls = llm.runner.prefill, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("the pool ran out")
        return real(*args, **kwargs)

    llm.runner.prefill = failing
    with pytest.raises(RuntimeError, match="pool ran out"):
        llm.chat("a", MESSAGES[4], max_tokens=24, ignore_eos=True)
    llm.runner.prefill = real
    census = llm.engine.block_census()
    assert census.balanced and census.free == census.total, census
    reference = LLM(store=None, num_blocks=96, max_context=96)  # the same shapes: compiled once
    for turn in range(5):
        want = reference.chat("a", MESSAGES[turn], max_tokens=24, ignore_eos=True)
    assert llm.chat("a", MESSAGES[4], max_tokens=24, ignore_eos=True).token_ids == \
        want.token_ids
