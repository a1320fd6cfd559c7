"""The remote tier over a real redis-server: blocks and records shared by replicas, values
checked, and a Redis that is down, goes away or comes back never failing a request."""

from __future__ import annotations

import time

import numpy as np
import pytest

from jattn import LLM, StoreConfig
from jattn.store.remote_tier import RemoteTier
from jattn.store.tier import BlockKV
from jattn.bench.redis_server import RedisServer, free_port

FINGERPRINT = "f" * 64


def block(seed: int) -> BlockKV:
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal((2, 16, 2, 8)).astype(np.float32),
                   rng.standard_normal((2, 16, 2, 8)).astype(np.float32))


def key(n: int) -> bytes:
    return n.to_bytes(16, "little")


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def test_blocks_round_trip_and_two_replicas_write_one_copy(redis_server):
    a = RemoteTier(redis_server.url, fingerprint=FINGERPRINT)
    b = RemoteTier(redis_server.url, fingerprint=FINGERPRINT)
    assert a.get(key(1)) is None and not a.contains(key(1))
    assert a.put(key(1), block(1)) and a.contains(key(1))
    assert b.put(key(1), block(99))  # SET NX: the first copy stays
    got = b.get(key(1))
    np.testing.assert_array_equal(got.k, block(1).k)
    np.testing.assert_array_equal(got.v, block(1).v)
    assert a.stats()["remote_blocks_written"] == 1 and b.stats()["remote_blocks_written"] == 0
    assert redis_server.client().dbsize() == 1
    assert set(a.keys()) == {key(1)}
    a.delete(key(1))
    assert b.get(key(1)) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "other_model", "other_key",
                                    "other_layer"])
def test_corrupt_or_foreign_values_are_dropped(redis_server, damage):
    """One layer of block 1 is damaged: reading the block whole, or that layer alone,
    drops the block and counts it; block 2 is untouched."""
    tier = RemoteTier(redis_server.url, fingerprint=FINGERPRINT)
    tier.put(key(1), block(1))
    tier.put(key(2), block(2))
    client = redis_server.client()
    name = tier.block_name(key(1))
    data = client.hget(name, "1")
    if damage == "flip":
        data = data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    elif damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "other_model":
        data = data.replace(FINGERPRINT.encode(), b"0" * 64)
    elif damage == "other_key":
        data = client.hget(tier.block_name(key(2)), "1")
    else:
        data = client.hget(name, "0")
    client.hset(name, "1", data)
    assert tier.read_layer([key(1), key(2)], 0)[0] is not None  # layer 0 is sound
    assert tier.get(key(1)) is None
    counter = "stale_entries" if damage.startswith("other_") and damage != "other_model" \
        else "corrupt_entries"
    assert tier.stats()[counter] == 1
    assert not client.exists(name)  # dropped, every layer
    assert tier.get(key(2)) is not None


def test_a_run_is_read_layer_by_layer_and_a_block_lost_midway_is_reported(redis_server):
    """`RemoteRead` gives each layer of a run as written; the run ends at the first block
    Redis lacks; a block that vanishes after its layer 0 was read makes the later layers
    raise `RemoteBlockLost` (counted), never a wrong value."""
    import concurrent.futures

    from jattn.store.remote_read import RemoteBlockLost, RemoteRead

    tier = RemoteTier(redis_server.url, fingerprint=FINGERPRINT)
    for n in (1, 2, 4):
        tier.put(key(n), block(n))
    executor = concurrent.futures.ThreadPoolExecutor(1)
    arrived, lost = [], []
    read = RemoteRead(tier, [key(1), key(2), key(3), key(4)], executor=executor,
                      on_arrival=lambda keys, blocks, _: arrived.append((keys, blocks)),
                      on_lost=lambda: lost.append(1))
    assert read.ready.result(timeout=10) == 2 and read.keys == [key(1), key(2)]
    blocks = read.blocks()
    for n, got in zip((1, 2), blocks):
        assert got.k.shape == block(n).k.shape
        for layer in range(2):
            np.testing.assert_array_equal(got.k[layer], block(n).k[layer])
            np.testing.assert_array_equal(got.v[layer], block(n).v[layer])
    executor.shutdown(wait=True)
    assert [k for k in arrived[0][0]] == [key(1), key(2)] and not lost
    np.testing.assert_array_equal(arrived[0][1][1].v, block(2).v)

    class Evicting:
        """The tier, whose block 2 is evicted right after layer 0 was read."""

        def read_layer(self, keys, layer):
            got = tier.read_layer(keys, layer)
            if layer == 0:
                redis_server.client().delete(tier.block_name(key(2)))
            return got

    executor = concurrent.futures.ThreadPoolExecutor(1)
    read = RemoteRead(Evicting(), [key(1), key(2)], executor=executor,
                      on_arrival=lambda *_: arrived.append(None),
                      on_lost=lambda: lost.append(1))
    assert read.ready.result(timeout=10) == 2
    np.testing.assert_array_equal(read.blocks()[1].k[0], block(2).k[0])
    with pytest.raises(RemoteBlockLost):
        read.blocks()[0].k[1]
    executor.shutdown(wait=True)
    assert lost == [1] and len(arrived) == 1


