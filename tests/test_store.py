"""AttentionStore on its own: entries, budgets, eviction order, hints, threads."""

import hashlib
import os
import threading

import numpy as np
import pytest

from jattn.store import AttentionStore, BlockKV, StoreConfig
from jattn.store import disk_entry
from jattn.store.policy import eviction_order

FINGERPRINT = "f" * 64


def block(seed, layers=2, size=4):
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal((layers, size, 2, 8)).astype(np.float32),
                   rng.standard_normal((layers, size, 2, 8)).astype(np.float32))


BLOCK_BYTES = block(0).nbytes


def content_key(session, serial):
    """A 16-byte block key, distinct per session and serial (as the engine's are)."""
    return hashlib.blake2b(f"{session}/{serial}".encode(), digest_size=16).digest()


def disk_usage(root):
    """What the disk budget counts under `root`: file sizes, 4096 bytes per directory
    below it."""
    return sum(sum(os.path.getsize(os.path.join(d, f)) for f in files) + 4096 * len(dirs)
               for d, dirs, files in os.walk(root))


def test_disk_entry_round_trip_and_every_check(tmp_path):
    arrays = {"k": block(1).k, "v": block(1).v.astype("bfloat16")}
    data = disk_entry.encode(arrays, fingerprint=FINGERPRINT, meta={"serial": 3})
    decoded, meta = disk_entry.decode(data, fingerprint=FINGERPRINT)
    assert meta == {"serial": 3}
    for name in arrays:
        assert decoded[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(decoded[name], arrays[name])
    flipped = bytearray(data)
    flipped[-5] ^= 1
    cases = {
        "checksum mismatch": bytes(flipped),
        "checksum mismatch|shorter": data[:-7],
        "another model": data.replace(FINGERPRINT.encode(), b"e" * 64),
        "bad magic": b"XXXX" + data[4:],
    }
    for pattern, damaged in cases.items():
        with pytest.raises(disk_entry.CorruptEntry, match=pattern):
            disk_entry.decode(damaged, fingerprint=FINGERPRINT)
    path = str(tmp_path / "a" / "entry.kv")
    disk_entry.write_atomic(path, data)
    assert os.listdir(tmp_path / "a") == ["entry.kv"]
    read_back, meta = disk_entry.read(path, fingerprint=FINGERPRINT)
    assert meta == {"serial": 3}
    for name in arrays:  # aligned, read-only views: safe to hand to a device in place
        np.testing.assert_array_equal(read_back[name], arrays[name])
        assert read_back[name].ctypes.data % 64 == 0 and not read_back[name].flags.writeable
    with pytest.raises(disk_entry.CorruptEntry, match="cannot read"):
        disk_entry.read(str(tmp_path / "nothing.kv"), fingerprint=FINGERPRINT)


def test_eviction_order_is_scheduler_aware_then_lru():
    last_used = {"a": 5, "b": 1, "c": 9, "d": 3, "e": 7}
    order = eviction_order(["a", "b", "c", "d", "e"], last_used=last_used,
                           upcoming=["c", "x", "a"])
    assert order == ["b", "d", "e", "a", "c"]  # outside by LRU, then farthest-upcoming


def test_host_budget_is_never_exceeded_and_evicts_by_policy():
    store = AttentionStore(StoreConfig(host_bytes=4 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    for session in ("s1", "s2", "s3"):
        for serial in range(2):
            store.save(session, serial, lambda: block(serial),
                       block_key=content_key(session, serial))
            store.flush()
            assert store.stats()["host_bytes"] <= 4 * BLOCK_BYTES
    assert store.get("s1", 0, block_key=content_key("s1", 0)) is None  # LRU went first
    assert store.get("s3", 1, block_key=content_key("s3", 1))[1] == "host"
    store.hint(["s2"]).result()
    store.save("s4", 0, lambda: block(9), block_key=content_key("s4", 0))
    store.save("s4", 1, lambda: block(9), block_key=content_key("s4", 1))
    store.flush()
    assert store.get("s2", 0, block_key=content_key("s2", 0)) is not None  # hinted: kept
    assert store.get("s3", 0, block_key=content_key("s3", 0)) is None  # over older-used s3
    store.close()


def test_hint_prefetches_from_disk_into_host(tmp_path):
    config = StoreConfig(host_bytes=2 * BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    for serial in range(2):
        store.save("old", serial, lambda s=serial: block(s), block_key=content_key("old", serial))
    for serial in range(2):
        store.save("new", serial, lambda s=serial: block(10 + s),
                   block_key=content_key("new", serial))
    store.flush()
    assert store.stats()["host_blocks"] == 2  # "old" was pushed out of host memory
    assert store.hint(["old"]).result() == 2
    found, tier = store.get("old", 1, block_key=content_key("old", 1))
    assert tier == "host"
    np.testing.assert_array_equal(found.k, block(1).k)
    assert store.stats()["prefetched_blocks"] == 2
    store.close()


def test_restart_reindexes_disk_and_ignores_torn_writes(tmp_path):
    config = StoreConfig(disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    store.save("s", 0, lambda: block(4), block_key=content_key("s", 0))
    assert store.append_record("s", {"tokens": [1, 2, 3]}).result() is True
    store.close()
    session_dir = next(p for p, _, files in os.walk(tmp_path) if "session.log" in files)
    open(os.path.join(session_dir, ".tmp-abandoned"), "wb").write(b"half a file")
    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert again.get_record("s") == [{"tokens": [1, 2, 3]}]
    found, tier = again.get("s", 0, block_key=content_key("s", 0))
    assert tier == "disk"
    np.testing.assert_array_equal(found.v, block(4).v)
    assert not [f for f in os.listdir(session_dir) if f.startswith(".tmp-")]
    other_model = AttentionStore(config, fingerprint="0" * 64)
    assert other_model.get_record("s") is None
    assert other_model.get("s", 0, block_key=content_key("s", 0)) is None


def test_concurrent_sessions_from_many_threads(tmp_path):
    config = StoreConfig(host_bytes=20 * BLOCK_BYTES, disk_bytes=60 * (BLOCK_BYTES + 512),
                         disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    errors = []

    def worker(index):
        try:
            session = f"user-{index}"
            for serial in range(6):
                store.save(session, serial, lambda s=serial: block(index * 100 + s),
                           block_key=content_key(session, serial))
            store.append_record(session, {"turn": 0})
            store.hint([session])
            for serial in range(6):
                found = store.get(session, serial, block_key=content_key(session, serial))
                if found is not None:
                    np.testing.assert_array_equal(found[0].k, block(index * 100 + serial).k)
                stats = store.stats()
                assert stats["host_bytes"] <= config.host_bytes
                assert stats["disk_bytes"] <= config.disk_bytes
        except Exception as error:  # reported below, with the thread's index
            errors.append((index, error))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert not errors, errors
    root = os.path.join(tmp_path, FINGERPRINT[:16])
    assert disk_usage(root) == store.stats()["disk_bytes"] <= config.disk_bytes


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(host_bytes=-1), "host_bytes must be an integer >= 0"),
    (dict(disk_bytes=10), "disk_bytes > 0 needs a disk_path"),
    (dict(block_size=0), "block_size must be >= 1"),
])
def test_bad_store_config_is_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        StoreConfig(**kwargs)


def test_first_victim_is_the_head_of_the_eviction_order():
    import random

    from jattn.store.policy import first_victim, window_rank

    rng = random.Random(0)
    for _ in range(200):
        sessions = rng.sample(range(30), rng.randint(1, 12))
        last_used = {s: rng.randint(0, 100) for s in sessions if rng.random() < 0.8}
        upcoming = rng.sample(range(30), rng.randint(0, 8))
        order = eviction_order(sessions, last_used=last_used, upcoming=upcoming)
        head = first_victim(sessions, last_used=last_used, upcoming_rank=window_rank(upcoming))
        key = (lambda s: last_used.get(s, -1)) if head not in upcoming else \
            (lambda s: -window_rank(upcoming)[s])
        assert key(head) == key(order[0])


def test_host_memory_kind_choice():
    import jax
    cpu = jax.devices("cpu")[0]
    assert StoreConfig().memory_kind_for(cpu) is None  # on CPU the device is host memory
    assert StoreConfig(host_memory_kind="pinned_host").memory_kind_for(cpu) == "pinned_host"
    assert StoreConfig(host_memory_kind="numpy").memory_kind_for(cpu) is None
    with pytest.raises(ValueError, match="host_memory_kind must be one of"):
        StoreConfig(host_memory_kind="gpu")


def test_record_entries_are_appended_after_their_blocks(tmp_path):
    config = StoreConfig(disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    release = threading.Event()
    store.save("s", 0, lambda: release.wait(30) and block(0), block_key=content_key("s", 0))
    durable = store.append_record("s", {"tokens": [0]})  # queued behind the save
    assert store.get_record("s") == [{"tokens": [0]}]
    assert not durable.done()
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f == "session.log"]
    release.set()
    assert durable.result() is True
    for n in range(1, 20):
        store.save("s", n, lambda n=n: block(n), block_key=content_key("s", n))
        store.append_record("s", {"tokens": [n]})
    store.close()
    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert again.get_record("s") == [{"tokens": [n]} for n in range(20)]
    for n in range(20):
        found, tier = again.get("s", n, block_key=content_key("s", n))
        assert tier == "disk"
        np.testing.assert_array_equal(found.k, block(n).k)


def test_dropping_some_blocks_of_a_turn_frees_their_shared_array():
    """A turn's blocks are views of one array; after some are dropped, the kept ones own
    their memory (so the array is not kept alive for them) and keep their values."""
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((2, 6, 4, 2, 8)).astype(np.float32) for _ in "kv")
    store = AttentionStore(StoreConfig(host_bytes=10**6), fingerprint=FINGERPRINT)
    for serial in range(6):
        store.save("s", serial, lambda i=serial: BlockKV(k[:, i], v[:, i]),
                   block_key=content_key("s", serial))
    store.save("other", 0, lambda: BlockKV(k[:, 0], v[:, 0]), block_key=content_key("other", 0))
    store.flush()
    store.drop_blocks("s", [1, 2, 3])
    for serial in (0, 4, 5):
        found, tier = store.get("s", serial, block_key=content_key("s", serial))
        assert tier == "host"
        assert not np.shares_memory(found.k, k) and not np.shares_memory(found.v, v)
        np.testing.assert_array_equal(found.k, k[:, serial])
        np.testing.assert_array_equal(found.v, v[:, serial])
    for serial in (1, 2, 3):
        assert store.get("s", serial, block_key=content_key("s", serial)) is None
    other = store.get("other", 0, block_key=content_key("other", 0))
    assert np.shares_memory(other[0].k, k)  # another session's, untouched
    store.close()
