"""Reuse by content: any request reuses the cached leading blocks of its context,
whoever computed them, with the tokens and the KV of a stateless one-shot prefill; one
copy of a shared block per tier; tenants never share."""

import time

import numpy as np
import pytest

from jattn import LLM, StoreConfig
from jattn.conversation import context_keys
from jattn.model.kv_cache import blocks_for
from jattn.model.step_plan import BlockSave, StepPlan

SYSTEM = [7, 8, 9, 10] * 12  # a 48-token "system prompt": three full blocks


def user_prompt(seed: int, length: int = 20) -> list[int]:
    return np.random.default_rng(seed).integers(3, 512, length).tolist()


@pytest.fixture(scope="module")
def stateless():
    """The oracle: a server without reuse, one-shot prefill of each whole prompt."""
    return LLM(store=None)


def test_one_offs_with_a_shared_prefix_reuse_it_and_give_the_stateless_tokens(stateless):
    llm = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    first = llm.generate(SYSTEM + user_prompt(1), max_tokens=12, ignore_eos=True)
    second = llm.generate(SYSTEM + user_prompt(2), max_tokens=12, ignore_eos=True)
    assert first.cached_tokens == 0 and second.cached_tokens == len(SYSTEM)
    assert second.tiers == {"hbm": 3}
    for index, result in ((1, first), (2, second)):
        assert result.token_ids == stateless.generate(
            SYSTEM + user_prompt(index), max_tokens=12, ignore_eos=True).token_ids
    again = llm.generate(SYSTEM + user_prompt(1), max_tokens=12, ignore_eos=True)
    assert again.cached_tokens == 64 and again.token_ids == first.token_ids  # 4 blocks


def test_two_sessions_with_one_system_prompt_hold_one_copy(stateless):
    llm = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    a = llm.chat("a", SYSTEM + user_prompt(3), max_tokens=8, ignore_eos=True)
    held_after_a = llm.engine.stats()["store"]["hbm_blocks"]
    b = llm.chat("b", SYSTEM + user_prompt(4), max_tokens=8, ignore_eos=True)
    assert b.cached_tokens == len(SYSTEM)
    keys_a, keys_b = (context_keys(llm.engine.conversation(s)) for s in "ab")
    assert keys_a[:3] == keys_b[:3] and keys_a[3:] != keys_b[3:]
    distinct = len(set(keys_a) | set(keys_b))
    assert llm.engine.stats()["store"]["hbm_blocks"] == distinct < len(keys_a) + len(keys_b)
    assert held_after_a == len(keys_a)
    llm.store.flush()
    assert llm.store.stats()["host_blocks"] == distinct
    assert a.token_ids == stateless.generate(SYSTEM + user_prompt(3), max_tokens=8,
                                             ignore_eos=True).token_ids


