"""The AttentionStore's disk tier under junk, faults and crashes: start-up never fails,
a failed write keeps what was durable and evicts nothing, an unwritable disk leaves the
host tier working, budgets count every byte, record logs survive torn appends, and a
block is returned only for the key it was saved with.

Faults are injected by monkeypatching the calls that write (tests run as root, where a
read-only mode on a directory does not stop writes)."""

import errno
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import pytest

from jattn.store import AttentionStore, BlockKV, StoreConfig, disk_entry

FINGERPRINT = "f" * 64
DIRECTORY_BYTES = 4096  # what the store counts per session directory (documented)
FRAME_HEAD_BYTES = 4 + 8  # a log frame: u32 payload length, u64 checksum, then the payload


def block(seed):
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal((2, 4, 2, 8)).astype(np.float32),
                   rng.standard_normal((2, 4, 2, 8)).astype(np.float32))


def content_key(session, serial):
    """A 16-byte block key, distinct per session and serial (as the engine's are)."""
    return hashlib.blake2b(f"{session}/{serial}".encode(), digest_size=16).digest()


def disk_store(tmp_path, disk_bytes=10**6, host_bytes=2**30):
    config = StoreConfig(host_bytes=host_bytes, disk_bytes=disk_bytes, disk_path=str(tmp_path))
    return AttentionStore(config, fingerprint=FINGERPRINT)


def root_of(tmp_path):
    return os.path.join(tmp_path, FINGERPRINT[:16])


def session_dir(tmp_path, session):
    return os.path.join(root_of(tmp_path), hashlib.sha256(session.encode()).hexdigest()[:32])


def disk_usage(root):
    """File sizes under `root` plus 4096 bytes per directory below it."""
    return sum(sum(os.path.getsize(os.path.join(d, f)) for f in files)
               + DIRECTORY_BYTES * len(dirs) for d, dirs, files in os.walk(root))


def save_session(store, session, serials, turns=1):
    """Saves blocks `serials` of `session` (each from `seed(session, serial)`) and appends
    `turns` record entries; returns the futures' results."""
    landed = [store.save(session, s, lambda s=s: block(seed(session, s)),
                         block_key=content_key(session, s)).result() for s in serials]
    durable = [store.append_record(session, {"turn": t, "session": session}).result()
               for t in range(turns)]
    return landed, durable


def seed(session, serial):
    """The random seed of a block's test data."""
    return int.from_bytes(content_key(session, serial)[:4], "little")


def assert_block(store, session, serial, tier):
    found = store.get(session, serial, block_key=content_key(session, serial))
    assert found is not None and found[1] == tier
    np.testing.assert_array_equal(found[0].k, block(seed(session, serial)).k)
    np.testing.assert_array_equal(found[0].v, block(seed(session, serial)).v)


def failing(error_number, *, only=lambda *args: True, real=None):
    """A stand-in for an os call that raises `OSError(error_number)` when `only(*args)`
    holds and otherwise calls `real`."""
    def call(*args, **kwargs):
        if only(*args):
            raise OSError(error_number, os.strerror(error_number), str(args[0]))
        return real(*args, **kwargs)
    return call


# ----- junk in the disk directory -------------------------------------------------------


def test_junk_never_stops_start_up_and_is_skipped_one_line_each(tmp_path, caplog):
    store = disk_store(tmp_path)
    save_session(store, "s", [0, 1], turns=2)
    store.close()
    directory, root = session_dir(tmp_path, "s"), root_of(tmp_path)
    junk = [os.path.join(directory, "³.kv"),  # str.isdigit says yes, int() says no
            os.path.join(directory, "0000001.kv"),  # not a name the store writes
            os.path.join(directory, "notes.txt"),
            os.path.join(directory, ".tmp-x"),  # a directory, not a leftover file
            os.path.join(directory, "00000002.kv"),  # a dangling symlink
            os.path.join(root, ".tmp-y"),
            os.path.join(root, "A" * 32),  # upper-case: not a session key
            os.path.join(root, "0" * 32),  # a session key's name on a plain file
            os.path.join(root, "1" * 32),  # a symlink to a session directory
            os.path.join(root, "forged\ndisk tier disabled: x")]  # logged as one line
    for path in junk[:3] + junk[7:8] + junk[9:]:
        open(path, "w").write("junk")
    for path in (junk[3], junk[5], junk[6]):
        os.mkdir(path)
    os.symlink("/nonexistent/target", junk[4])
    os.symlink(directory, junk[8])
    leftover = os.path.join(directory, ".tmp-abandoned")
    open(leftover, "wb").write(b"half a block")

    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        again = disk_store(tmp_path)
    assert again.stats()["disk_junk_skipped"] == len(junk)
    assert again.stats()["disk_tier_enabled"] == 1
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(junk) and not any("\n" in line for line in warned)
    for path in junk:
        assert sum(repr(path) in line for line in warned) == 1, path
        assert os.path.lexists(path)  # skipped, not deleted
    assert not os.path.exists(leftover)
    assert again.get_record("s") == [{"turn": 0, "session": "s"}, {"turn": 1, "session": "s"}]
    for serial in (0, 1):
        assert_block(again, "s", serial, "disk")
    again.close()


