"""The KV-cache manager, the one owner of the device pool, against the block census and
the store it sits on: what a lease reuses from which tier, what publishing saves, and
that every block is accounted for on every path (success, the pool running out)."""

import numpy as np
import pytest

from jattn.block_allocator import BlockAllocator, PoolExhausted
from jattn.distributed.group_store import GroupStore
from jattn.engine.kv_cache_manager import KVCacheManager
from jattn.store import AttentionStore, BlockKV, StoreConfig
from jattn.store.kv_store import KVStore, NoStore

SHAPE = (2, 4, 1, 8)  # layers, block tokens, KV heads, head dim


def keys(count: int, seed: int = 0) -> list[bytes]:
    """`count` random 16-byte content keys."""
    return [np.random.default_rng((seed, i)).bytes(16) for i in range(count)]


def block_kv(seed: int) -> BlockKV:
    rng = np.random.default_rng(seed)
    return BlockKV(rng.standard_normal(SHAPE, np.float32), rng.standard_normal(SHAPE, np.float32))


def manager(store, *, blocks: int = 16, cached: int = 8) -> KVCacheManager:
    return KVCacheManager(BlockAllocator(blocks), store, block_bytes=2 * 4 * 8 * 8 * 4,
                          capacity_blocks=cached)


def host_store() -> AttentionStore:
    return AttentionStore(StoreConfig(hbm_bytes=0, host_bytes=1 << 20), fingerprint="0" * 64)


def publish_fresh(pool: KVCacheManager, block_keys: list[bytes], store=None) -> list[int]:
    """A turn that computed the blocks of `block_keys`: publishes them and, as a step's
    saves would, files those the store lacks. Returns the saved blocks' ids."""
    lease = pool.match([])
    pool.extend(lease, len(block_keys))
    blocks = list(lease.table)
    saves = pool.publish(lease, block_keys)
    if store is not None:
        kv = {block: block_kv(block) for block in blocks}
        store.save_blocks([s.key for s in saves], [s.block for s in saves], lambda: kv)
        store.flush()
    return [save.block for save in saves]


@pytest.mark.parametrize("store_class", [AttentionStore, GroupStore, NoStore])
def test_every_store_implements_the_whole_protocol(store_class):
    wanted = {name for name in vars(KVStore) if not name.startswith("_")}
    assert wanted <= set(dir(store_class)), wanted - set(dir(store_class))
    assert not {"shared", "can_fetch", "loads_layer_by_layer"} & set(dir(store_class))


def test_a_lease_reuses_the_device_tier_in_place_and_loads_the_rest_from_the_store():
    """Three blocks published, two evicted from the device tier (its budget is one
    cached block) but saved to host memory: a match takes the two from the store (their
    KV arriving, exactly as saved) and the third in place, and stops at the unknown
    fourth; giving the lease back balances the census."""
    store = host_store()
    pool = manager(store, cached=1)
    block_keys = keys(4)
    saved = publish_fresh(pool, block_keys[:3], store)
    assert len(saved) == 3 and store.held(block_keys[:3]) == ["host"] * 3
    assert pool.resident(block_keys) == {"hbm": 1, "host": 3, "disk": 0, "remote": 0}
    lease = pool.match(block_keys)
    assert lease.tiers == {"hbm": 1, "host": 2, "disk": 0, "remote": 0}
    assert len(lease.table) == 3 and lease.reused_blocks == 3
    assert [block for block, _ in lease.arriving] == lease.table[:2]
    for (_, got), want in zip(lease.arriving, saved[:2]):
        np.testing.assert_array_equal(got.k, block_kv(want).k)
    census = pool.census()
    assert census.balanced and census.in_flight == 2 and census.resident == 1
    pool.release(lease)
    pool.release(lease)  # idempotent
    census = pool.census()
    assert census.balanced and census.in_flight == 0 and census.free == 16 - census.resident
    assert pool.stats()["hbm_blocks_referenced"] == 0


def test_publishing_a_key_held_already_keeps_the_held_block_and_saves_nothing():
    store = host_store()
    pool = manager(store)
    block_keys = keys(2, seed=1)
    first = publish_fresh(pool, block_keys, store)
    assert publish_fresh(pool, block_keys, store) == []  # the device tier has them
    lease = pool.match(block_keys)
    assert lease.table == first and lease.tiers["hbm"] == 2
    pool.release(lease)
    census = pool.census()
    assert census.balanced and census.resident == 2 and census.free == 14


def test_a_pool_that_runs_out_mid_match_gives_everything_back():
    """The store holds four blocks, the pool has room for two: the match raises
    PoolExhausted, and the references it took and the blocks it allocated are all
    given back."""
    store = host_store()
    filler = manager(store)
    block_keys = keys(5, seed=2)
    publish_fresh(filler, block_keys[1:], store)
    pool = manager(store, blocks=3, cached=3)
    publish_fresh(pool, block_keys[:1])  # the first key on the device, referenced by the match
    held = pool.match([])
    pool.extend(held, 2)  # no free block left
    before = pool.census()
    with pytest.raises(PoolExhausted):
        pool.match(block_keys)
    after = pool.census()
    assert after == before and after.balanced
    assert pool.stats()["hbm_blocks_referenced"] == 0
    pool.release(held)
    assert pool.census().free + pool.census().resident == 3


def test_without_a_store_only_the_device_tier_reuses_and_nothing_is_saved():
    pool = manager(NoStore(), cached=4)
    block_keys = keys(3, seed=3)
    assert publish_fresh(pool, block_keys) == []
    lease = pool.match(block_keys + keys(1, seed=4))
    assert lease.tiers == {"hbm": 3, "host": 0, "disk": 0, "remote": 0}
    assert lease.remote is None and not lease.arriving
    pool.release(lease)
    assert pool.census().balanced
