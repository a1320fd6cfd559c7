"""`Tier` evicts exactly as a brute-force reading of the eviction rule would."""

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from jattn.store.placement import Tier

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
