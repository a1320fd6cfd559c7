"""The AttentionStore's disk tier under junk, faults and crashes: start-up never fails,
a failed write keeps what was durable and evicts nothing, an unwritable disk leaves the
host tier working, budgets count every byte, record logs survive torn appends, and a
block file is returned only for the key it is filed under.

Faults are injected by monkeypatching the calls that write (tests run as root, where a
read-only mode on a directory does not stop writes)."""

import errno
import hashlib
import json
import logging
import os
import shutil
import struct

import numpy as np
import pytest

from jattn.store import AttentionStore, BlockKV, StoreConfig, disk_entry
from jattn.store.records import chained, session_key

FINGERPRINT = "f" * 64
DIRECTORY_BYTES = 4096  # what the store counts per directory below its root (documented)
FRAME_HEAD_BYTES = 4 + 8  # a log frame: u32 payload length, u64 checksum, then the payload


def block(seed):
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal((2, 4, 2, 8)).astype(np.float32),
                   rng.standard_normal((2, 4, 2, 8)).astype(np.float32))


def key(name):
    """A 16-byte block key per name (the engine's are content hashes too)."""
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


def seed(name):
    """The random seed of the test data of block `name`."""
    return int.from_bytes(key(name)[:4], "little")


def disk_store(tmp_path, disk_bytes=10**6, host_bytes=2**30):
    config = StoreConfig(host_bytes=host_bytes, disk_bytes=disk_bytes, disk_path=str(tmp_path))
    return AttentionStore(config, fingerprint=FINGERPRINT)


def root_of(tmp_path):
    return os.path.join(tmp_path, FINGERPRINT[:16])


def fan_out(tmp_path, name):
    """The directory of block `name`'s file."""
    return os.path.join(root_of(tmp_path), "blocks", key(name).hex()[:2])


def block_path(tmp_path, name):
    return os.path.join(fan_out(tmp_path, name), key(name).hex() + ".kv")


def log_path(tmp_path, session):
    return os.path.join(root_of(tmp_path), "sessions",
                        hashlib.sha256(session.encode()).hexdigest()[:32] + ".log")


def disk_usage(root):
    """File sizes under `root` plus DIRECTORY_BYTES per directory below it."""
    return sum(sum(os.path.getsize(os.path.join(d, f)) for f in files)
               + DIRECTORY_BYTES * len(dirs) for d, dirs, files in os.walk(root))


def tree(path):
    """Every directory under `path` with its subdirectories and files, sorted."""
    return sorted((d, sorted(dirs), sorted(files)) for d, dirs, files in os.walk(path))


def save_blocks(store, names):
    """Saves blocks `names` (each from `seed(name)`), one after the other; returns the
    tiers each landed in."""
    return [store.save(key(name), lambda name=name: block(seed(name))).result()
            for name in names]


def save_session(store, session, serials, turns=1):
    """Saves blocks `f"{session}/{serial}"` and appends `turns` record entries; returns
    the futures' results."""
    landed = save_blocks(store, [f"{session}/{s}" for s in serials])
    durable = [store.append_record(session, {"turn": t, "session": session}).result()
               for t in range(turns)]
    return landed, durable


def assert_block(store, name, tier):
    found = store.get(key(name))
    assert found is not None and found[1] == tier
    np.testing.assert_array_equal(found[0].k, block(seed(name)).k)
    np.testing.assert_array_equal(found[0].v, block(seed(name)).v)


