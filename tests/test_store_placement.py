"""Placement of the store's tiers: `EvictionOrder` and `Placement` evict exactly as a
brute-force reading of the eviction rule would, and every `BlockTier` (host memory, disk)
keeps the tier contract: round trips by key, a budget that holds against a brute-force
byte count, eviction in that order, idempotent puts of held keys, checked gets."""

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
from jattn.store.eviction import EvictionOrder
from jattn.store.host_tier import HostTier
from jattn.store.placement import Placement
from jattn.store.tier import BlockKV, BlockTier

KEYS = [f"s{i:02d}" for i in range(10)]
CAPACITY = 10


def reference_order(held, *, last_used: dict, upcoming: list) -> list:
    """The documented rule, by sorting: keys outside `upcoming` first, least recently used
    (smallest `last_used`) first; then keys inside it, the one whose first position in
    `upcoming` is farthest first."""
    first_seen = {}
    for position, key in enumerate(upcoming):
        first_seen.setdefault(key, position)
    outside = sorted((last_used[key], key) for key in held if key not in first_seen)
    inside = sorted((-first_seen[key], key) for key in held if key in first_seen)
    return [key for _, key in outside + inside]


def test_eviction_order_is_scheduler_aware_then_lru():
    order = EvictionOrder()
    for key in "bdaec":  # last used: b first, c last
        order.use(key)
    order.hint(["c", "x", "a"])
    assert order.take(5) == ["b", "d", "e", "a", "c"]  # outside by LRU, then farthest-upcoming
    assert len(order) == 0 and order.take(1) == []


def test_eviction_order_takes_as_the_reference_under_random_use():
    """Random uses, removes, hints and takes (some limited by a predicate): every take
    returns the head of the reference order among the keys it accepts, and leaves the
    others held."""
    rng = random.Random(0)
    order, clock = EvictionOrder(), itertools.count()
    last_used, upcoming = {}, []
    for _ in range(5000):
        action, key = rng.random(), rng.randrange(40)
        if action < 0.45:
            order.use(key)
            last_used[key] = next(clock)
        elif action < 0.55:
            order.remove(key)
            last_used.pop(key, None)
        elif action < 0.65:
            upcoming = rng.choices(range(50), k=rng.randrange(12))
            order.hint(upcoming)
        else:
            count, parity = rng.randrange(4), rng.choice([None, 0, 1])
            accept = None if parity is None else (lambda k: k % 2 == parity)
            want = [k for k in reference_order(last_used, last_used=last_used,
                                               upcoming=upcoming)
                    if accept is None or accept(k)][:count]
            assert order.take(count, accept) == want
            for taken in want:
                del last_used[taken]
        assert len(order) == len(last_used)
        assert all(k in order for k in last_used)


class ReferenceTier:
    """Sorts every held key by the documented rule at each admit."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.sizes = {}

    @property
    def used(self):
        return sum(self.sizes.values())

    def admit(self, key, nbytes, *, last_used, upcoming):
        self.sizes.pop(key, None)
        if nbytes > self.capacity:
            return False, []
        evicted = []
        for victim in reference_order(self.sizes, last_used=last_used, upcoming=upcoming):
            if self.used + nbytes <= self.capacity:
                break
            del self.sizes[victim]
            evicted.append(victim)
        self.sizes[key] = nbytes
        return True, evicted


def admit(placement, key, nbytes):
    """Takes `key` as the store's tiers do: forgets it, refuses what could never fit,
    makes room and admits. Returns `(admitted, evicted keys in order)`."""
    placement.remove(key)
    if nbytes > placement.capacity:
        return False, []
    evicted = []
    fits = placement.make_room(key, lambda: placement.used + nbytes <= placement.capacity,
                               evicted.append)
    if fits:
        placement.admit(key, nbytes)
    return fits, evicted


def run_and_compare(ops, capacity=CAPACITY):
    """Applies `ops` to a `Placement` and the reference; they must agree after each step."""
    placement, reference = Placement(capacity), ReferenceTier(capacity)
    clock = itertools.count()
    last_used, upcoming = {}, []
    for op, *args in ops:
        if op == "admit":
            key, nbytes = args
            last_used[key] = next(clock)
            got = admit(placement, key, nbytes)
            want = reference.admit(key, nbytes, last_used=last_used, upcoming=upcoming)
            assert got == want, (op, args)
        elif op == "touch":  # a use of a held key
            placement.touch(args[0])
            if args[0] in reference.sizes:
                last_used[args[0]] = next(clock)
        elif op == "window":
            upcoming = list(args[0])
            placement.hint(upcoming)
        elif op == "remove":
            placement.remove(args[0])
            reference.sizes.pop(args[0], None)
        assert {key: placement.size_of(key) for key in placement.keys()} == reference.sizes
        assert placement.used == reference.used <= capacity
        assert len(placement) == len(reference.sizes)
        assert all((key in placement) == (key in reference.sizes) for key in KEYS)


key_names = st.sampled_from(KEYS)
operation = st.one_of(
    st.tuples(st.just("admit"), key_names, st.integers(1, CAPACITY + 1)),
    st.tuples(st.just("touch"), key_names),
    st.tuples(st.just("window"), st.lists(key_names, max_size=8)),
    st.tuples(st.just("remove"), key_names),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=120))
def test_placement_decides_as_the_reference(ops):
    run_and_compare(ops)


def random_ops(rng, count, *, removes=1, largest=4, windows=1):
    """`count` random operations; the keywords weigh removes and new windows against ten
    admits (of at most `largest` bytes) and four touches."""
    for _ in range(count):
        kind = rng.choices(["admit", "touch", "window", "remove"],
                           weights=[10, 4, windows, removes])[0]
        key = rng.choice(KEYS)
        if kind == "admit":
            yield kind, key, rng.randint(1, largest)
        elif kind == "window":
            yield kind, rng.choices(KEYS, k=rng.randrange(9))
        else:
            yield kind, key


def test_placement_agrees_over_long_runs():
    """Long runs, in phases of small entries and many removes (keys come and go without
    evictions, so stale heap items pile up and the order rebuilds its heaps) and phases
    of large entries under a window that rarely changes (evictions at almost every
    admit, often of window keys)."""
    for seed, capacity in enumerate([10, 20, 20, 30, 40]):
        rng = random.Random(seed)
        phases = [random_ops(rng, 1000, removes=10, largest=1) if i % 2 else
                  random_ops(rng, 1000, windows=0.05) for i in range(6)]
        run_and_compare(itertools.chain(*phases), capacity)


def test_refuses_what_does_not_fit_and_spares_the_key_it_makes_room_for():
    placement = Placement(4)
    assert admit(placement, "a", 2) == (True, [])
    assert admit(placement, "b", 2) == (True, [])
    assert admit(placement, "c", 5) == (False, [])
    evicted = []
    assert not placement.make_room("a", lambda: placement.used + 3 <= 4, evicted.append)
    assert evicted == ["b"] and placement.keys() == ["a"] and placement.used == 2


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


def test_a_tier_evicts_in_the_eviction_order(make_tier):
    """Equal blocks: each put that evicts takes the head of the reference order over the
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
            order = reference_order(held, last_used=last_used, upcoming=upcoming)
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
