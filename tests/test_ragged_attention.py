"""ragged_paged_attention on every backend against the float64 numpy oracle.

A ragged batch packs the query runs of several sequences: decodes (one row), chunks of a
prefill with history before them, whole prompts, and sequences with no rows, then
padding rows. Pages are scattered in the pool in random order, table entries a sequence
does not own hold garbage, and every slot no sequence owns holds NaN.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from kernel_cases import KERNEL_BACKENDS, assert_attention_close, rounded
from pallas_kernels import ragged_paged_attention
from test_paged_attention import make_pool


def oracle(q64, k64, v64, tables, query_lengths, kv_lengths, sm_scale, inv_freq):
    """Each sequence's rows attend its keys, gathered in token order, causally; padding
    rows see nothing."""
    t, hq, d = q64.shape
    out, lse = np.zeros((t, hq, d)), np.full((t, hq), -np.inf)
    start = 0
    for s, (rows, length) in enumerate(zip(query_lengths, kv_lengths)):
        k = attention_oracle.paged_keys(k64, tables, length, s)
        v = attention_oracle.paged_keys(v64, tables, length, s)
        if inv_freq is not None:
            k = attention_oracle.rotate(k, np.arange(length), inv_freq)
        positions = length - rows + np.arange(rows)
        visible = np.arange(length)[None, :] <= positions[:, None]
        out[start:start + rows], lse[start:start + rows] = attention_oracle.attention(
            q64[start:start + rows], k, v, visible, sm_scale)
        start += rows
    return out, lse


def _run(backend, query_lengths, kv_lengths, *, padding=3, hq=4, hkv=2, d=16, block_size=8,
         dtype=jnp.float32, seed=0, rope=False, block_q=None):
    rng = np.random.default_rng(seed)
    k_np, v_np, tables = make_pool(rng, kv_lengths, block_size=block_size, hkv=hkv, d=d)
    total = sum(query_lengths)
    q, q64 = rounded(rng.standard_normal((total + padding, hq, d)), dtype)
    k, k64 = rounded(k_np, dtype)
    v, v64 = rounded(v_np, dtype)
    starts = np.concatenate([[0], np.cumsum(query_lengths)]).astype(np.int32)
    inv_freq = 10000.0 ** -(np.arange(0, d, 2) / d) if rope else None
    out, lse = ragged_paged_attention(
        q, k, v, jnp.asarray(tables), jnp.asarray(starts),
        jnp.asarray(kv_lengths, jnp.int32), backend=backend, block_q=block_q,
        key_rope_inv_freq=None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32))
    want_out, want_lse = oracle(q64, k64, v64, tables, query_lengths, kv_lengths,
                                d ** -0.5, inv_freq)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:2] and lse.dtype == jnp.float32
    assert_attention_close(out, lse, want_out, want_lse, dtype)


# (query rows, keys) per sequence: decodes, a chunk after history, a whole prompt, a
# sequence with no rows, runs that cross tiles and block boundaries.
BATCHES = [
    ([1, 1, 1], [9, 1, 24]),
    ([5, 0, 12, 1], [21, 7, 12, 33]),
    ([17], [40]),
    ([3, 20, 1, 6], [3, 20, 64, 13]),
]
HEADS = [(2, 2), (4, 2), (8, 1), (16, 2)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("batch", range(len(BATCHES)))
def test_ragged_matches_oracle(backend, batch):
    query_lengths, kv_lengths = BATCHES[batch]
    hq, hkv = HEADS[batch % len(HEADS)]
    _run(backend, query_lengths, kv_lengths, hq=hq, hkv=hkv, seed=batch, block_q=8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ragged_rotates_keys_in_the_kernel(backend):
    _run(backend, [4, 1, 9], [10, 30, 9], rope=True, seed=7, block_q=8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ragged_bfloat16(backend):
    _run(backend, [6, 1, 11], [14, 5, 11], dtype=jnp.bfloat16, seed=11, block_q=8)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ragged_with_the_backends_default_tile(backend):
    _run(backend, [2, 30, 1], [50, 30, 8], seed=13)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d,rope", [(64, True), (128, False)], ids=["d64_rope", "d128"])
def test_ragged_wide_heads(backend, d, rope):
    """Model-sized heads, 16-slot pages, 16-row tiles: the kernels' products are real
    `dot`s (every dimension >= 16), not the tiny-tile fallback."""
    _run(backend, [7, 1, 26], [30, 45, 26], hq=8, hkv=2, d=d, block_size=16, rope=rope,
         seed=17, block_q=16)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ragged_single_row(backend):
    """One decode row and no padding: the tile shrinks to the batch."""
    _run(backend, [1], [13], padding=0, seed=19)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_ragged_xla_on_drawn_batches(data):
    """Drawn batches, tiles and heads on the CPU fast path."""
    count = data.draw(st.integers(1, 5))
    kv_lengths = data.draw(st.lists(st.integers(0, 40), min_size=count, max_size=count))
    query_lengths = [data.draw(st.integers(0, n)) for n in kv_lengths]
    if not sum(query_lengths):
        query_lengths[0], kv_lengths[0] = 1, max(kv_lengths[0], 1)
    hkv = data.draw(st.sampled_from([1, 2]))
    _run("xla", query_lengths, kv_lengths, hq=hkv * data.draw(st.sampled_from([1, 2, 4])),
         hkv=hkv, d=8, block_size=data.draw(st.sampled_from([4, 8])),
         padding=data.draw(st.integers(0, 5)), block_q=data.draw(st.sampled_from([1, 4, 16])),
         seed=data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_padding_rows_and_empty_sequences_see_nothing(backend):
    """All padding: every row out 0, lse -inf."""
    _run(backend, [0, 0], [5, 0], padding=6, seed=3)


def test_ragged_xla_rotates_keys_across_chunks():
    """Decodes and a prefill chunk whose keys span several 64-token chunks, rotated: each
    chunk's keys and angles are fetched by the step before."""
    _run("xla", [1, 20, 1, 1], [150, 90, 64, 65], hq=8, hkv=4, d=8, block_size=16,
         rope=True, seed=23, block_q=8)
