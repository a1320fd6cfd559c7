"""DistAttention on 8 simulated CPU devices equals single-device attention: blocks
scattered over every device, ragged lengths, sequences absent from some devices, NaN in
every slot no sequence owns; and the distributed allocator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattn.distributed import DistributedBlockAllocator, paged_attention, prefill_attention
from jattn.block_allocator import BlockNotAllocated, PoolExhausted
from pallas_kernels import flash_attention
from pallas_kernels import paged_attention as single_device_paged_attention


def kv_mesh(devices=8):
    return jax.make_mesh((devices,), ("kv",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])


def scattered_pool(rng, lengths, *, devices, per_device, block_size, hkv, d, home_only=()):
    """Pool `[devices * per_device, block_size, Hkv, D]` with NaN in unowned slots; each
    sequence's blocks drawn at random over all devices (or only device 0 for the
    sequences in `home_only`)."""
    num_blocks = devices * per_device
    k = rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float32)
    v = rng.standard_normal((num_blocks, block_size, hkv, d)).astype(np.float32)
    owned = np.zeros((num_blocks, block_size), bool)
    free = list(rng.permutation(num_blocks))
    pages = [-(-n // block_size) for n in lengths]
    tables = np.full((len(lengths), max(max(pages), 1)), 2**30, np.int32)
    for b, (length, count) in enumerate(zip(lengths, pages)):
        for j in range(count):
            pool = [x for x in free if x < per_device] if b in home_only else free
            block = pool[0]
            free.remove(block)
            tables[b, j] = block
        for token in range(length):
            owned[tables[b, token // block_size], token % block_size] = True
    k[~owned] = np.nan
    v[~owned] = np.nan
    return jnp.asarray(k), jnp.asarray(v), jnp.asarray(tables)


@pytest.mark.parametrize("seed,devices", [(0, 8), (1, 4), (2, 2), (3, 1)])
def test_distributed_decode_equals_one_device(seed, devices):
    rng = np.random.default_rng(seed)
    block_size, hq, hkv, d = 4, 8, 2, 16
    lengths = [137, 1, 0, 64, 5, 90]
    k, v, tables = scattered_pool(rng, lengths, devices=devices, per_device=48 // devices * 2,
                                  block_size=block_size, hkv=hkv, d=d, home_only={4})
    q = jnp.asarray(rng.standard_normal((len(lengths), hq, d)), jnp.float32)
    inv_freq = jnp.asarray(10000.0 ** -(np.arange(0, d, 2) / d), jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    mesh = kv_mesh(devices)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("kv"))
    out, lse = jax.jit(lambda *a: paged_attention(*a, mesh=mesh, key_rope_inv_freq=inv_freq))(
        q, jax.device_put(k, sharded), jax.device_put(v, sharded), tables, lengths)
    want_out, want_lse = single_device_paged_attention(q, k, v, tables, lengths,
                                                       backend="reference",
                                                       key_rope_inv_freq=inv_freq)
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    seen = ~np.isneginf(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], atol=2e-5)


@pytest.mark.parametrize("q_offset,chunk", [(0, 40), (57, 9), (120, 1)])
def test_distributed_prefill_equals_one_device(q_offset, chunk):
    rng = np.random.default_rng(q_offset)
    block_size, hq, hkv, d = 4, 4, 2, 8
    length = q_offset + chunk
    k, v, tables = scattered_pool(rng, [length], devices=8, per_device=8,
                                  block_size=block_size, hkv=hkv, d=d)
    q = jnp.asarray(rng.standard_normal((chunk, hq, d)), jnp.float32)
    inv_freq = jnp.asarray(10000.0 ** -(np.arange(0, d, 2) / d), jnp.float32)
    mesh = kv_mesh()
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("kv"))
    out, lse = prefill_attention(q, jax.device_put(k, sharded), jax.device_put(v, sharded),
                                 tables[0], q_offset=q_offset, kv_length=length, mesh=mesh,
                                 key_rope_inv_freq=inv_freq, chunk_blocks=3)
    keys = k[tables[0]].reshape(-1, hkv, d)
    values = v[tables[0]].reshape(-1, hkv, d)
    want_out, want_lse = flash_attention(q, keys, values, causal=True, q_offset=q_offset,
                                         kv_length=length, key_rope_inv_freq=inv_freq,
                                         backend="reference")
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_pool_must_split_over_the_axis():
    mesh = kv_mesh(8)
    pages = jnp.zeros((12, 4, 2, 8))
    with pytest.raises(ValueError, match="12 blocks do not split evenly over the 8 devices"):
        paged_attention(jnp.zeros((1, 2, 8)), pages, pages, jnp.zeros((1, 2), jnp.int32),
                        jnp.ones(1, jnp.int32), mesh=mesh)
    with pytest.raises(ValueError, match="mesh has no axis 'tp'"):
        paged_attention(jnp.zeros((1, 2, 8)), pages, pages, jnp.zeros((1, 2), jnp.int32),
                        jnp.ones(1, jnp.int32), mesh=mesh, axis="tp")


def test_allocator_home_first_then_borrows_and_settles():
    allocator = DistributedBlockAllocator(4, 5)
    first = allocator.allocate(3, home=2)
    assert {allocator.device_of(b) for b in first} == {2}
    second = allocator.allocate(6, home=2)  # 2 left at home, then borrowed
    homes = [allocator.device_of(b) for b in second]
    assert homes[:2] == [2, 2] and 2 not in homes[2:]
    assert sum(allocator.debts.values()) == 4
    assert all(debtor == 2 for debtor, _ in allocator.debts)
    allocator.free(second)
    assert not allocator.debts and allocator.free_on(2) == 2
    with pytest.raises(BlockNotAllocated, match="not an allocated block"):
        allocator.free([second[0]])
    with pytest.raises(PoolExhausted, match="asked for 30 KV blocks, 17 of 20 free over 4 "
                                            "devices"):
        allocator.allocate(30)
    assert allocator.free_blocks == 17
    assert allocator.free_ids() == set(range(20)) - set(first)


@pytest.mark.parametrize("seed", range(4))
def test_allocator_takes_only_on_the_devices_asked(seed):
    """`allocate_on` takes from the given devices only, the one with the most free
    first; short there, it raises and takes nothing."""
    rng = np.random.default_rng(seed)
    allocator = DistributedBlockAllocator(8, 6)
    allocator.allocate(int(rng.integers(0, 20)))  # uneven free counts
    devices = sorted(int(d) for d in rng.choice(8, 3, replace=False))
    free = {d: allocator.free_on(d) for d in devices}
    count = int(rng.integers(1, sum(free.values()) + 1))
    taken = allocator.allocate_on(devices, count)
    assert len(set(taken)) == count and {allocator.device_of(b) for b in taken} <= set(devices)
    want = dict(free)  # the greedy rule, one block at a time
    for _ in range(count):
        want[max(devices, key=lambda d: want[d])] -= 1
    assert {d: allocator.free_on(d) for d in devices} == want
    left = list(want.values())
    before = allocator.free_ids()
    with pytest.raises(PoolExhausted, match="on devices"):
        allocator.allocate_on(devices, sum(left) + 1)
    assert allocator.free_ids() == before
