"""Placement of the store's tiers: `Tier` evicts exactly as a brute-force reading of the
eviction rule would, and every `BlockTier` (host memory, disk) keeps the tier contract:
round trips by key, a budget that holds against a brute-force byte count, eviction in
policy order, idempotent puts of held keys, checked gets."""

import hashlib
import itertools
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jattn.store.disk_files import DIRECTORY_BYTES, DiskFiles, block_file
from jattn.store.disk_tier import DiskTier
from jattn.store.host_tier import HostTier
from jattn.store.placement import Tier
from jattn.store.policy import eviction_order
from jattn.store.tier import BlockKV, BlockTier

SESSIONS = [f"s{i:02d}" for i in range(10)]
CAPACITY = 10


class ReferenceTier:
    """Sorts every held session by the documented rule at each admit."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.sizes = {}

    @property
    def used(self):
        return sum(self.sizes.values())

    def admit(self, entry, nbytes, *, last_used, upcoming):
        self.sizes.pop(entry, None)
        if nbytes > self.capacity:
            return False, []
        first_seen = {}
        for i, key in enumerate(upcoming):
            first_seen.setdefault(key, i)
        held = {key for key, _ in self.sizes} - {entry[0]}
        outside = sorted((last_used.get(k, -1), k) for k in held if k not in first_seen)
        inside = sorted((-first_seen[k], k) for k in held if k in first_seen)
        evicted = []
        for _, victim in outside + inside:
            if self.used + nbytes <= self.capacity:
                break
            gone = sorted(e for e in self.sizes if e[0] == victim)
            for old in gone:
                del self.sizes[old]
            evicted += gone
        if self.used + nbytes > self.capacity:
            return False, evicted
        self.sizes[entry] = nbytes
        return True, evicted


def run_and_compare(ops, capacity=CAPACITY):
    """Applies `ops` to a `Tier` and the reference; they must agree after each step."""
    tier, reference = Tier(capacity), ReferenceTier(capacity)
    clock = itertools.count()
    last_used, upcoming = {}, []
    for op, *args in ops:
        if op == "admit":
            key, serial, nbytes = args
            entry = (key, serial)
            got = tier.admit(entry, nbytes, last_used=last_used, upcoming=upcoming)
            want = reference.admit(entry, nbytes, last_used=last_used, upcoming=upcoming)
            assert got == want, (op, args)
        elif op == "touch":  # the store's clock moves while the session is held
            last_used[args[0]] = next(clock)
        elif op == "window":  # a new window, or the same list edited in place
            if args[1]:
                upcoming[:] = args[0]
            else:
                upcoming = list(args[0])
        elif op == "remove":
            tier.remove(tuple(args))
            reference.sizes.pop(tuple(args), None)
        elif op == "drop":  # as the store drops a session: every entry, and its clock
            for entry in tier.entries_of(args[0]):
                tier.remove(entry)
            reference.sizes = {e: n for e, n in reference.sizes.items() if e[0] != args[0]}
            last_used.pop(args[0], None)
        assert tier.sizes == reference.sizes
        assert tier.used == reference.used <= capacity
        assert tier.sessions() == {key for key, _ in reference.sizes}
        for key in SESSIONS:
            assert tier.entries_of(key) == sorted(e for e in reference.sizes if e[0] == key)


session = st.sampled_from(SESSIONS)
operation = st.one_of(
    st.tuples(st.just("admit"), session, st.integers(0, 3), st.integers(1, CAPACITY + 1)),
    st.tuples(st.just("touch"), session),
    st.tuples(st.just("window"), st.lists(session, max_size=8), st.booleans()),
    st.tuples(st.just("remove"), session, st.integers(0, 3)),
    st.tuples(st.just("drop"), session),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=120))
def test_tier_decides_as_the_reference(ops):
    run_and_compare(ops)


def random_ops(rng, count, *, drops=1, largest=4, windows=1):
    """`count` random operations; the keywords weigh drops and new windows against ten
    admits (of at most `largest` bytes), four touches and two removes."""
    for _ in range(count):
        kind = rng.choices(["admit", "touch", "window", "remove", "drop"],
                           weights=[10, 4, windows, 2, drops])[0]
        key = rng.choice(SESSIONS)
        if kind == "admit":
            yield kind, key, rng.randrange(4), rng.randint(1, largest)
        elif kind == "window":
            yield kind, rng.choices(SESSIONS, k=rng.randrange(9)), rng.random() < 0.3
        elif kind == "remove":
            yield kind, key, rng.randrange(4)
        else:
            yield kind, key


def test_tier_agrees_over_long_runs():
    """Long runs, in phases of small entries and many drops (sessions come and go without
    evictions, so stale heap items pile up and the tier rebuilds its heaps) and phases
    of large entries under a window that rarely changes (evictions at almost every
    admit, often of window sessions)."""
    for seed, capacity in enumerate([10, 20, 20, 30, 40]):
        rng = random.Random(seed)
        phases = [random_ops(rng, 1000, drops=10, largest=1) if i % 2 else
                  random_ops(rng, 1000, windows=0.05) for i in range(6)]
        run_and_compare(itertools.chain(*phases), capacity)


def test_refuses_what_does_not_fit_and_spares_its_own_session():
    tier = Tier(4)
    last_used = {"a": 0, "b": 1}
    assert tier.admit(("a", 0), 2, last_used=last_used, upcoming=[]) == (True, [])
    assert tier.admit(("b", 0), 2, last_used=last_used, upcoming=[]) == (True, [])
    assert tier.admit(("c", 0), 5, last_used=last_used, upcoming=[]) == (False, [])
    assert tier.admit(("a", 1), 2, last_used=last_used, upcoming=[]) == (True, [("b", 0)])
    assert tier.admit(("a", 2), 1, last_used=last_used, upcoming=[]) == (False, [])
    assert tier.used == 4 and tier.sessions() == {"a"}


# ----- the tier interface ---------------------------------------------------------------

FINGERPRINT = "f" * 64


def tier_key(name):
    """A 16-byte block key per name."""
    return hashlib.blake2b(str(name).encode(), digest_size=16).digest()


def kv_block(seed, layers=2, rows=4):
    """A block of `[layers, rows, 2, 8]` float32 keys and values (128 * layers * rows
    bytes)."""
    rng = np.random.default_rng(seed)
    return BlockKV(*(rng.standard_normal((layers, rows, 2, 8)).astype(np.float32)
                     for _ in "kv"))


def host_tier(path, capacity):
    return HostTier(capacity)


def disk_tier(path, capacity):
    return DiskTier(DiskFiles(str(path), capacity), fingerprint=FINGERPRINT)


def counted_bytes(tier, blocks):
    """What the tier's budget must count, found without its accounting: the bytes of the
    blocks put (`blocks`, by key) that host memory holds; on disk, the files and
    `DIRECTORY_BYTES` per directory under the root."""
    if isinstance(tier, DiskTier):
        return sum(sum(os.path.getsize(os.path.join(d, f)) for f in files)
                   + DIRECTORY_BYTES * len(dirs) for d, dirs, files in os.walk(tier.files.root))
    return sum(block.nbytes for key, block in blocks.items() if tier.contains(key))


@pytest.fixture(params=[host_tier, disk_tier], ids=["host", "disk"])
def make_tier(request, tmp_path):
    """Makes an empty tier of the kind under test: `make_tier(capacity_bytes)`."""
    paths = itertools.count()
    return lambda capacity: request.param(tmp_path / str(next(paths)), capacity)


def assert_same_block(found, block):
    assert found is not None
    np.testing.assert_array_equal(found.k, block.k)
    np.testing.assert_array_equal(found.v, block.v)


def test_put_get_contains_delete_round_trip(make_tier):
    tier = make_tier(10**6)
    assert isinstance(tier, BlockTier) and tier.enabled
    key, block = tier_key("a"), kv_block(1)
    assert (tier.contains(key), tier.get(key), tier.keys(), tier.used_bytes) == \
        (False, None, [], 0)
    assert tier.put(key, block) is True
    assert tier.contains(key) and tier.keys() == [key]
    assert_same_block(tier.get(key), block)
    assert 0 < tier.used_bytes == counted_bytes(tier, {key: block}) <= tier.capacity_bytes
    tier.delete(key)
    tier.delete(tier_key("never put"))
    assert (tier.contains(key), tier.get(key), tier.keys()) == (False, None, [])
    assert tier.used_bytes == counted_bytes(tier, {}) == 0


def test_a_put_of_a_held_key_keeps_the_held_copy_and_changes_nothing(make_tier):
    tier = make_tier(10**6)
    key, first = tier_key("a"), kv_block(1)
    assert tier.put(key, first)
    before = tier.used_bytes, tier.stats()
    assert tier.put(key, kv_block(2)) is True
    assert (tier.used_bytes, tier.stats()) == before  # nothing written again
    assert_same_block(tier.get(key), first)


def test_the_budget_holds_under_random_puts_of_random_sizes(make_tier):
    """Random puts (some of blocks larger than the budget), gets, touches, hints and
    deletes: after each, the tier counts exactly what a brute-force count finds and
    never more than its budget; a put returns whether the key is held."""
    rng = random.Random(0)
    tier = make_tier(12_000)
    blocks = {}  # key -> the block the tier holds (or held) under it
    keys = [tier_key(n) for n in range(12)]
    for step in range(300):
        key, action = rng.choice(keys), rng.random()
        if action < 0.6:
            block = kv_block(step, layers=rng.randint(1, 4), rows=rng.randint(1, 24))
            held = tier.contains(key)
            assert tier.put(key, block) == tier.contains(key)
            if tier.contains(key) and not held:
                blocks[key] = block
        elif action < 0.7:
            found = tier.get(key)
            if found is not None:
                assert_same_block(found, blocks[key])
        elif action < 0.8:
            tier.touch(rng.sample(keys, 3))
        elif action < 0.9:
            tier.hint(rng.sample(keys, rng.randint(0, 5)))
        else:
            tier.delete(key)
        assert tier.used_bytes == counted_bytes(tier, blocks) <= tier.capacity_bytes
        assert sorted(tier.keys()) == sorted(k for k in keys if tier.contains(k))
    assert tier.stats()[f"{tier.name}_evictions"] > 0


def test_a_tier_evicts_in_policy_order(make_tier):
    """Equal blocks: each put that evicts takes the head of `eviction_order` over the
    held keys, under the uses (puts, gets, touches) and the window the tier was given."""
    probe = make_tier(10**6)
    probe.put(tier_key("probe"), kv_block(0))
    one = probe.used_bytes  # a block with what it brings along (its directories on disk)
    tier = make_tier(4 * one + one // 2)
    rng = random.Random(1)
    clock = itertools.count()
    last_used, upcoming, evictions = {}, [], 0
    for n in range(200):
        held = sorted(tier.keys())
        action = rng.random()
        if held and action < 0.25:
            key = rng.choice(held)
            tier.touch([key, tier_key("never put")])
            last_used[key] = next(clock)
        elif held and action < 0.35:
            key = rng.choice(held)
            assert tier.get(key) is not None
            last_used[key] = next(clock)
        elif action < 0.45:  # held keys and keys still to come
            upcoming = rng.sample(held + [tier_key(m) for m in range(n, n + 4)],
                                  rng.randint(0, len(held)))
            tier.hint(upcoming)
        else:
            key = tier_key(n)
            assert tier.put(key, kv_block(0))
            last_used[key] = next(clock)
            evicted = set(held) - set(tier.keys())
            order = eviction_order(held, last_used=last_used, upcoming=upcoming)
            assert evicted == set(order[:len(evicted)])
            evictions += len(evicted)
    assert evictions > 20


def test_a_disk_copy_that_fails_its_check_is_dropped_and_counted(tmp_path):
    tier = disk_tier(tmp_path, 10**6)
    key = tier_key("a")
    assert tier.put(key, kv_block(1))
    path = tier.files.path(block_file(key))
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 1
    open(path, "wb").write(bytes(data))
    assert tier.contains(key)  # checked when read
    assert tier.get(key) is None and not tier.contains(key)
    assert tier.stats()["corrupt_entries"] == 1 and not os.path.exists(path)
    assert tier.used_bytes == counted_bytes(tier, {}) == 0