def test_much_junk_gets_a_summary_line(tmp_path, caplog):
    os.makedirs(root_of(tmp_path))
    for i in range(30):
        open(os.path.join(root_of(tmp_path), f"junk-{i}"), "w").close()
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        store = disk_store(tmp_path)
    assert store.stats()["disk_junk_skipped"] == 30
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 11 and "20 more" in lines[-1]
    store.close()


def test_a_leftover_temporary_that_cannot_be_deleted_is_logged(tmp_path, monkeypatch, caplog):
    store = disk_store(tmp_path)
    save_session(store, "s", [0])
    store.close()
    leftover = os.path.join(session_dir(tmp_path, "s"), ".tmp-abandoned")
    open(leftover, "wb").write(b"half a block")
    monkeypatch.setattr(os, "unlink", failing(errno.EROFS, real=os.unlink,
                                              only=lambda path: ".tmp-" in str(path)))
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        again = disk_store(tmp_path)
    assert any(repr(leftover) in r.getMessage() for r in caplog.records)
    assert os.path.exists(leftover)
    assert again.get_record("s") == [{"turn": 0, "session": "s"}]
    assert_block(again, "s", 0, "disk")
    again.close()


# ----- failed writes ----------------------------------------------------------------------


def test_a_failed_block_write_evicts_nothing_and_keeps_what_was_durable(tmp_path,
                                                                        monkeypatch):
    store = disk_store(tmp_path)
    save_session(store, "a", [0, 1])
    store.close()
    used_by_a = disk_usage(root_of(tmp_path))
    block_file = os.path.getsize(os.path.join(session_dir(tmp_path, "a"), "00000000.kv"))
    budget = used_by_a + DIRECTORY_BYTES + block_file - 1  # "b"'s block needs "a" gone
    store = disk_store(tmp_path, disk_bytes=budget)
    a_files = sorted(os.listdir(session_dir(tmp_path, "a")))

    with monkeypatch.context() as patch:
        patch.setattr(disk_entry, "write_atomic",
                      failing(errno.ENOSPC, real=disk_entry.write_atomic))
        landed = store.save("b", 0, lambda: block(seed("b", 0)),
                            block_key=content_key("b", 0)).result()
    assert landed == ("host",)
    stats = store.stats()
    assert (stats["disk_write_errors"], stats["disk_evictions"]) == (1, 0)
    assert stats["disk_tier_enabled"] == 1  # out of space is not an unwritable disk
    assert stats["disk_bytes"] == used_by_a == disk_usage(root_of(tmp_path))
    assert sorted(os.listdir(session_dir(tmp_path, "a"))) == a_files
    assert not os.path.exists(session_dir(tmp_path, "b"))

    # The store's thread goes on: with space back, the write lands and evicts "a".
    assert store.save("b", 0, lambda: block(seed("b", 0)),
                      block_key=content_key("b", 0)).result() == ("host", "disk")
    assert store.stats()["disk_evictions"] == 2
    assert disk_usage(root_of(tmp_path)) == store.stats()["disk_bytes"] <= budget
    store.close()