def test_two_replicas_writing_one_record_at_once_never_interleave(redis_server):
    """Replicas A and B both hold a session at one turn and each records a second turn
    (a client that retried on B while A still ran): B writes first; A's write finds the
    record changed, leaves B's record whole, counts the conflict and takes B's record."""
    from jattn.store import AttentionStore

    a, b = (AttentionStore(StoreConfig(hbm_bytes=0, host_bytes=1 << 20,
                                       remote_url=redis_server.url), fingerprint=FINGERPRINT)
            for _ in range(2))
    assert a.append_record("s", {"turn": 1}).result()
    b.refresh_record("s").result()
    assert b.get_record("s", check_remote=False) == [{"turn": 1}]
    assert b.append_record("s", {"turn": 2, "by": "b"}).result()
    assert a.append_record("s", {"turn": 2, "by": "a"}).result() is False
    assert a.stats()["remote_record_conflicts"] == 1
    assert a.get_record("s", check_remote=False) == [{"turn": 1}, {"turn": 2, "by": "b"}]
    fresh = AttentionStore(StoreConfig(hbm_bytes=0, remote_url=redis_server.url),
                           fingerprint=FINGERPRINT)
    assert fresh.get_record("s") == [{"turn": 1}, {"turn": 2, "by": "b"}]
    assert a.append_record("s", {"turn": 3, "by": "a"}).result()  # in step again
    assert fresh.get_record("s")[-1] == {"turn": 3, "by": "a"}
    for store in (a, b, fresh):
        store.close()


def test_an_unreachable_redis_is_served_around_and_reconnected():
    port = free_port()
    tier = RemoteTier(f"redis://127.0.0.1:{port}/0", fingerprint=FINGERPRINT,
                      timeout_s=0.2, retry_s=0.2)
    assert tier.stats()["remote_available"] == 0 and tier.stats()["remote_errors"] == 1
    assert tier.get(key(1)) is None and not tier.put(key(1), block(1))
    server = RedisServer(port)
    try:
        time.sleep(0.3)
        assert tier.put(key(1), block(1)) and tier.get(key(1)) is not None
        assert tier.stats()["remote_available"] == 1
    finally:
        server.stop()
    assert tier.get(key(1)) is None  # gone with the server: a miss, not an error
    assert tier.stats()["remote_available"] == 0


def replica(url: str) -> LLM:
    """A server's model with its own device and host tiers (small, so that later turns
    must look further) and the shared remote tier."""
    return LLM(store=StoreConfig(hbm_bytes=0, host_bytes=1 << 26, remote_url=url))


PROMPTS = [[5, 6, 7, 8] * 10, [9, 10, 11] * 7, [12, 13] * 9]


def test_a_conversation_moves_between_replicas_with_the_tokens_of_one_server(redis_server):
    """Turn 1 on replica A, turn 2 on replica B (its own local tiers empty), turn 3 on A
    again: B finds the session's record and its history's blocks in Redis, and every
    turn's tokens equal those of one server that kept everything (greedy)."""
    single = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    want = [single.chat("s", p, max_tokens=12, ignore_eos=True).token_ids for p in PROMPTS]
    a, b = replica(redis_server.url), replica(redis_server.url)
    first = a.chat("s", PROMPTS[0], max_tokens=12, ignore_eos=True)
    a.store.flush()
    second = b.chat("s", PROMPTS[1], max_tokens=12, ignore_eos=True)
    assert [first.token_ids, second.token_ids] == want[:2]
    assert second.tiers.get("remote", 0) > 0 and second.cached_tokens >= 48
    b.store.flush()
    fresh_a = replica(redis_server.url)  # as A restarted: it reads the record from Redis
    third = fresh_a.chat("s", PROMPTS[2], max_tokens=12, ignore_eos=True)
    assert third.token_ids == want[2] and third.cached_tokens > second.cached_tokens