def names_in(fan_outs, prefix):
    """Block names `f"{prefix}{n}"`, the first found in each fan-out directory of
    `fan_outs`, in that order."""
    found = {}
    for n in range(100_000):
        fan = key(f"{prefix}{n}").hex()[:2]
        if fan in fan_outs and fan not in found:
            found[fan] = f"{prefix}{n}"
            if len(found) == len(fan_outs):
                return [found[fan] for fan in fan_outs]
    raise AssertionError("no names for these fan-out directories")


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
    root, fan = root_of(tmp_path), fan_out(tmp_path, "s/0")
    blocks, sessions = os.path.join(root, "blocks"), os.path.join(root, "sessions")
    other_fan = "00" if os.path.basename(fan) != "00" else "01"
    junk = [os.path.join(fan, "A" * 32 + ".kv"),  # upper case: not a name the store writes
            os.path.join(fan, other_fan + "1" * 30 + ".kv"),  # filed in the wrong fan-out
            os.path.join(fan, ".tmp-x"),  # a directory, not a leftover file
            os.path.join(fan, os.path.basename(fan) + "2" * 30 + ".kv"),  # a dangling link
            os.path.join(blocks, "ff" if os.path.basename(fan) != "ff" else "fe"),  # a
            # symlink to a fan-out directory
            os.path.join(sessions, "S.log"),
            os.path.join(sessions, "3" * 32 + ".log"),  # a log's name on a directory
            os.path.join(root, ".tmp-y"),
            os.path.join(root, "0" * 32),  # a session directory of the old layout
            os.path.join(root, "forged\ndisk tier disabled: x")]  # logged as one line
    for path in junk[:2] + junk[5:6] + junk[9:]:
        open(path, "w").write("junk")
    for path in junk[2:3] + junk[6:9]:
        os.mkdir(path)
    open(os.path.join(junk[8], "00000000.kv"), "w").write("a block of the old layout")
    os.symlink("/nonexistent/target", junk[3])
    os.symlink(fan, junk[4])
    leftover = os.path.join(fan, ".tmp-abandoned")
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
    for name in ("s/0", "s/1"):
        assert_block(again, name, "disk")
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
    leftover = os.path.join(fan_out(tmp_path, "s/0"), ".tmp-abandoned")
    open(leftover, "wb").write(b"half a block")
    monkeypatch.setattr(os, "unlink", failing(errno.EROFS, real=os.unlink,
                                              only=lambda path: ".tmp-" in str(path)))
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        again = disk_store(tmp_path)
    assert any(repr(leftover) in r.getMessage() for r in caplog.records)
    assert os.path.exists(leftover)
    assert again.get_record("s") == [{"turn": 0, "session": "s"}]
    assert_block(again, "s/0", "disk")
    again.close()


def test_empty_directories_a_crash_left_are_removed_at_start(tmp_path):
    store = disk_store(tmp_path)
    save_blocks(store, ["a"])
    store.close()
    os.makedirs(os.path.join(root_of(tmp_path), "blocks", "ee"))
    os.makedirs(os.path.join(root_of(tmp_path), "sessions"))
    again = disk_store(tmp_path)
    assert sorted(os.listdir(os.path.join(root_of(tmp_path), "blocks"))) == \
        [key("a").hex()[:2]]
    assert not os.path.exists(os.path.join(root_of(tmp_path), "sessions"))
    assert disk_usage(root_of(tmp_path)) == again.stats()["disk_bytes"]
    again.close()


# ----- failed writes ----------------------------------------------------------------------


def test_a_failed_block_write_evicts_nothing_and_keeps_what_was_durable(tmp_path,
                                                                        monkeypatch):
    first, second, new = names_in(["10", "20", "30"], "block-")
    store = disk_store(tmp_path)
    save_blocks(store, [first, second])
    store.close()
    used = disk_usage(root_of(tmp_path))  # blocks/, two fan-outs, two files
    one_block = os.path.getsize(block_path(tmp_path, first)) + DIRECTORY_BYTES
    budget = used + one_block - 1  # the new block needs the least recently used one gone
    store = disk_store(tmp_path, disk_bytes=budget)
    files = sorted(f for _, _, fs in os.walk(tmp_path) for f in fs)

    with monkeypatch.context() as patch:
        patch.setattr(disk_entry, "write_atomic",
                      failing(errno.ENOSPC, real=disk_entry.write_atomic))
        landed = save_blocks(store, [new])
    assert landed == [("host",)]
    stats = store.stats()
    assert (stats["disk_write_errors"], stats["disk_evictions"]) == (1, 0)
    assert stats["disk_tier_enabled"] == 1  # out of space is not an unwritable disk
    assert stats["disk_bytes"] == used == disk_usage(root_of(tmp_path))
    assert sorted(f for _, _, fs in os.walk(tmp_path) for f in fs) == files
    assert not os.path.exists(fan_out(tmp_path, new))

    # The store's thread goes on: with space back, the write lands and evicts one block,
    # the one written first (found at start in the order of its files' times).
    assert save_blocks(store, [new]) == [("host", "disk")]
    assert store.stats()["disk_evictions"] == 1
    assert [store.contains(key(n)) for n in (first, second, new)] == [None, "disk", "host"]
    assert not os.path.exists(fan_out(tmp_path, first))
    assert disk_usage(root_of(tmp_path)) == store.stats()["disk_bytes"] <= budget
    store.close()