@pytest.mark.parametrize("new_session", [False, True])
def test_a_failed_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch,
                                                             new_session):
    store = disk_store(tmp_path)
    save_session(store, "s", [0])
    before = store.stats()["disk_bytes"]
    session = "t" if new_session else "s"
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing(errno.ENOSPC, real=os.replace))
        landed = store.save(session, 0, lambda: block(99), block_key=content_key(session, 9))
        assert landed.result() == ("host",)
    assert store.stats()["disk_bytes"] == before == disk_usage(root_of(tmp_path))
    assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.startswith(".tmp-")]
    assert os.path.exists(session_dir(tmp_path, "t")) is False
    store.close()
    again = disk_store(tmp_path, host_bytes=0)
    assert_block(again, "s", 0, "disk")  # the old file, whole
    again.close()


@pytest.mark.parametrize("error_number", [errno.EROFS, errno.EACCES, errno.EPERM])
def test_an_unwritable_disk_disables_the_tier_and_host_memory_goes_on(tmp_path, monkeypatch,
                                                                     caplog, error_number):
    store = disk_store(tmp_path)
    calls = []

    def unwritable(path, data):
        calls.append(path)
        raise OSError(error_number, os.strerror(error_number), path)

    monkeypatch.setattr(disk_entry, "write_atomic", unwritable)
    with caplog.at_level(logging.ERROR, logger="jattn.store"):
        landed, durable = save_session(store, "s", [0, 1], turns=2)
    assert landed == [("host",), ("host",)] and durable == [True, True]
    assert len(calls) == 1  # the first failure turned the tier off
    stats = store.stats()
    assert (stats["disk_tier_enabled"], stats["disk_write_errors"]) == (0, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"disk tier disabled: {calls[0]}: writing a KV block: "
                     f"{os.strerror(error_number)}"]
    assert_block(store, "s", 1, "host")
    assert store.get_record("s") == [{"turn": 0, "session": "s"}, {"turn": 1, "session": "s"}]
    assert store.session_blocks("s") == {"host": 2, "disk": 0}
    store.drop("s")
    assert store.get_record("s") is None
    store.close()


def test_a_root_that_cannot_be_created_disables_the_disk_tier(tmp_path, caplog):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with caplog.at_level(logging.ERROR, logger="jattn.store"):
        store = disk_store(not_a_directory)
    assert store.stats()["disk_tier_enabled"] == 0
    assert [r.getMessage().startswith(f"disk tier disabled: {not_a_directory}")
            for r in caplog.records] == [True]
    landed, durable = save_session(store, "s", [0])
    assert landed == [("host",)] and durable == [True]
    assert_block(store, "s", 0, "host")
    store.close()


# ----- record logs ---------------------------------------------------------------------


def entries(n, session="s"):
    return [{"turn": t, "session": session} for t in range(n)]


def test_an_append_writes_the_entry_not_the_history(tmp_path):
    store = disk_store(tmp_path)
    for entry in entries(200):
        store.append_record("s", entry)
    store.flush()
    log_path = os.path.join(session_dir(tmp_path, "s"), "session.log")
    size, written = os.path.getsize(log_path), store.stats()["disk_bytes_written"]
    entry = {"turn": 200, "session": "s"}
    assert store.append_record("s", entry).result() is True
    frame = FRAME_HEAD_BYTES + len(json.dumps(entry, separators=(",", ":")))
    assert os.path.getsize(log_path) - size == frame
    assert store.stats()["disk_bytes_written"] - written == frame
    store.close()
    assert disk_store(tmp_path).get_record("s") == entries(201)


@pytest.mark.parametrize("cut_back_fails", [False, True])
def test_a_failed_append_keeps_the_log_and_a_later_one_rewrites_it(tmp_path, monkeypatch,
                                                                   cut_back_fails):
    store = disk_store(tmp_path)
    assert store.append_record("s", entries(1)[0]).result() is True
    log_path = os.path.join(session_dir(tmp_path, "s"), "session.log")
    size = os.path.getsize(log_path)
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the frame
        real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", half_then_full)
        if cut_back_fails:
            patch.setattr(os, "ftruncate", failing(errno.EIO))
        assert store.append_record("s", entries(2)[1]).result() is False
    assert store.stats()["disk_write_errors"] == 1
    if cut_back_fails:  # a torn frame stays at the end: the next append must not follow it
        assert os.path.getsize(log_path) > size
    else:  # cut back: the durable state is intact
        assert os.path.getsize(log_path) == size
    assert store.get_record("s") == entries(2)  # kept in memory
    assert store.append_record("s", entries(3)[2]).result() is True
    assert store.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    store.close()
    assert disk_store(tmp_path).get_record("s") == entries(3)


