"""AttentionStore on its own: blocks by content key, budgets, eviction order, hints,
records, restarts, threads."""

import hashlib
import os
import threading

import numpy as np
import pytest

from jattn.store import AttentionStore, BlockKV, StoreConfig
from jattn.store import disk_entry

FINGERPRINT = "f" * 64
DIRECTORY_BYTES = 4096  # what the store counts per directory below its root (documented)


def block(seed, layers=2, size=4):
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal((layers, size, 2, 8)).astype(np.float32),
                   rng.standard_normal((layers, size, 2, 8)).astype(np.float32))


BLOCK_BYTES = block(0).nbytes


def key(name):
    """A 16-byte block key per name (the engine's are content hashes too)."""
    return hashlib.blake2b(str(name).encode(), digest_size=16).digest()


def seed(name):
    """The random seed of the test data of block `name`."""
    return int.from_bytes(key(name)[:4], "little")


def save(store, name):
    """Saves block `name` (data from `seed(name)`); returns the future."""
    return store.save(key(name), lambda: block(seed(name)))


def assert_block(store, name, tier):
    found = store.get(key(name))
    assert found is not None and found[1] == tier, (name, found and found[1])
    np.testing.assert_array_equal(found[0].k, block(seed(name)).k)
    np.testing.assert_array_equal(found[0].v, block(seed(name)).v)


def root_of(path):
    return os.path.join(path, FINGERPRINT[:16])


def disk_usage(root):
    """What the disk budget counts under `root`: file sizes, DIRECTORY_BYTES per directory
    below it."""
    return sum(sum(os.path.getsize(os.path.join(d, f)) for f in files)
               + DIRECTORY_BYTES * len(dirs) for d, dirs, files in os.walk(root))


def block_files(root):
    return sorted(f for _, _, files in os.walk(root) for f in files if f.endswith(".kv"))


def test_disk_entry_round_trip_and_every_check(tmp_path):
    arrays = {"k": block(1).k, "v": block(1).v.astype("bfloat16")}
    data = disk_entry.encode(arrays, fingerprint=FINGERPRINT, meta={"block_key": "ab"})
    decoded, meta = disk_entry.decode(data, fingerprint=FINGERPRINT)
    assert meta == {"block_key": "ab"}
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
    assert meta == {"block_key": "ab"}
    for name in arrays:  # aligned, read-only views: safe to hand to a device in place
        np.testing.assert_array_equal(read_back[name], arrays[name])
        assert read_back[name].ctypes.data % 64 == 0 and not read_back[name].flags.writeable
    with pytest.raises(disk_entry.CorruptEntry, match="cannot read"):
        disk_entry.read(str(tmp_path / "nothing.kv"), fingerprint=FINGERPRINT)


