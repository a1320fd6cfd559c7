"""merge_attention: attention over random partitions of a KV cache merges to the whole."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from pallas_kernels import flash_attention, merge_attention


@settings(max_examples=40, deadline=None)
@given(parts=st.integers(1, 8), s=st.integers(0, 60), t=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_merge_of_random_partition_equals_whole(parts, s, t, seed):
    """Keys are dealt at random to `parts` parts (some may be empty); merged partials
    equal attention over all keys."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((t, 4, 16))
    k = rng.standard_normal((s, 2, 16))
    v = rng.standard_normal((s, 2, 16))
    owner = rng.integers(0, parts, size=s)
    outs, lses = [], []
    for part in range(parts):
        keys = owner == part
        visible = np.broadcast_to(keys, (t, s))
        out, lse = attention_oracle.attention(q, k, v, visible, 0.25)
        outs.append(out)
        lses.append(lse)
    merged_out, merged_lse = merge_attention(jnp.asarray(np.stack(outs), jnp.float32),
                                             jnp.asarray(np.stack(lses), jnp.float32))
    want_out, want_lse = attention_oracle.attention(q, k, v, np.ones((t, s), bool), 0.25)
    assert not np.isnan(merged_out).any() and not np.isnan(merged_lse).any()
    np.testing.assert_allclose(merged_out, want_out, atol=1e-5)
    np.testing.assert_array_equal(np.isneginf(merged_lse), np.isneginf(want_lse))
    seen = ~np.isneginf(want_lse)
    np.testing.assert_allclose(np.asarray(merged_lse)[seen], want_lse[seen], atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu"])
def test_merge_of_kernel_chunks_equals_whole(backend):
    """Causal prefill split into contiguous key chunks, each run by the kernel with
    its own kv_length window, merges to the unsplit kernel result."""
    rng = np.random.default_rng(0)
    t, s = 12, 50
    q = jnp.asarray(rng.standard_normal((t, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((s, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((s, 2, 16)), jnp.float32)
    bounds = [0, 7, 7, 30, s]  # one empty chunk
    outs, lses = [], []
    for start, end in zip(bounds, bounds[1:]):
        out, lse = flash_attention(q, k[start:end], v[start:end], q_offset=s - t - start,
                                   backend=backend, block_q=8, block_k=8)
        outs.append(out)
        lses.append(lse)
    merged = merge_attention(jnp.stack(outs), jnp.stack(lses))
    whole = flash_attention(q, k, v, q_offset=s - t, backend=backend, block_q=8, block_k=8)
    np.testing.assert_allclose(merged[0], whole[0], atol=1e-5)
    np.testing.assert_allclose(merged[1], whole[1], atol=1e-5)


def test_merge_all_empty_is_zero_and_neg_inf_even_with_nan_outputs():
    outs = jnp.full((3, 2, 5, 4), jnp.nan)
    lses = jnp.full((3, 2, 5), -jnp.inf)
    out, lse = merge_attention(outs, lses)
    np.testing.assert_array_equal(out, 0.0)
    assert np.isneginf(np.asarray(lse)).all()


def test_merge_keeps_dtype_and_shapes():
    outs = jnp.ones((2, 3, 4, 8), jnp.bfloat16)
    lses = jnp.zeros((2, 3, 4), jnp.float32)
    out, lse = merge_attention(outs, lses)
    assert out.shape == (3, 4, 8) and out.dtype == jnp.bfloat16
    assert lse.shape == (3, 4) and lse.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(lse), np.log(2.0), rtol=1e-6)
