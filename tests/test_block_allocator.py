"""BlockAllocator against a set-based model of the pool, over random operation sequences."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jattn.block_allocator import BlockAllocator, BlockNotAllocated, PoolExhausted


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       steps=st.lists(st.tuples(st.booleans(), st.integers(0, 45), st.integers(0, 3)),
                      max_size=60))
def test_matches_a_set_of_free_blocks(num_blocks, seed, steps):
    rng = random.Random(seed)
    allocator = BlockAllocator(num_blocks)
    free = set(range(num_blocks))
    held: list[int] = []
    for allocating, count, mistake in steps:
        if allocating:
            if count > len(free):
                with pytest.raises(PoolExhausted, match=f"asked for {count} KV blocks"):
                    allocator.allocate(count)
            else:
                blocks = allocator.allocate(count)
                assert len(set(blocks)) == count and set(blocks) <= free
                free -= set(blocks)
                held += blocks
        else:
            rng.shuffle(held)
            giving = held[:count]
            bad = None
            if mistake == 1 and free:
                bad = rng.choice(sorted(free))  # already free
            elif mistake == 2 and giving:
                bad = giving[0]  # twice in one call
            elif mistake == 3:
                bad = num_blocks + count  # out of range
            if bad is not None:
                with pytest.raises(BlockNotAllocated, match=f"block {bad} is not an allocated"):
                    allocator.free(giving + [bad])
            else:
                allocator.free(giving)
                free |= set(giving)
                del held[:count]
        assert allocator.free_blocks == len(free)
    allocator.free(held)
    assert sorted(allocator.allocate(num_blocks)) == list(range(num_blocks))