@pytest.mark.parametrize("damage", ["torn tail", "damaged middle frame"])
def test_reading_a_log_stops_at_a_bad_frame_and_cuts_the_file(tmp_path, caplog, damage):
    store = disk_store(tmp_path)
    for entry in entries(3):
        store.append_record("s", entry)
    store.close()
    log_path = os.path.join(session_dir(tmp_path, "s"), "session.log")
    data = open(log_path, "rb").read()
    frame_sizes = [FRAME_HEAD_BYTES + len(json.dumps(e, separators=(",", ":")))
                   for e in entries(3)]
    if damage == "torn tail":  # a crash in the middle of appending a fourth frame
        open(log_path, "ab").write(data[-frame_sizes[2]:][:9])
        kept, good_size = 3, len(data)
    else:
        damaged = bytearray(data)
        damaged[-frame_sizes[2] - 3] ^= 1  # a byte of entry 1's payload
        open(log_path, "wb").write(bytes(damaged))
        kept, good_size = 1, len(data) - frame_sizes[2] - frame_sizes[1]
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        again = disk_store(tmp_path)
        assert again.get_record("s") == entries(kept)
    assert os.path.getsize(log_path) == good_size
    assert again.stats()["torn_record_logs"] == 1
    assert again.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    assert any("cutting" in r.getMessage() for r in caplog.records)
    assert again.append_record("s", {"turn": "next"}).result() is True
    again.close()
    assert disk_store(tmp_path).get_record("s") == entries(kept) + [{"turn": "next"}]


def test_a_log_copied_under_another_session_is_not_believed(tmp_path):
    store = disk_store(tmp_path)
    save_session(store, "a", [0])
    save_session(store, "b", [0])
    store.close()
    shutil.copy(os.path.join(session_dir(tmp_path, "a"), "session.log"),
                os.path.join(session_dir(tmp_path, "b"), "session.log"))
    again = disk_store(tmp_path)
    assert again.get_record("b") is None
    assert again.get_record("a") == [{"turn": 0, "session": "a"}]
    again.close()


# ----- block keys ---------------------------------------------------------------------


def test_a_copy_saved_for_another_block_key_is_dropped_not_returned(tmp_path):
    store = disk_store(tmp_path)
    store.save("s", 0, lambda: block(1), block_key=content_key("s", 0)).result()
    assert store.get("s", 0, block_key=content_key("other", 0)) is None
    # Both copies were stale for that key: dropped, so the old key finds nothing either.
    assert store.get("s", 0, block_key=content_key("s", 0)) is None
    assert store.stats()["stale_entries"] == 2
    assert store.session_blocks("s") == {"host": 0, "disk": 0}
    store.close()


@pytest.mark.parametrize("read_by", ["get", "prefetch then get"])
def test_a_block_copied_from_another_session_is_never_read_as_valid(tmp_path, read_by):
    store = disk_store(tmp_path)
    save_session(store, "a", [0])
    save_session(store, "b", [0])
    store.close()
    shutil.copy(os.path.join(session_dir(tmp_path, "a"), "00000000.kv"),
                os.path.join(session_dir(tmp_path, "b"), "00000000.kv"))
    again = disk_store(tmp_path)
    if read_by == "prefetch then get":
        assert again.hint(["b"]).result() == 1  # warmed without a check, key carried along
    assert again.get("b", 0, block_key=content_key("b", 0)) is None
    # Each stale copy (the prefetched one in host memory, the file) is dropped and counted.
    assert again.stats()["stale_entries"] == (1 if read_by == "get" else 2)
    assert not os.path.exists(os.path.join(session_dir(tmp_path, "b"), "00000000.kv"))
    assert_block(again, "a", 0, "disk")
    again.close()


def test_bad_block_addresses_are_refused(tmp_path):
    store = disk_store(tmp_path)
    with pytest.raises(ValueError, match="block_key must be 16 bytes"):
        store.save("s", 0, lambda: block(0), block_key=b"short")
    with pytest.raises(ValueError, match="serial must be >= 0"):
        store.get("s", -1, block_key=content_key("s", 0))
    with pytest.raises(ValueError, match="must be JSON-able"):
        store.append_record("s", {"tokens": object()})
    assert store.get_record("s") is None
    store.close()