def test_a_failing_disk_logs_a_failure_once_until_a_write_gets_through(tmp_path, monkeypatch,
                                                                       caplog):
    store = disk_store(tmp_path)
    real = disk_entry.write_atomic
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        with monkeypatch.context() as patch:
            patch.setattr(disk_entry, "write_atomic", failing(errno.EIO, real=real))
            save_blocks(store, [f"eio-{n}" for n in range(5)])
        assert len(caplog.records) == 1  # five blocks failed alike: one line
        assert store.stats()["disk_write_errors"] == 5
        assert save_blocks(store, ["good"]) == [("host", "disk")]
        with monkeypatch.context() as patch:
            patch.setattr(disk_entry, "write_atomic", failing(errno.EIO, real=real))
            save_blocks(store, [f"eio-again-{n}" for n in range(3)])
    assert len(caplog.records) == 2  # news again after a write got through
    assert store.stats()["disk_write_errors"] == 8 and store.stats()["disk_tier_enabled"] == 1
    store.close()


@pytest.mark.parametrize("existing", ["nothing", "the blocks directory", "its fan-out"])
def test_a_failed_rename_leaves_the_old_state_and_no_temporary(tmp_path, monkeypatch,
                                                             existing):
    old, other_fan, same_fan = names_in(["40", "50"], "old-") + names_in(["40"], "same-")
    store = disk_store(tmp_path)
    if existing != "nothing":
        save_blocks(store, [old])
    new = same_fan if existing == "its fan-out" else other_fan
    before = tree(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", failing(errno.ENOSPC, real=os.replace))
        assert save_blocks(store, [new]) == [("host",)]
    assert tree(tmp_path) == before  # no temporary, no new directory
    assert store.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    store.close()
    if existing != "nothing":
        again = disk_store(tmp_path, host_bytes=0)
        assert_block(again, old, "disk")  # the old file, whole
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
    assert landed == [("host",), ("host",)]
    assert durable == [False, False]  # the records did not get to disk, and say so
    assert len(calls) == 1  # the first failure turned the tier off
    stats = store.stats()
    assert (stats["disk_tier_enabled"], stats["disk_write_errors"]) == (0, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"disk tier disabled: {calls[0]}: writing a KV block: "
                     f"{os.strerror(error_number)}"]
    assert_block(store, "s/1", "host")
    assert store.get_record("s") == [{"turn": 0, "session": "s"}, {"turn": 1, "session": "s"}]
    assert (stats["host_blocks"], stats["disk_blocks"], stats["disk_bytes"]) == (2, 0, 0)
    held = store.save(key("s/0"), lambda: pytest.fail("produce of a held block"))
    assert held.done() and held.result() == ("host",)
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
    assert landed == [("host",)] and durable == [False]  # no disk took the record
    assert_block(store, "s/0", "host")
    store.close()


# ----- record logs ---------------------------------------------------------------------


def entries(n, session="s"):
    return [{"turn": t, "session": session} for t in range(n)]


def test_an_append_writes_the_entry_not_the_history(tmp_path):
    store = disk_store(tmp_path)
    for entry in entries(200):
        store.append_record("s", entry)
    store.flush()
    size, written = os.path.getsize(log_path(tmp_path, "s")), store.stats()["disk_bytes_written"]
    entry = {"turn": 200, "session": "s"}
    assert store.append_record("s", entry).result() is True
    recorded = chained(session_key("s"), entries(201))[-1]  # with its history's digest
    assert recorded == {**entry, "chain": recorded["chain"]}
    frame = FRAME_HEAD_BYTES + len(json.dumps(recorded, separators=(",", ":")))
    assert os.path.getsize(log_path(tmp_path, "s")) - size == frame
    assert store.stats()["disk_bytes_written"] - written == frame
    assert store.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    store.close()
    assert disk_store(tmp_path).get_record("s") == entries(201)


@pytest.mark.parametrize("cut_back_fails", [False, True])
def test_a_failed_append_keeps_the_log_and_a_later_one_rewrites_it(tmp_path, monkeypatch,
                                                                   cut_back_fails):
    store = disk_store(tmp_path)
    assert store.append_record("s", entries(1)[0]).result() is True
    size = os.path.getsize(log_path(tmp_path, "s"))
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
        assert os.path.getsize(log_path(tmp_path, "s")) > size
    else:  # cut back: the durable state is intact
        assert os.path.getsize(log_path(tmp_path, "s")) == size
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
    path = log_path(tmp_path, "s")
    data = open(path, "rb").read()
    frame_sizes = [FRAME_HEAD_BYTES + len(json.dumps(e, separators=(",", ":")))
                   for e in chained(session_key("s"), entries(3))]  # as recorded
    if damage == "torn tail":  # a crash in the middle of appending a fourth frame
        open(path, "ab").write(data[-frame_sizes[2]:][:9])
        kept, good_size = 3, len(data)
    else:
        damaged = bytearray(data)
        damaged[-frame_sizes[2] - 3] ^= 1  # a byte of entry 1's payload
        open(path, "wb").write(bytes(damaged))
        kept, good_size = 1, len(data) - frame_sizes[2] - frame_sizes[1]
    with caplog.at_level(logging.WARNING, logger="jattn.store"):
        again = disk_store(tmp_path)
        assert again.get_record("s") == entries(kept)
    assert os.path.getsize(path) == good_size
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
    shutil.copy(log_path(tmp_path, "a"), log_path(tmp_path, "b"))
    again = disk_store(tmp_path)
    assert again.get_record("b") is None
    assert again.get_record("a") == [{"turn": 0, "session": "a"}]
    again.close()


def test_a_log_without_a_good_header_is_dropped(tmp_path):
    store = disk_store(tmp_path)
    save_session(store, "s", [0])
    store.close()
    open(log_path(tmp_path, "s"), "wb").write(b"not a log")
    again = disk_store(tmp_path)
    assert again.get_record("s") is None
    assert again.stats()["corrupt_entries"] == 1
    assert not os.path.exists(log_path(tmp_path, "s"))
    assert_block(again, "s/0", "disk")  # a record's loss takes no block with it
    assert again.stats()["disk_bytes"] == disk_usage(root_of(tmp_path))
    again.close()


# ----- block files ---------------------------------------------------------------------


@pytest.mark.parametrize("read_by", ["get", "prefetch then get"])
@pytest.mark.parametrize("damage", ["another key's file", "a flipped byte"])
def test_a_block_file_that_fails_a_check_is_never_read_as_valid(tmp_path, read_by, damage):
    store = disk_store(tmp_path)
    save_blocks(store, ["a", "b"])
    store.close()
    if damage == "another key's file":
        shutil.copy(block_path(tmp_path, "a"), block_path(tmp_path, "b"))
    else:
        data = bytearray(open(block_path(tmp_path, "b"), "rb").read())
        data[-5] ^= 1
        open(block_path(tmp_path, "b"), "wb").write(bytes(data))
    again = disk_store(tmp_path)
    assert again.contains(key("b")) == "disk"  # files are checked when read
    if read_by == "prefetch then get":
        assert again.hint([key("b")]).result() == 0
    assert again.get(key("b")) is None
    stats = again.stats()
    counted = "stale_entries" if damage == "another key's file" else "corrupt_entries"
    assert (stats[counted], stats["stale_entries"] + stats["corrupt_entries"]) == (1, 1)
    assert stats["misses"] == 1 and stats["host_blocks"] == 0
    assert again.contains(key("b")) is None
    assert not os.path.exists(block_path(tmp_path, "b"))
    assert_block(again, "a", "disk")
    assert stats["disk_bytes"] == disk_usage(root_of(tmp_path))
    again.close()


def test_bad_block_keys_and_records_are_refused(tmp_path):
    store = disk_store(tmp_path)
    for call in (lambda: store.save(b"short", lambda: block(0)),
                 lambda: store.get("0" * 32),
                 lambda: store.contains(b"x" * 17),
                 lambda: store.hint([key("a"), b""]),
                 lambda: store.touch([None])):
        with pytest.raises(ValueError, match="block_key must be 16 bytes"):
            call()
    with pytest.raises(ValueError, match="must be JSON-able"):
        store.append_record("s", {"tokens": object()})
    assert store.get_record("s") is None
    assert store.stats()["host_blocks"] == 0
    store.close()


# ----- dropping sessions --------------------------------------------------------------


def test_a_drop_that_cannot_delete_the_log_disables_the_tier_and_forgets(tmp_path,
                                                                        monkeypatch, caplog):
    store = disk_store(tmp_path)
    save_session(store, "s", [0, 1])
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="jattn.store"):
        patch.setattr(os, "unlink", failing(errno.EROFS, real=os.unlink,
                                            only=lambda path: path.endswith(".log")))
        store.drop("s")
    assert store.stats()["disk_tier_enabled"] == 0
    assert [r.getMessage().startswith("disk tier disabled: ") for r in caplog.records] == [True]
    assert store.get_record("s") is None
    assert_block(store, "s/0", "host")  # blocks are not the session's to take along
    assert store.stats()["disk_blocks"] == 0
    assert save_session(store, "t", [0])[0] == [("host",)]
    store.close()