@pytest.mark.parametrize("tier", ["hbm", "host", "disk"])
def test_reused_kv_equals_a_one_shot_prefill(stateless, tier, tmp_path):
    """The pool blocks a turn reuses — straight from the device pool, loaded from host
    memory or from disk — hold the KV a one-shot prefill of the same tokens computes
    (float tolerance: a session's answer tokens were computed by decode steps)."""
    config = StoreConfig(hbm_bytes=0 if tier != "hbm" else 1 << 26,
                         host_bytes=0 if tier == "disk" else 1 << 26,
                         disk_bytes=1 << 26 if tier == "disk" else 0,
                         disk_path=str(tmp_path) if tier == "disk" else None)
    llm = LLM(store=config)
    llm.chat("s", SYSTEM + user_prompt(5), max_tokens=30, ignore_eos=True)
    llm.store.flush()
    conversation = llm.engine.conversation("s")
    keys = context_keys(conversation)
    turn = llm.chats.begin("s", [5, 6, 7], llm_params(), ignore_eos=True, start_time=0.0)
    assert turn.result.tiers == {tier: len(keys)}
    prefill_alone(llm.chats, turn)  # its first tokens land the blocks arriving
    reused = read_blocks(llm, turn.table[:len(keys)])
    llm.chats.abort(turn)
    tokens = conversation.tokens[:len(keys) * 16]
    expected = one_shot_blocks(stateless, tokens)
    for got, want in zip(reused, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def prefill_alone(chats, turn):
    """Runs a turn's whole prompt as the engine would with no other turn: its first
    step taking the blocks arriving, then packed steps. Returns the logits `[V]` of its
    first answer token."""
    logits = chats.run(chats.plan_arrival(turn)).logits[0] if turn.loading else None
    while turn.prefilling:
        count = min(len(turn.turn_tokens) - turn.prefilled, chats.step_tokens)
        logits = chats.run(chats.plan_step([], [(turn, count)])).logits[0]
    return logits


def llm_params():
    from jattn.sampling import SamplingParams

    return SamplingParams(max_tokens=4)


def read_blocks(llm, ids):
    """K and V `[L, n, 16, Hkv, D]` of pool blocks `ids`, copied out by a step's saves."""
    plan = StepPlan(saves=tuple(BlockSave(bytes(16), block) for block in ids))
    saved = llm.runner.execute(plan).saved()
    return tuple(np.stack([np.asarray(getattr(saved[block], part)) for block in ids], axis=1)
                 for part in ("k", "v"))


def one_shot_blocks(llm, tokens):
    """K and V `[L, n, 16, Hkv, D]` of a stateless prefill of `tokens` (n full blocks)."""
    ids = llm.chats.blocks.allocate(blocks_for(len(tokens), 16))
    try:
        llm.runner.prefill(tokens, 0, ids)
        return read_blocks(llm, ids)
    finally:
        llm.chats.blocks.free(ids)


def test_scopes_never_share_a_block():
    llm = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    chats = llm.chats
    prompt = SYSTEM + user_prompt(6)
    from jattn.engine.turns import OneOff
    from jattn.sampling import SamplingParams

    def one_off(number, scope):
        turn = chats.begin(OneOff(number), prompt, SamplingParams(max_tokens=4),
                           ignore_eos=True, start_time=0.0, ephemeral=True, scope=scope)
        cached = turn.result.cached_tokens
        logits = prefill_alone(chats, turn)
        turn.continuation.take(int(np.argmax(logits)))
        chats.complete(turn)
        return cached

    assert one_off(0, "tenant-a") == 0
    assert one_off(1, "tenant-b") == 0  # the same tokens, another tenant: nothing shared
    assert one_off(2, "tenant-a") == len(SYSTEM) + 16
    assert chats.block_census().balanced


def test_over_grpc_one_offs_and_decode_reuse_and_tenants_and_salts_do_not_share():
    import grpc

    from serve.client import Client
    from serve.config import ServeConfig
    from serve.server import Server

    server = Server(ServeConfig(port=0, http_port=0, warm_up=False, compilation_cache_dir=None,
                                auth_tokens=["token-of-alice", "token-of-bob"])).start()
    address = f"127.0.0.1:{server.port}"
    alice, bob = (Client(address, token=f"token-of-{name}") for name in ("alice", "bob"))
    first = alice.chat("", token_ids=SYSTEM + user_prompt(7), max_tokens=6, ignore_eos=True)
    second = alice.chat("", token_ids=SYSTEM + user_prompt(8), max_tokens=6, ignore_eos=True)
    assert first.facts.cached_tokens == 0 and second.facts.cached_tokens == len(SYSTEM)
    assert dict(second.facts.tier_blocks) == {"hbm": 3}
    other = bob.chat("", token_ids=SYSTEM + user_prompt(8), max_tokens=6, ignore_eos=True)
    assert other.facts.cached_tokens == 0 and other.token_ids == second.token_ids
    salted = [alice.chat("", token_ids=SYSTEM + user_prompt(8), max_tokens=6,
                         ignore_eos=True, cache_salt="private") for _ in range(2)]
    assert [r.facts.cached_tokens for r in salted] == [0, len(SYSTEM) + 16]
    assert salted[0].token_ids == second.token_ids
    with pytest.raises(grpc.RpcError) as refused:
        alice.chat("", token_ids=SYSTEM, max_tokens=2, cache_salt="s" * 1025)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cache_salt of 1025 characters" in refused.value.details()
    reused = server.engine.stats()["tokens_reused"]
    list(alice.decode(token_ids=SYSTEM + user_prompt(9), max_tokens=4))  # JetStream Decode
    assert server.engine.stats()["tokens_reused"] == reused + len(SYSTEM)
    for client in (alice, bob):
        client.close()
    server.stop()


def test_a_truncated_context_recomputed_equals_a_store_that_lost_nothing():
    """A truncated session's context is not a prefix of its history; with every block
    lost it is recomputed from the history following the turn log's truncations. Its
    KV equals that of the same session on a store that never evicts (whose blocks were
    computed turn by turn, answers by decode steps), block for block."""
    keeper = LLM(store=StoreConfig(hbm_bytes=1 << 28, host_bytes=0), max_context=128)
    forgetful = LLM(store=None, max_context=128)
    for seed in range(5):
        for llm in (keeper, forgetful):
            llm.chat("s", user_prompt(seed), max_tokens=20, ignore_eos=True)
    conversation = keeper.engine.conversation("s")
    assert any(turn.dropped for turn in conversation.turns)
    assert conversation.blocks[1][1] > 16  # the context skips part of the history
    held = keeper.chats.begin("s", [5], llm_params(), ignore_eos=True, start_time=0.0)
    kept = held.table[:len(context_keys(conversation))]
    assert held.result.tiers == {"hbm": len(kept)}
    turn = forgetful.chats.begin("s", [5], llm_params(), ignore_eos=True, start_time=0.0)
    try:
        assert turn.result.cached_tokens == 0 and not turn.dropped
        assert turn.result.recomputed_tokens > len(kept) * 16  # the history, prefilled
        recomputed = read_blocks(forgetful, turn.table[:len(kept)])
    finally:
        forgetful.chats.abort(turn)
    expected = read_blocks(keeper, kept)
    keeper.chats.abort(held)
    for got, want in zip(recomputed, expected):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_a_queued_turn_finds_its_disk_blocks_in_host_memory_when_it_begins(
        stateless, tmp_path, monkeypatch):
    """A one-off whose prompt's blocks are only on a slow disk (written before a restart),
    queued behind a running turn: the store reads them into host memory while it waits,
    so it begins with every one in host memory, reads nothing from disk on its way, and
    gives the tokens of a stateless prefill."""
    from jattn.engine import EngineLimits, TurnRequest
    from jattn.sampling import SamplingParams
    from jattn.store.disk_tier import DiskTier

    prompt = SYSTEM + user_prompt(6, 40)  # 88 tokens: 5 full blocks before the last
    disk = dict(disk_bytes=1 << 26, disk_path=str(tmp_path))
    before_restart = LLM(store=StoreConfig(hbm_bytes=0, host_bytes=0, **disk))
    before_restart.generate(prompt, max_tokens=2, ignore_eos=True)
    before_restart.close()

    reads = []  # the blocks read from disk
    slow_get, slow_get_run = DiskTier.get, DiskTier.get_run

    def get(tier, key):
        time.sleep(0.02)
        block = slow_get(tier, key)
        if block is not None:
            reads.append(key)
        return block

    def get_run(tier, keys, max_bytes=None):
        time.sleep(0.02 * len(keys))
        blocks = slow_get_run(tier, keys, max_bytes)
        reads.extend(keys[:len(blocks)])
        return blocks

    monkeypatch.setattr(DiskTier, "get", get)
    monkeypatch.setattr(DiskTier, "get_run", get_run)
    llm = LLM(store=StoreConfig(hbm_bytes=0, host_bytes=1 << 26, **disk))
    engine = llm.start_engine(EngineLimits(max_running=1))
    running = engine.submit(TurnRequest(None, "tokens", tuple(user_prompt(7)),
                                        SamplingParams(max_tokens=480), ignore_eos=True))
    queued = engine.submit(TurnRequest(None, "tokens", tuple(prompt),
                                       SamplingParams(max_tokens=12), ignore_eos=True))
    deadline = time.monotonic() + 60
    while llm.store.stats()["prefetched_blocks"] < 5:
        assert time.monotonic() < deadline, "the queued turn's blocks were never prefetched"
        time.sleep(0.01)
    assert queued.result is None  # still waiting: the running turn holds the one slot
    read_while_queued = len(reads)
    running.cancel()
    tokens = [token.id for token in queued]
    assert queued.result.tiers == {"host": 5} and queued.result.cached_tokens == 80
    assert len(reads) == read_while_queued == 5
    assert tokens == stateless.generate(prompt, max_tokens=12, ignore_eos=True).token_ids
    llm.close()


def test_a_one_off_ends_before_its_saves_copy_and_a_flush_still_waits_for_them(
        stateless, monkeypatch):
    """A one-off's client is answered once its blocks are published and their saves
    queued: the copies out of the pool (made slow here) come after its stream ended,
    and a store flush right then waits for them; a later one-off reuses those blocks
    from host memory with the stateless tokens."""
    llm = LLM(store=StoreConfig(hbm_bytes=0, host_bytes=1 << 26))
    llm.generate([5, 6], max_tokens=2)  # the engine running, its first shapes compiled
    steps = type(llm.runner._executor)
    copied = []

    def slow_copy_out(self, block_ids, memory_kind):
        time.sleep(0.5)
        copied.append(time.perf_counter())
        return original(self, block_ids, memory_kind)

    original = steps.copy_out
    monkeypatch.setattr(steps, "copy_out", slow_copy_out)
    prompt = SYSTEM + user_prompt(7)
    tokens = [token.id for token in llm.stream(prompt, max_tokens=4, ignore_eos=True)]
    ended = time.perf_counter()
    llm.store.flush()
    assert len(copied) == 1 and ended < copied[0]  # answered before the copy was made
    keys = llm.chats.prompt_keys(prompt, "tokens")
    assert len(keys) == len(prompt) // 16 and llm.store.held(keys) == ["host"] * len(keys)
    monkeypatch.setattr(steps, "copy_out", original)
    again = llm.generate(prompt + [11, 12], max_tokens=6, ignore_eos=True)
    assert again.tiers == {"host": len(keys)}
    assert tokens == stateless.generate(prompt, max_tokens=4, ignore_eos=True).token_ids
    assert again.token_ids == stateless.generate(prompt + [11, 12], max_tokens=6,
                                                 ignore_eos=True).token_ids