# ----- dropping sessions --------------------------------------------------------------


def test_a_drop_that_cannot_delete_the_log_disables_the_tier_and_forgets(tmp_path,
                                                                        monkeypatch, caplog):
    store = disk_store(tmp_path)
    save_session(store, "s", [0, 1])
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="jattn.store"):
        patch.setattr(os, "unlink", failing(errno.EROFS, real=os.unlink,
                                            only=lambda path: path.endswith("session.log")))
        store.drop("s")
    assert store.stats()["disk_tier_enabled"] == 0
    assert [r.getMessage().startswith("disk tier disabled: ") for r in caplog.records] == [True]
    assert store.get_record("s") is None
    assert store.get("s", 0, block_key=content_key("s", 0)) is None
    assert store.session_blocks("s") == {"host": 0, "disk": 0}
    assert save_session(store, "t", [0])[0] == [("host",)]
    store.close()


def test_blocks_a_drop_could_not_delete_are_deleted_at_the_next_start(tmp_path, monkeypatch):
    store = disk_store(tmp_path)
    save_session(store, "s", [0, 1])
    save_session(store, "kept", [0])
    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", failing(errno.EIO, real=os.unlink,
                                            only=lambda path: path.endswith(".kv")))
        store.drop("s")  # the log goes (the commit point), the blocks stay behind
    assert store.stats()["disk_write_errors"] == 2
    assert store.stats()["disk_tier_enabled"] == 1
    assert store.get_record("s") is None
    assert sorted(os.listdir(session_dir(tmp_path, "s"))) == ["00000000.kv", "00000001.kv"]
    store.close()
    again = disk_store(tmp_path)
    assert again.stats()["disk_orphans_deleted"] == 2
    assert not os.path.exists(session_dir(tmp_path, "s"))
    assert again.get_record("s") is None
    assert again.get_record("kept") == [{"turn": 0, "session": "kept"}]
    assert again.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    again.close()


# ----- budgets ------------------------------------------------------------------------


def test_the_disk_budget_counts_every_byte_and_ended_sessions_leave_nothing(tmp_path):
    probe = disk_store(tmp_path / "probe")
    save_session(probe, "x", [0, 1], turns=2)
    one_session = probe.stats()["disk_bytes"]
    probe.close()
    budget = 3 * one_session + one_session // 2
    store = disk_store(tmp_path / "disk", disk_bytes=budget)
    root = root_of(tmp_path / "disk")
    sessions = [f"user-{i}" for i in range(12)]
    for session in sessions:
        save_session(store, session, [0, 1], turns=2)
        assert disk_usage(root) == store.stats()["disk_bytes"] <= budget
        assert len(os.listdir(root)) <= 3
    assert store.stats()["disk_evictions"] == 2 * 9
    store.close()

    again = disk_store(tmp_path / "disk", disk_bytes=budget)
    assert disk_usage(root) == again.stats()["disk_bytes"] <= budget
    assert again.get_record(sessions[0]) is None  # evicted with its log and directory
    assert again.get_record(sessions[-1]) == [{"turn": t, "session": sessions[-1]}
                                              for t in range(2)]
    for session in sessions:
        again.drop(session)
    assert os.listdir(root) == [] and again.stats()["disk_bytes"] == 0
    again.close()


def test_an_append_after_its_log_was_evicted_writes_the_log_whole(tmp_path):
    probe = disk_store(tmp_path / "probe")
    save_session(probe, "x", [0], turns=1)
    one_session = probe.stats()["disk_bytes"]
    probe.close()
    store = disk_store(tmp_path / "disk", disk_bytes=one_session + one_session // 2)
    save_session(store, "a", [0], turns=1)
    save_session(store, "b", [0], turns=1)  # evicts "a" from disk, not from memory
    assert not os.path.exists(session_dir(tmp_path / "disk", "a"))
    assert store.append_record("a", {"turn": 1, "session": "a"}).result() is True
    store.close()
    again = disk_store(tmp_path / "disk", disk_bytes=one_session + one_session // 2)
    assert again.get_record("a") == [{"turn": t, "session": "a"} for t in range(2)]
    again.close()