# ----- budgets ------------------------------------------------------------------------


def test_the_disk_budget_counts_every_byte_under_a_fill_of_many_sessions(tmp_path):
    probe = disk_store(tmp_path / "probe")
    save_session(probe, "x", [0, 1], turns=2)
    one_session = probe.stats()["disk_bytes"]
    probe.close()
    budget = 3 * one_session
    store = disk_store(tmp_path / "disk", disk_bytes=budget)
    root = root_of(tmp_path / "disk")
    sessions = [f"user-{i}" for i in range(12)]
    for session in sessions:  # each reads the shared prompt, saves two blocks, two turns
        if store.get(key("prompt")) is None:
            assert save_blocks(store, ["prompt"]) == [("host", "disk")]
        for serial in (0, 1):
            save_blocks(store, [f"{session}/{serial}"])
            assert disk_usage(root) == store.stats()["disk_bytes"] <= budget
        for turn in range(2):
            store.append_record(session, {"turn": turn, "session": session}).result()
            assert disk_usage(root) == store.stats()["disk_bytes"] <= budget
    stats = store.stats()
    assert stats["disk_evictions"] > 0 and stats["disk_record_evictions"] > 0
    assert stats["disk_blocks"] + stats["disk_evictions"] == 1 + 2 * len(sessions)
    store.close()

    again = disk_store(tmp_path / "disk", disk_bytes=budget)
    assert disk_usage(root) == again.stats()["disk_bytes"] <= budget
    assert again.get_record(sessions[0]) is None  # its log was evicted long ago
    assert again.get_record(sessions[-1]) == entries(2, sessions[-1])
    assert_block(again, "prompt", "disk")  # used by every session: never evicted
    for session in sessions:
        again.drop(session)
    assert sorted(os.listdir(root)) == ["blocks"]  # the blocks stay, the logs are gone
    assert disk_usage(root) == again.stats()["disk_bytes"]
    again.close()


