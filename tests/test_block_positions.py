"""paged_attention with `block_positions`: any subset of a sequence's blocks, in table
order with their true positions, gives the partial (out, lse) of those keys, and the
partials of a partition merge to the whole sequence's attention (the float64 oracle)."""

import jax.numpy as jnp
import numpy as np
import pytest

import attention_oracle
from kernel_cases import KERNEL_BACKENDS, assert_attention_close, rounded
from pallas_kernels import merge_attention, paged_attention
from test_paged_attention import make_pool


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("parts,seed", [(2, 0), (3, 1), (5, 2)])
def test_partitioned_tables_with_positions_merge_to_the_whole(backend, parts, seed):
    _check_partition(backend, parts, seed, [37, 16, 1, 0, 23], max_blocks=12)


def test_xla_partitions_spanning_several_chunks():
    """Parts of up to 50 pages: the XLA path's 64-token chunks (16 pages) each take their
    positions from the step before."""
    _check_partition("xla", 2, 3, [200, 37, 0, 129], max_blocks=50)


def _check_partition(backend, parts, seed, lengths, *, max_blocks):
    rng = np.random.default_rng(seed)
    block_size, hq, hkv, d = 4, 4, 2, 16
    lengths = np.asarray(lengths, np.int32)
    k_np, v_np, tables = make_pool(rng, lengths, block_size=block_size, hkv=hkv, d=d,
                                   max_blocks=max_blocks)
    q, q64 = rounded(rng.standard_normal((len(lengths), hq, d)), jnp.float32)
    k, k64 = rounded(k_np, jnp.float32)
    v, v64 = rounded(v_np, jnp.float32)
    inv_freq = 10000.0 ** -(np.arange(0, d, 2) / d)

    # Each table entry of each sequence goes to a random part; a part's table lists its
    # entries in order (the partial last block, if it has it, last) with their positions.
    pages = -(-lengths // block_size)
    owner = rng.integers(0, parts, size=tables.shape)
    outs, lses = [], []
    for part in range(parts):
        part_tables = np.full_like(tables, 2**30)  # garbage past each part's entries
        part_positions = np.full_like(tables, -7)
        part_lengths = np.zeros_like(lengths)
        for b in range(len(lengths)):
            mine = [j for j in range(pages[b]) if owner[b, j] == part]
            part_tables[b, :len(mine)] = tables[b, mine]
            part_positions[b, :len(mine)] = np.asarray(mine, np.int32) * block_size
            part_lengths[b] = sum(min(block_size, lengths[b] - j * block_size) for j in mine)
        out, lse = paged_attention(q, k, v, jnp.asarray(part_tables),
                                   jnp.asarray(part_lengths), backend=backend,
                                   key_rope_inv_freq=jnp.asarray(inv_freq, jnp.float32),
                                   block_positions=jnp.asarray(part_positions))
        outs.append(out)
        lses.append(lse)
    out, lse = merge_attention(jnp.stack(outs), jnp.stack(lses))
    want_out, want_lse = attention_oracle.paged(q64, k64, v64, tables, lengths, d ** -0.5,
                                                inv_freq)
    assert_attention_close(out, lse, want_out, want_lse, jnp.float32)


def test_block_positions_must_match_the_table():
    q = jnp.zeros((2, 4, 8))
    pages = jnp.zeros((4, 2, 2, 8))
    with pytest.raises(ValueError, match="block_positions must be integers shaped like"):
        paged_attention(q, pages, pages, jnp.zeros((2, 3), jnp.int32),
                        jnp.ones(2, jnp.int32), block_positions=jnp.zeros((2, 2), jnp.int32))
