"""No turn of a session disappears without a call saying so. A session whose record in
the shared tier is lost is never continued from less: two replicas share a real
redis-server, a conversation alternates between them, Redis loses or garbles its
record, and every later turn either gives the tokens of a server that lost nothing or
fails with `SessionLost`, on both replicas, until the session is ended. A turn whose
record a failing disk did not take says so (`durable` False)."""

from __future__ import annotations

import errno
import os

import pytest
import redis

from jattn import LLM, StoreConfig
from jattn.bench.redis_server import RedisServer
from jattn.engine import SessionLost
from jattn.store import disk_entry
from jattn.store.records import chain_digest, session_key

PROMPTS = [[5, 6, 7, 8] * 6, [9, 10, 11] * 5, [12, 13] * 7, [14, 15, 16] * 4,
           [17, 18] * 6, [19, 20, 21] * 3]
LOST_AFTER = 3  # turns run before the damage


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A redis-server, two replicas sharing it and a store key (no tiers of their own to
    fall back on but small host memory), and one server that keeps everything, as the
    reference."""
    server = RedisServer()
    key = tmp_path_factory.mktemp("key") / "store.key"
    key.write_bytes(os.urandom(24))
    replicas = [LLM(store=StoreConfig(hbm_bytes=0, host_bytes=1 << 26, remote_url=server.url,
                                      key_file=str(key)))
                for _ in range(2)]
    reference = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26))
    yield server, replicas, reference
    for llm in replicas + [reference]:
        llm.close()
    server.stop()


def record_name(llm: LLM, session: str) -> str:
    return llm.store._remote.record_name(session_key(session))


def lose_by_lru(client: redis.Redis, name: str) -> None:
    """Fills Redis past a small maxmemory under allkeys-lru until `name` is evicted."""
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("maxmemory", client.info("memory")["used_memory"] + (1 << 20))
    for filler in range(100_000):
        if not client.exists(name):
            break
        client.set(f"filler:{filler}", b"x" * (64 << 10))
    client.config_set("maxmemory", 0)
    client.config_set("maxmemory-policy", "noeviction")


def forge_a_turn(client: redis.Redis, name: str) -> None:
    """Appends a turn to the record `name`, chained as a writer without the store key
    would chain it."""
    last = disk_entry.decode_frames(client.lindex(name, -1))[0][0]
    forged = {**last, "tokens": [1, 2, 3]}
    forged["chain"] = chain_digest(last["chain"], forged)
    client.rpush(name, disk_entry.encode_frame(forged))


DAMAGES = {
    "deleted": lambda client, name, other: client.delete(name),
    "flushall": lambda client, name, other: client.flushall(),
    "evicted (allkeys-lru)": lambda client, name, other: lose_by_lru(client, name),
    "a string": lambda client, name, other: client.set(name, b"junk"),
    "garbage pushed": lambda client, name, other: client.rpush(name, b"\x00garbage"),
    "another session's record": lambda client, name, other: client.copy(
        other, name, replace=True),
    "a turn forged without the key": lambda client, name, other: forge_a_turn(client, name),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_lost_record_is_never_continued_from_less(shared, damage):
    server, (a, b), reference = shared
    session, other = f"lost-{damage}", f"other-{damage}"
    want = [reference.chat(session, p, max_tokens=6, ignore_eos=True).token_ids
            for p in PROMPTS]
    a.chat(other, PROMPTS[1], max_tokens=6, ignore_eos=True)
    a.store.flush()
    for turn in range(LOST_AFTER):  # alternating a, b, a: all as one server
        replica = (a, b)[turn % 2]
        got = replica.chat(session, PROMPTS[turn], max_tokens=6, ignore_eos=True)
        assert got.token_ids == want[turn]
        replica.store.flush()
    client = redis.Redis.from_url(server.url)
    DAMAGES[damage](client, record_name(a, session), record_name(a, other))
    lost = False
    for turn in range(LOST_AFTER, len(PROMPTS)):
        replica = (a, b)[turn % 2]
        try:
            got = replica.chat(session, PROMPTS[turn], max_tokens=6, ignore_eos=True)
        except SessionLost as error:
            assert session in str(error)
            lost = True
            continue
        assert not lost, "a lost session must stay lost on every replica"
        assert got.token_ids == want[turn]
        replica.store.flush()
    assert lost  # every damage here loses acknowledged turns or the record's identity
    assert a.store.stats()["lost_sessions"] + b.store.stats()["lost_sessions"] >= 1
    for replica in (a, b):  # ending it frees the id for a new conversation
        replica.end_session(session)
    fresh = a.chat(session, PROMPTS[0], max_tokens=6, ignore_eos=True)
    assert fresh.token_ids == want[0]
    a.store.flush()
    assert b.chat(session, PROMPTS[1], max_tokens=6, ignore_eos=True).token_ids == want[1]


def test_a_turn_a_failing_disk_did_not_record_says_so(tmp_path, monkeypatch):
    llm = LLM(store=StoreConfig(disk_bytes=1 << 30, disk_path=str(tmp_path)))
    assert llm.chat("kept", PROMPTS[0], max_tokens=4).durable is True
    assert llm.generate(PROMPTS[0], max_tokens=4).durable is None  # keeps no record

    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(disk_entry, "write_atomic", read_only)
    monkeypatch.setattr(disk_entry, "append", read_only)
    assert llm.chat("unkept", PROMPTS[1], max_tokens=4).durable is False
    assert llm.chat("unkept", PROMPTS[2], max_tokens=4).durable is False  # tier now off
    assert llm.engine.stats()["not_durable_turns"] == 2
    llm.close()