def test_an_append_after_its_log_was_evicted_writes_the_log_whole(tmp_path):
    probe = disk_store(tmp_path / "probe")
    save_session(probe, "x", [0], turns=1)
    one_session = probe.stats()["disk_bytes"]
    probe.close()
    store = disk_store(tmp_path / "disk", disk_bytes=one_session)
    save_session(store, "a", [0], turns=1)
    save_session(store, "b", [0], turns=1)  # evicts "a"'s block and log from disk
    assert not os.path.exists(log_path(tmp_path / "disk", "a"))
    assert store.stats()["disk_record_evictions"] == 1
    assert store.append_record("a", {"turn": 1, "session": "a"}).result() is True
    store.close()
    again = disk_store(tmp_path / "disk", disk_bytes=one_session)
    assert again.get_record("a") == entries(2, "a")
    again.close()


def rewritten_header(path, change):
    """Rewrites the header of block file `path` with `change(header)` applied (the
    payload and its checksum unchanged)."""
    data = open(path, "rb").read()
    start = len(disk_entry.MAGIC) + 4
    (length,) = struct.unpack_from("<I", data, len(disk_entry.MAGIC))
    header = json.loads(data[start:start + length])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-(start + len(text)) % disk_entry.ALIGNMENT)
    open(path, "wb").write(disk_entry.MAGIC + struct.pack("<I", len(text)) + text
                           + data[start + length:])


