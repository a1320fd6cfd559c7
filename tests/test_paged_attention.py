"""paged_attention on every backend against the float64 numpy oracle.

Pages are scattered in the pool in random order; table entries a sequence does not own
hold garbage; every slot no sequence owns holds NaN.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from kernel_cases import KERNEL_BACKENDS, assert_attention_close, rounded
from pallas_kernels import paged_attention


def make_pool(rng, lengths, *, block_size, hkv, d, spare_blocks=3, max_blocks=None):
    """Random pool `[num_blocks, block_size, Hkv, D]` x2 with NaN in unowned slots,
    and a block table that scatters each sequence's pages in random order."""
    pages = [-(-int(n) // block_size) for n in lengths]
    num_blocks = sum(pages) + spare_blocks
    max_blocks = max(max(pages, default=0), 1) if max_blocks is None else max_blocks
    k = rng.standard_normal((num_blocks, block_size, hkv, d))
    v = rng.standard_normal((num_blocks, block_size, hkv, d))
    owned = np.zeros((num_blocks, block_size), bool)
    order = rng.permutation(num_blocks)
    garbage = rng.choice([-1, num_blocks, 2**30, 0], size=(len(lengths), max_blocks))
    tables = garbage.astype(np.int32)
    taken = 0
    for b, (length, count) in enumerate(zip(lengths, pages)):
        tables[b, :count] = order[taken:taken + count]
        taken += count
        for token in range(int(length)):
            owned[tables[b, token // block_size], token % block_size] = True
    k[~owned] = np.nan
    v[~owned] = np.nan
    return k, v, tables


def _run(backend, lengths, *, hq, hkv, d, block_size, dtype, seed, num_splits=None,
         max_blocks=None, rope=False, pages_per_step=None):
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    k_np, v_np, tables = make_pool(rng, lengths, block_size=block_size, hkv=hkv, d=d,
                                   max_blocks=max_blocks)
    q, q64 = rounded(rng.standard_normal((len(lengths), hq, d)), dtype)
    k, k64 = rounded(k_np, dtype)
    v, v64 = rounded(v_np, dtype)
    inv_freq = 10000.0 ** -(np.arange(0, d, 2) / d) if rope else None
    out, lse = paged_attention(q, k, v, jnp.asarray(tables), jnp.asarray(lengths),
                               backend=backend, num_splits=num_splits,
                               pages_per_step=pages_per_step,
                               key_rope_inv_freq=None if inv_freq is None else
                               jnp.asarray(inv_freq, jnp.float32))
    want_out, want_lse = attention_oracle.paged(q64, k64, v64, tables, lengths, d ** -0.5,
                                                inv_freq)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:2] and lse.dtype == jnp.float32
    assert_attention_close(out, lse, want_out, want_lse, dtype)


# lengths: 0, 1, block multiples and non-multiples, in one batch.
LENGTHS = [[37, 0, 9, 1], [8, 16, 5], [0], [1, 64, 23]]
HEADS = [(2, 2), (4, 2), (8, 2), (8, 1), (16, 2)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_paged_matches_oracle(backend, lengths):
    index = LENGTHS.index(lengths)
    hq, hkv = HEADS[index % len(HEADS)]
    _run(backend, lengths, hq=hq, hkv=hkv, d=16, block_size=8, dtype=jnp.float32,
         seed=index, num_splits=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_paged_gqa_ratios(backend, hq, hkv):
    _run(backend, [13, 4, 32], hq=hq, hkv=hkv, d=8, block_size=4, dtype=jnp.float32,
         seed=hq + hkv)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_paged_bfloat16(backend):
    _run(backend, [29, 3, 48], hq=8, hkv=2, d=32, block_size=8, dtype=jnp.bfloat16, seed=7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_rotates_position_free_keys(backend, dtype):
    """Keys stored without position, rotated inside the kernel, match rotating first."""
    _run(backend, [45, 0, 17], hq=8, hkv=2, d=32, block_size=8, dtype=dtype, seed=21,
         num_splits=2, rope=True)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_paged_split_k_counts(backend, num_splits):
    """Any split count, including more splits than pages, gives the same answer."""
    _run(backend, [30, 7], hq=4, hkv=2, d=16, block_size=4, dtype=jnp.float32, seed=11,
         num_splits=num_splits, max_blocks=9)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("pages_per_step", [2, 3, 8])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rotated_keys"])
def test_paged_gpu_pages_per_step(num_splits, pages_per_step, rope):
    """The GPU kernel reading several pages per step: a step's pages past its split's
    end or the sequence's length are masked (their table entries are garbage, their
    slots NaN), whatever the step size against the split and the length."""
    _run("pallas_gpu", [30, 7, 0, 64], hq=4, hkv=2, d=16, block_size=4, dtype=jnp.float32,
         seed=pages_per_step + 10 * num_splits, num_splits=num_splits, max_blocks=17,
         rope=rope, pages_per_step=pages_per_step)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(0, 90), min_size=1, max_size=5),
       ratio=st.sampled_from([1, 2, 4, 8]), hkv=st.integers(1, 2),
       block_size=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16))
def test_paged_xla_random(lengths, ratio, hkv, block_size, seed):
    _run("xla", lengths, hq=ratio * hkv, hkv=hkv, d=16, block_size=block_size,
         dtype=jnp.float32, seed=seed)


def test_paged_xla_long_context_spans_many_chunks():
    """A context of many split-K chunks (64 tokens each by default) merges them all."""
    _run("xla", [1000, 130, 0], hq=4, hkv=2, d=16, block_size=8, dtype=jnp.float32, seed=2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_paged_xla_rotates_keys_across_chunks(dtype):
    """Rotated keys over several chunks, each chunk's keys and angles fetched by the step
    before: lengths ending inside a chunk, at its end and one past it, at the model's
    shape (head_dim 8, 16-slot pages)."""
    _run("xla", [300, 64, 65, 0, 1], hq=8, hkv=4, d=8, block_size=16, dtype=dtype, seed=5,
         rope=True, max_blocks=24)