def test_a_failed_write_removes_the_directories_it_created(tmp_path, monkeypatch):
    def no_rename(*args):
        raise OSError(28, "No space left on device")

    os.makedirs(tmp_path / "kept")
    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError):
        disk_entry.write_atomic(str(tmp_path / "kept" / "a" / "b" / "entry.kv"), b"data")
    assert os.listdir(tmp_path) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_host_budget_holds_and_hinted_blocks_outlive_older_unhinted_ones():
    store = AttentionStore(StoreConfig(host_bytes=4 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    for n in range(6):
        assert save(store, n).result() == ("host",)
        assert store.stats()["host_bytes"] == min(n + 1, 4) * BLOCK_BYTES
    assert [store.contains(key(n)) for n in range(6)] == [None, None] + ["host"] * 4
    assert_block(store, 5, "host")  # used last: 2, 3, 4, 5 from least recently used
    store.hint([key(2)]).result()
    save(store, 6).result()
    save(store, 7).result()
    # Block 2, the least recently used, is hinted: 3 and 4 go instead.
    assert {n for n in range(8) if store.contains(key(n))} == {2, 5, 6, 7}
    assert store.stats()["host_evictions"] == 4
    store.close()


def test_touch_marks_blocks_as_just_used():
    store = AttentionStore(StoreConfig(host_bytes=2 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    save(store, "a").result()
    save(store, "b").result()
    store.touch([key("a"), key("never saved")])
    save(store, "c").result()
    assert [store.contains(key(n)) for n in "abc"] == ["host", None, "host"]
    store.close()


def test_contains_names_the_fastest_tier_and_counts_nothing(tmp_path):
    config = StoreConfig(host_bytes=BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    save(store, "old").result()
    save(store, "new").result()  # pushes "old" out of host memory
    before = store.stats()
    assert [store.contains(key(n)) for n in ("new", "old", "never")] == ["host", "disk", None]
    assert store.stats() == before
    store.close()


def test_one_copy_per_tier_however_many_sessions_save_a_key(tmp_path):
    config = StoreConfig(disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    calls = []

    def produce():
        calls.append(1)
        return block(seed("shared"))

    assert store.save(key("shared"), produce).result() == ("host", "disk")
    release = threading.Event()
    busy = store.save(key("busy"), lambda: release.wait(30) and block(0))  # holds the thread
    for session in range(5):  # other sessions publish the same content
        held = store.save(key("shared"), lambda: pytest.fail("produce of a held block"))
        assert held.done() and held.result() == ("host", "disk")  # not queued
        store.append_record(f"s{session}", {"blocks": [key("shared").hex()]})
    release.set()
    busy.result()
    store.flush()
    assert len(calls) == 1
    stats = store.stats()
    assert (stats["host_blocks"], stats["disk_blocks"]) == (2, 2)
    assert (stats["saves"], stats["saves_skipped_held"]) == (2, 5)
    assert stats["host_bytes"] == 2 * BLOCK_BYTES
    assert block_files(tmp_path) == sorted(key(n).hex() + ".kv" for n in ("shared", "busy"))
    assert stats["disk_records"] == 5
    assert disk_usage(root_of(tmp_path)) == stats["disk_bytes"]
    store.close()


def test_saving_a_key_held_in_one_tier_fills_the_other(tmp_path):
    config = StoreConfig(host_bytes=BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    save(store, "a").result()
    save(store, "b").result()  # "a" is on disk only now
    path = os.path.join(root_of(tmp_path), "blocks", key("a").hex()[:2], key("a").hex() + ".kv")
    written = os.stat(path).st_mtime_ns, store.stats()["disk_bytes_written"]
    assert save(store, "a").result() == ("host", "disk")  # produced again into host memory
    assert (os.stat(path).st_mtime_ns, store.stats()["disk_bytes_written"]) == written
    assert_block(store, "a", "host")
    store.close()
    host_only = AttentionStore(StoreConfig(host_bytes=BLOCK_BYTES), fingerprint=FINGERPRINT)
    assert save(host_only, "a").result() == ("host",)
    held = host_only.save(key("a"), lambda: pytest.fail("produce of a held block"))
    assert held.done() and held.result() == ("host",)
    host_only.close()


def test_hint_prefetches_disk_only_blocks_into_host_memory(tmp_path):
    config = StoreConfig(host_bytes=2 * BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    for name in ("old0", "old1", "new0", "new1"):
        save(store, name).result()
    assert [store.contains(key(n)) for n in ("old0", "old1")] == ["disk", "disk"]
    assert store.hint([key("old0"), key("old1")]).result() == 2
    assert [store.contains(key(n)) for n in ("old0", "old1")] == ["host", "host"]
    assert_block(store, "old1", "host")
    assert store.stats()["prefetched_blocks"] == 2
    store.close()


def test_a_prefetch_never_pushes_out_a_more_imminent_hinted_block(tmp_path):
    config = StoreConfig(host_bytes=2 * BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    for name in "abcdxy":
        save(store, name).result()  # a to d pushed out of host memory by x and y
    assert store.hint([key(n) for n in "abcd"]).result() == 2
    assert [store.contains(key(n)) for n in "abcdxy"] == ["host"] * 2 + ["disk"] * 4
    store.close()


def test_a_restarted_store_finds_blocks_by_key_and_records_by_session(tmp_path):
    config = StoreConfig(disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    for name in ("prompt", "a1", "b1"):
        save(store, name)
    assert store.append_record("a", {"blocks": ["prompt", "a1"]}).result() is True
    assert store.append_record("b", {"blocks": ["prompt", "b1"]}).result() is True
    store.close()
    fan_out = os.path.join(root_of(tmp_path), "blocks", key("a1").hex()[:2])
    open(os.path.join(fan_out, ".tmp-abandoned"), "wb").write(b"half a file")

    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert [again.contains(key(n)) for n in ("prompt", "a1", "b1")] == ["disk"] * 3
    assert again.get_record("a") == [{"blocks": ["prompt", "a1"]}]
    assert again.get_record("b") == [{"blocks": ["prompt", "b1"]}]
    for name in ("prompt", "a1", "b1"):
        assert_block(again, name, "disk")
    assert not [f for f in os.listdir(fan_out) if f.startswith(".tmp-")]
    assert disk_usage(root_of(tmp_path)) == again.stats()["disk_bytes"]
    again.close()
    other_model = AttentionStore(config, fingerprint="0" * 64)
    assert other_model.get_record("a") is None
    assert other_model.contains(key("prompt")) is None and other_model.get(key("prompt")) is None
    other_model.close()


def test_a_restart_takes_the_files_as_used_in_the_order_they_were_written(tmp_path):
    store = AttentionStore(StoreConfig(disk_bytes=10**6, disk_path=str(tmp_path)),
                           fingerprint=FINGERPRINT)
    names = sorted(range(3), key=lambda n: key(n).hex())  # in the order of their keys
    for name in names:
        save(store, name)
    store.close()
    one_block = disk_usage(root_of(tmp_path)) // 3  # with its fan-out, sharing blocks/
    for age, name in zip((2, 3, 1), names):  # the middle key written longest ago
        path = os.path.join(root_of(tmp_path), "blocks", key(name).hex()[:2],
                            key(name).hex() + ".kv")
        os.utime(path, ns=(10**18 - age * 10**9,) * 2)
    config = StoreConfig(disk_bytes=disk_usage(root_of(tmp_path)) - one_block // 2,
                         disk_path=str(tmp_path))
    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert [again.contains(key(n)) for n in names] == ["disk", None, "disk"]
    assert disk_usage(root_of(tmp_path)) == again.stats()["disk_bytes"] <= config.disk_bytes
    again.close()


def test_dropping_a_session_removes_its_log_and_keeps_its_blocks(tmp_path):
    config = StoreConfig(host_bytes=BLOCK_BYTES, disk_bytes=10**6, disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    for name in ("s0", "s1"):
        save(store, name)
    assert store.append_record("s", {"blocks": ["s0", "s1"]}).result() is True
    assert store.append_record("kept", {"blocks": []}).result() is True
    sessions = os.path.join(root_of(tmp_path), "sessions")
    assert len(os.listdir(sessions)) == 2
    store.drop("s")
    assert store.get_record("s") is None
    assert len(os.listdir(sessions)) == 1 and store.stats()["disk_records"] == 1
    assert_block(store, "s1", "host")
    assert_block(store, "s0", "disk")
    store.drop("kept")
    assert not os.path.exists(sessions)  # its last log took it along
    assert disk_usage(root_of(tmp_path)) == store.stats()["disk_bytes"]
    store.close()
    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert again.get_record("s") is None and again.get_record("kept") is None
    assert_block(again, "s1", "disk")
    again.close()


def test_concurrent_sessions_from_many_threads(tmp_path):
    config = StoreConfig(host_bytes=20 * BLOCK_BYTES, disk_bytes=60 * (BLOCK_BYTES + 512),
                         disk_path=str(tmp_path))
    store = AttentionStore(config, fingerprint=FINGERPRINT)
    errors = []

    def worker(index):
        try:
            names = ["prompt0", "prompt1"] + [f"user-{index}/{n}" for n in range(4)]
            for name in names:
                save(store, name)
            store.append_record(f"user-{index}", {"turn": 0})
            store.hint([key(name) for name in names])
            for name in names:
                found = store.get(key(name))
                if found is not None:
                    np.testing.assert_array_equal(found[0].k, block(seed(name)).k)
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
    assert disk_usage(root_of(tmp_path)) == store.stats()["disk_bytes"] <= config.disk_bytes
    assert store.stats()["saves"] + store.stats()["saves_skipped_held"] == 12 * 6
    assert len(block_files(tmp_path)) == len(set(block_files(tmp_path)))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(host_bytes=-1), "host_bytes must be an integer >= 0"),
    (dict(disk_bytes=10), "disk_bytes > 0 needs a disk_path"),
    (dict(block_size=0), "block_size must be >= 1"),
])
def test_bad_store_config_is_named(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        StoreConfig(**kwargs)


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
    store.save(key(0), lambda: release.wait(30) and block(seed(0)))
    durable = store.append_record("s", {"tokens": [0]})  # queued behind the save
    assert store.get_record("s") == [{"tokens": [0]}]
    assert not durable.done()
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".log")]
    release.set()
    assert durable.result() is True
    for n in range(1, 20):
        save(store, n)
        store.append_record("s", {"tokens": [n]})
    store.close()
    again = AttentionStore(config, fingerprint=FINGERPRINT)
    assert again.get_record("s") == [{"tokens": [n]} for n in range(20)]
    for n in range(20):
        assert_block(again, n, "disk")


def turn_blocks(count, seed_=3):
    """`count` blocks saved as the chat engine saves a turn: views of one layer-major
    `[L, count, block_size, Hkv, D]` array each for keys and values."""
    rng = np.random.default_rng(seed_)
    k, v = (rng.standard_normal((2, count, 4, 2, 8)).astype(np.float32) for _ in "kv")
    return k, v, [BlockKV(k[:, i], v[:, i]) for i in range(count)]


def test_a_block_viewing_a_larger_array_counts_the_whole_array():
    k, v, blocks = turn_blocks(4)
    store = AttentionStore(StoreConfig(host_bytes=10 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    for i in (0, 2):  # blocks 1 and 3 were held already, say: not saved again
        store.save(key(f"t{i}"), lambda i=i: blocks[i]).result()
        assert store.stats()["host_bytes"] == 4 * BLOCK_BYTES  # the array is alive
    found, _ = store.get(key("t2"))
    assert np.shares_memory(found.k, k)  # kept as a view: loads it with its neighbours
    store.close()


def test_evicting_a_view_copies_its_siblings_out_so_the_array_is_freed():
    k, v, blocks = turn_blocks(4)
    store = AttentionStore(StoreConfig(host_bytes=5 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    for i, turn_block in enumerate(blocks):
        store.save(key(f"t{i}"), lambda b=turn_block: b)
    save(store, "x").result()
    assert store.stats()["host_bytes"] == 5 * BLOCK_BYTES
    save(store, "y").result()  # evicts t0, the least recently used: frees one block
    assert store.stats()["host_evictions"] == 1
    assert store.stats()["host_bytes"] == 5 * BLOCK_BYTES
    assert store.contains(key("t0")) is None
    for i in (1, 2, 3):
        found, tier = store.get(key(f"t{i}"))
        assert tier == "host"
        assert not np.shares_memory(found.k, k) and not np.shares_memory(found.v, v)
        np.testing.assert_array_equal(found.k, k[:, i])
        np.testing.assert_array_equal(found.v, v[:, i])
    store.close()


def test_a_view_of_an_array_larger_than_host_memory_is_kept_as_a_copy():
    k, v, blocks = turn_blocks(4)
    store = AttentionStore(StoreConfig(host_bytes=2 * BLOCK_BYTES), fingerprint=FINGERPRINT)
    assert store.save(key("t1"), lambda: blocks[1]).result() == ("host",)
    found, _ = store.get(key("t1"))
    assert not np.shares_memory(found.k, k)
    np.testing.assert_array_equal(found.v, v[:, 1])
    assert store.stats()["host_bytes"] == BLOCK_BYTES
    store.close()


@pytest.mark.parametrize("host_blocks", [12, 7, 3])
def test_a_turns_saved_blocks_are_filed_together_as_one_by_one(host_blocks):
    """`save_blocks` (one piece of work, host memory taking the run together where it
    fits) ends as `save` of each block in order, all queued at once, does: the same
    blocks held, the same bytes, evictions and counts; `saved()` is waited for once."""
    k, v, blocks = turn_blocks(6, seed_=int(np.random.default_rng().integers(1 << 30)))
    config = StoreConfig(host_bytes=host_blocks * BLOCK_BYTES)
    batched, reference = (AttentionStore(config, fingerprint=FINGERPRINT) for _ in range(2))
    for store in (batched, reference):
        for name in ("old0", "t1", "old1", "t4"):  # two of the turn's blocks are held
            save(store, name).result()
    calls = []

    def saved():
        calls.append(1)
        return {10 + i: b for i, b in enumerate(blocks)}

    names = [f"t{i}" for i in range(6)]
    batched.save_blocks([key(n) for n in names], [10 + i for i in range(6)], saved)
    batched.flush()
    for name, turn_block in zip(names, blocks):
        reference.save(key(name), lambda b=turn_block: b)
    reference.flush()
    assert len(calls) == 1
    assert [batched.contains(key(n)) for n in ("old0", "old1", *names)] == \
        [reference.contains(key(n)) for n in ("old0", "old1", *names)]
    assert batched.stats() == {**reference.stats(), "save_seconds": batched.stats()["save_seconds"]}
    for i, name in enumerate(names):
        if batched.contains(key(name)):
            found, _ = batched.get(key(name))
            expected = block(seed(name)) if name in ("t1", "t4") else blocks[i]
            np.testing.assert_array_equal(found.k, expected.k)
            np.testing.assert_array_equal(found.v, expected.v)
    batched.close()
    reference.close()