@pytest.mark.parametrize("damage", [None, "a flipped byte", "another key's file",
                                    "another shape", "a huge shape"])
def test_a_run_of_block_files_is_read_into_one_array_up_to_the_first_bad_file(tmp_path,
                                                                               damage):
    """A turn's lookup reads the disk's leading run of its blocks together, into one
    layer-major array (a load then moves each layer as one piece). A file that fails a
    check ends the run and is dropped; a good file of another shape starts a run of its
    own."""
    names = [f"run/{i}" for i in range(6)]
    store = disk_store(tmp_path)
    save_blocks(store, names)
    store.close()
    bad = block_path(tmp_path, names[3])
    if damage == "a flipped byte":
        data = bytearray(open(bad, "rb").read())
        data[-5] ^= 1
        open(bad, "wb").write(bytes(data))
    elif damage == "another key's file":
        shutil.copy(block_path(tmp_path, names[0]), bad)
    elif damage == "another shape":
        rewritten_header(bad, lambda h: [a.update(shape=[a["shape"][0], 8, 2, 4])
                                         for a in h["arrays"]])  # same bytes, other shape
    elif damage == "a huge shape":
        rewritten_header(bad, lambda h: h["arrays"][0].update(shape=[2**40, 4, 2, 8]))
    again = disk_store(tmp_path, host_bytes=0)  # every lookup reads the disk
    found = again.get_run([key(name) for name in names])
    assert [tier for _, tier in found] == ["disk"] * (6 if damage in (None, "another shape")
                                                      else 3)
    for name, (got, _) in zip(names, found):
        expected = block(seed(name))
        if damage == "another shape" and name == names[3]:  # as its header says
            assert got.k.shape == (2, 8, 2, 4)
            expected = BlockKV(expected.k.reshape(got.k.shape), expected.v.reshape(got.k.shape))
        np.testing.assert_array_equal(got.k, expected.k)
        np.testing.assert_array_equal(got.v, expected.v)
        assert not got.k.flags.writeable and not got.v.flags.writeable
    run = found if damage is None else found[:3]  # read together: back to back per layer
    layer_of = [got.k[1] for got, _ in run]
    assert all(b.ctypes.data - a.ctypes.data == a.nbytes for a, b in zip(layer_of, layer_of[1:]))
    stats = again.stats()
    dropped = stats["corrupt_entries"] + stats["stale_entries"]
    assert dropped == (1 if damage in ("a flipped byte", "another key's file", "a huge shape")
                       else 0)
    assert os.path.exists(bad) == (damage in (None, "another shape"))
    again.close()
