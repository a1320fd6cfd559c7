"""The device tier: pool blocks by content key, reference counts, eviction order, and
that every pool block stays accounted for under random use."""

import random

import pytest

from jattn.block_allocator import BlockAllocator, PoolExhausted
from jattn.store.device import DeviceBlocks


def key(n: int) -> bytes:
    return n.to_bytes(16, "little")


def test_publishing_a_held_key_frees_the_newcomer_and_keeps_one_copy():
    allocator = BlockAllocator(8)
    device = DeviceBlocks(allocator, capacity_blocks=8)
    first, second = allocator.allocate(2)
    assert device.publish(key(1), first) == (first, True)
    assert device.publish(key(1), second) == (first, False)
    assert allocator.free_blocks == 7 and device.stats().held == 1
    assert device.acquire(key(1)) == first


def test_referenced_blocks_are_never_evicted():
    allocator = BlockAllocator(4)
    device = DeviceBlocks(allocator, capacity_blocks=0)
    for n, block in enumerate(allocator.allocate(4)):
        device.publish(key(n), block)
    device.acquire(key(0))
    device.acquire(key(2))
    device.acquire(key(2))
    assert device.trim() == 2  # keys 1 and 3
    assert key(0) in device and key(2) in device and allocator.free_blocks == 2
    device.release(key(2))
    assert device.evict(4) == 0  # still referenced once
    device.release(key(2))
    device.release(key(0))
    assert device.evict(4) == 2 and allocator.free_blocks == 4


def test_eviction_goes_least_recently_released_first_and_hinted_blocks_last():
    allocator = BlockAllocator(6)
    device = DeviceBlocks(allocator, capacity_blocks=6)
    for n, block in enumerate(allocator.allocate(6)):
        device.publish(key(n), block)
    for n in (3, 0, 4):  # use 3, 0 and 4 again: released after 1, 2 and 5
        device.acquire(key(n))
        device.release(key(n))
    device.hint([key(5), key(1), key(5)])  # 5 next, then 1
    order = []
    for _ in range(6):
        before = {n for n in range(6) if key(n) in device}
        device.evict(1)
        order += [n for n in before if key(n) not in device]
    assert order == [2, 3, 0, 4, 1, 5]


def test_random_use_keeps_every_block_accounted_for():
    """Against a plain model of the tier: the same keys held, references and the pool's
    free count after every operation; cached blocks within capacity after each trim."""
    rng = random.Random(5)
    allocator = BlockAllocator(32)
    device = DeviceBlocks(allocator, capacity_blocks=10)
    references: dict[int, int] = {}  # key -> count, held keys only
    for _ in range(3000):
        action = rng.random()
        if action < 0.35:
            n = rng.randrange(40)
            try:
                block = allocator.allocate(1)[0]
            except PoolExhausted:
                continue
            held, new = device.publish(key(n), block)
            assert new == (n not in references)
            references.setdefault(n, 0)
        elif action < 0.6 and references:
            n = rng.choice(sorted(references))
            device.acquire(key(n))
            references[n] += 1
        elif action < 0.85:
            referenced = [n for n, count in references.items() if count]
            if referenced:
                n = rng.choice(referenced)
                device.release(key(n))
                references[n] -= 1
        else:
            device.trim()
            cached = [n for n, count in references.items() if count == 0]
            assert len([n for n in cached if key(n) in device]) <= 10
        for n in list(references):
            if key(n) not in device:
                assert references.pop(n) == 0, "a referenced block was evicted"
        assert set(references) == {n for n in range(40) if key(n) in device}
        assert allocator.free_blocks + device.stats().held == 32
        assert device.stats().referenced == sum(1 for c in references.values() if c)
        assert len(set(device.held_blocks())) == device.stats().held


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError, match="capacity_blocks"):
        DeviceBlocks(BlockAllocator(2), capacity_blocks=-1)


def test_eviction_limited_to_some_blocks_takes_only_those_in_policy_order():
    """`evict(count, where=...)` (a load that needs room on one process's devices) frees
    only blocks the predicate accepts, least recently released first, and leaves the
    others cached."""
    allocator = BlockAllocator(12)
    device = DeviceBlocks(allocator, capacity_blocks=12)
    blocks = allocator.allocate(12)
    for n, block in enumerate(blocks):
        device.publish(key(n), block)
    even = {b for b in blocks if b % 2 == 0}
    assert device.evict(3, where=lambda block: block in even) == 3
    gone = [n for n in range(12) if key(n) not in device]
    assert gone == [n for n, b in enumerate(blocks) if b in even][:3]
    assert allocator.free_ids() == {blocks[n] for n in gone}
    assert device.evict(20, where=lambda block: block in even) == 3  # the rest of them
    assert all(key(n) in device for n, b in enumerate(blocks) if b not in even)