def test_remote_blocks_load_layer_by_layer_and_a_block_evicted_midway_is_recomputed(
        redis_server, monkeypatch):
    """Replica B's turn takes replica A's prefix from Redis layer by layer: the load is
    counted as the remote tier's, with its transfer split into hidden and stalled time.
    Then Redis evicts a block after B has read its first layer: B's turn starts again,
    recomputes, and gives the stateless tokens; nothing fails."""
    prefix = [5, 6, 7, 8] * 12
    publisher = replica(redis_server.url)
    publisher.generate(prefix + [9], max_tokens=2, ignore_eos=True)
    publisher.store.flush()
    want = LLM(store=None).generate(prefix + [10, 11], max_tokens=6, ignore_eos=True)

    b = replica(redis_server.url)
    got = b.generate(prefix + [10, 11], max_tokens=6, ignore_eos=True)
    assert got.token_ids == want.token_ids and got.tiers == {"remote": 3}
    stats = b.store.stats()
    assert stats["remote_loads"] == 1 and stats["remote_hits"] == 3
    assert stats["remote_load_seconds"] > 0
    assert stats["remote_load_hidden_seconds"] + stats["remote_load_stall_seconds"] \
        >= stats["remote_load_seconds"] - 1e-9
    deadline = time.monotonic() + 5  # the read puts the whole blocks in host memory last
    while b.store.stats()["remote_fetched_blocks"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.store.stats()["remote_fetched_blocks"] == 3
    assert b.store.stats()["host_blocks"] >= 3

    c = replica(redis_server.url)
    read_layer = RemoteTier.read_layer

    def evict_after_layer_0(tier, keys, layer):
        values = read_layer(tier, keys, layer)
        if layer == 0 and keys:
            redis_server.client().delete(tier.block_name(keys[-1]))
        return values

    monkeypatch.setattr(RemoteTier, "read_layer", evict_after_layer_0)
    again = c.generate(prefix + [10, 11], max_tokens=6, ignore_eos=True)
    assert again.token_ids == want.token_ids
    assert again.tiers == {} and again.recomputed_tokens == len(prefix) + 2
    assert c.store.stats()["remote_lost_loads"] == 1
    assert c.engine.stats()["restarted"] == 1 and c.engine.stats().get("failed", 0) == 0


def test_redis_going_away_and_back_fails_no_request(redis_server):
    llm = replica(redis_server.url)
    single = LLM(store=None)
    for round_ in range(3):
        if round_ == 1:
            redis_server.stop()
        if round_ == 2:
            redis_server.start()
        prompt = [20 + round_] * 40
        got = llm.generate(prompt, max_tokens=6, ignore_eos=True)
        assert got.token_ids == single.generate(prompt, max_tokens=6,
                                                ignore_eos=True).token_ids
        llm.store.flush()
    stats = llm.store.stats()
    assert stats["remote_errors"] >= 1


def test_a_turn_waiting_for_redis_never_stalls_the_others(redis_server):
    """Redis hangs for 0.6 s while turn B's prefix is in it: B waits for its fetch (off
    the engine's thread) while turn A keeps decoding, then B reuses the fetched blocks
    and gives the stateless tokens."""
    import threading

    from jattn.engine import TurnRequest
    from jattn.sampling import SamplingParams

    prefix = [5, 6, 7, 8] * 12
    publisher = replica(redis_server.url)
    publisher.generate(prefix + [9], max_tokens=2, ignore_eos=True)
    publisher.store.flush()
    llm = replica(redis_server.url)
    engine = llm.engine
    long_turn = TurnRequest(None, "tokens", (3, 4), SamplingParams(max_tokens=400),
                            ignore_eos=True)
    list(engine.submit(long_turn))  # compiles A's decode steps, so that none stalls below
    a = engine.submit(long_turn)
    arrivals = []
    reader = threading.Thread(target=lambda: arrivals.extend(time.perf_counter() for _ in a))
    reader.start()
    while not arrivals:
        time.sleep(0.001)
    hang = threading.Thread(target=lambda: redis_server.client().execute_command(
        "DEBUG", "SLEEP", "0.6"))
    hanging = time.perf_counter()
    hang.start()
    time.sleep(0.05)
    submitted = time.perf_counter()
    b = engine.submit(TurnRequest(None, "tokens", tuple(prefix + [10, 11]),
                                  SamplingParams(max_tokens=4), ignore_eos=True))
    b_tokens = [token.id for token in b]
    reader.join()
    hang.join()
    assert b.result.cached_tokens == len(prefix) and b.result.tiers == {"remote": 3}
    assert b_tokens == LLM(store=None).generate(prefix + [10, 11], max_tokens=4,
                                                ignore_eos=True).token_ids
    assert b.result.ttft_s > 0.4  # B did wait for Redis (its shapes then compile)
    during = [t for t in arrivals if submitted <= t <= hanging + 0.55]  # Redis hangs
    assert len(during) > 10, "A made no progress while B waited for Redis"
    gaps = [later - earlier for earlier, later in zip(during, during[1:])]
    assert max(gaps) < 0.25, f"the engine stalled {max(gaps):.2f} s"
