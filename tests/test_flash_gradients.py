"""Gradients of flash_attention (out and LSE) in q, k and v on every backend (the Pallas
backends' backward kernels interpreted), against the float64 closed form of the
softmax's derivative: hypothesis-drawn shapes (GQA
ratios, causal and not, offsets, keys hidden past kv_length holding NaN, rows that see
no key, RoPE applied inside)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from pallas_kernels import flash_attention


def check_gradients(backend, t, s, q_offset, hide, causal, hq, hkv, d, rope, seed):
    rng = np.random.default_rng(seed)
    kv_length = s - hide
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    k = rng.standard_normal((s, hkv, d)).astype(np.float32)
    v = rng.standard_normal((s, hkv, d)).astype(np.float32)
    k[kv_length:] = np.nan  # hidden keys may hold anything
    v[kv_length:] = np.nan
    d_out = rng.standard_normal((t, hq, d)).astype(np.float32)
    d_lse = rng.standard_normal((t, hq)).astype(np.float32)
    inv_freq = (10000.0 ** -(np.arange(0, d, 2) / d)).astype(np.float32) if rope else None

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=causal, q_offset=q_offset, kv_length=kv_length,
                               backend=backend, block_q=8, block_k=8,
                               key_rope_inv_freq=None if inv_freq is None else
                               jnp.asarray(inv_freq))

    (out, lse), vjp = jax.vjp(attend, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    got = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    keys = attention_oracle.rotate(k, np.arange(s), inv_freq) if rope else k
    visible = attention_oracle.prefill_visibility(t, s, causal=causal, q_offset=q_offset,
                                                  kv_length=kv_length)
    want = attention_oracle.attention_vjp(q, keys, v, visible, d ** -0.5, d_out, d_lse)
    if rope:  # the keys' cotangent, rotated back to where they were stored
        want = (want[0], attention_oracle.rotate(want[1], -np.arange(s), inv_freq), want[2])
    for name, g, w in zip("qkv", got, want):
        assert np.all(np.isfinite(np.asarray(g))), name
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4, err_msg=name)


SHAPES = dict(t=st.integers(1, 12), s=st.integers(1, 24), q_offset=st.integers(0, 12),
              hide=st.integers(0, 4), causal=st.booleans(),
              heads=st.sampled_from([(2, 2), (4, 2), (8, 2), (4, 1)]),
              d=st.sampled_from([8, 16]), rope=st.booleans(), seed=st.integers(0, 2**16))


@settings(max_examples=10, deadline=None)
@given(**SHAPES)
def test_xla_gradients_equal_the_float64_closed_form(t, s, q_offset, hide, causal, heads, d,
                                                      rope, seed):
    check_gradients("xla", t, s, q_offset, min(hide, s), causal, *heads, d, rope, seed)


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu", "reference"])
@settings(max_examples=3, deadline=None)
@given(**SHAPES)
def test_kernel_gradients_equal_the_float64_closed_form(backend, t, s, q_offset, hide, causal,
                                                         heads, d, rope, seed):
    check_gradients(backend, t, s, q_offset, min(hide, s), causal, *heads, d, rope, seed)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("block_q, block_k", [(8, 16), (16, 8)])
def test_gradients_with_query_and_key_tiles_of_different_sizes(backend, block_q, block_k):
    """Tile-range arithmetic that mixes the two tile sizes: a chunk 21 tokens in,
    causal, keys hidden past kv_length holding NaN."""
    rng = np.random.default_rng(block_q)
    t, s, q_offset, kv_length, hq, hkv, d = 27, 45, 18, 41, 4, 2, 8
    q = rng.standard_normal((t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((s, hkv, d)).astype(np.float32) for _ in range(2))
    k[kv_length:] = np.nan
    v[kv_length:] = np.nan
    d_out = rng.standard_normal((t, hq, d)).astype(np.float32)
    d_lse = rng.standard_normal((t, hq)).astype(np.float32)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=True, q_offset=q_offset, kv_length=kv_length,
                               backend=backend, block_q=block_q, block_k=block_k)

    _, vjp = jax.vjp(attend, *(jnp.asarray(x) for x in (q, k, v)))
    visible = attention_oracle.prefill_visibility(t, s, causal=True, q_offset=q_offset,
                                                  kv_length=kv_length)
    want = attention_oracle.attention_vjp(q, k, v, visible, d ** -0.5, d_out, d_lse)
    for name, got, expected in zip("qkv", vjp((jnp.asarray(d_out), jnp.asarray(d_lse))), want):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=2e-4,
                                   err_msg=name)


def test_gradients_flow_through_merged_partials():
    """Attention over a split KV cache merged by LSE differentiates like attention over
    the whole (the LSE's cotangent carries the merge's share)."""
    from pallas_kernels import merge_attention

    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((6, 4, 16), (20, 2, 16), (20, 2, 16)))

    def whole(q, k, v):
        return jnp.sum(flash_attention(q, k, v, causal=False, backend="xla")[0] ** 2)

    def split(q, k, v):
        halves = [flash_attention(q, k[a:b], v[a:b], causal=False, backend="xla")
                  for a, b in ((0, 9), (9, 20))]
        out, _ = merge_attention(jnp.stack([o for o, _ in halves]),
                                 jnp.stack([lse for _, lse in halves]))
        return jnp.sum(out ** 2)

    for got, want in zip(jax.grad(split, (0, 1, 2))(q, k, v), jax.grad(whole, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu", "pallas_tpu"])
@settings(max_examples=2, deadline=None)
@given(batch=st.integers(1, 3),
       t=st.integers(1, 10), s=st.integers(1, 16), causal=st.booleans(),
       heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), seed=st.integers(0, 2**16))
def test_batched_layout_and_its_gradients_equal_the_float64_closed_form(
        backend, batch, t, s, causal, heads, seed):
    """`[B, T, H, D]` with per-sequence offsets and lengths (a padded batch: NaN past each
    length), forward and backward, sequence by sequence against the oracle; `jax.vmap`
    over the unbatched form gives the same."""
    hq, hkv = heads
    d = 8
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, 6, batch)
    lengths = rng.integers(0, s + 1, batch)
    q = rng.standard_normal((batch, t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, s, hkv, d)).astype(np.float32) for _ in range(2))
    for row, length in enumerate(lengths):
        k[row, length:] = np.nan
        v[row, length:] = np.nan
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_lse = rng.standard_normal(q.shape[:-1]).astype(np.float32)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=causal, q_offset=jnp.asarray(offsets),
                               kv_length=jnp.asarray(lengths), backend=backend, block_q=8,
                               block_k=8)

    (out, lse), vjp = jax.vjp(attend, *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    for row in range(batch):
        visible = attention_oracle.prefill_visibility(t, s, causal=causal,
                                                      q_offset=offsets[row],
                                                      kv_length=lengths[row])
        want_out, want_lse = attention_oracle.attention(q[row], k[row], v[row], visible,
                                                        d ** -0.5)
        np.testing.assert_allclose(np.asarray(out[row]), want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse[row])), np.isneginf(want_lse))
        want = attention_oracle.attention_vjp(q[row], k[row], v[row], visible, d ** -0.5,
                                              d_out[row], d_lse[row])
        for name, got, expected in zip("qkv", grads, want):
            assert np.all(np.isfinite(np.asarray(got[row]))), name
            np.testing.assert_allclose(np.asarray(got[row]), expected, rtol=2e-4, atol=2e-4,
                                       err_msg=name)
    def mapped(q, k, v):
        return jax.vmap(lambda q, k, v, o, n: flash_attention(
            q, k, v, causal=causal, q_offset=o, kv_length=n, backend=backend, block_q=8,
            block_k=8))(q, k, v, offsets, lengths)

    (mapped_out, mapped_lse), mapped_vjp = jax.vjp(mapped, *(jnp.asarray(x) for x in (q, k, v)))
    np.testing.assert_allclose(np.asarray(mapped_out), np.asarray(out), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mapped_lse), np.asarray(lse))
    for got, want in zip(mapped_vjp((jnp.asarray(d_out), jnp.asarray(d_lse))), grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu", "pallas_tpu", "reference"])
@settings(max_examples=3, deadline=None)
@given(t=st.integers(1, 20), chunk=st.integers(0, 8), documents=st.integers(1, 4),
       sorted_ids=st.booleans(), hide=st.integers(0, 6), rope=st.booleans(),
       causal=st.booleans(), heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
       seed=st.integers(0, 2**16))
def test_segment_ids_of_a_packed_batch(backend, t, chunk, documents, sorted_ids, hide, rope,
                                       causal, heads, seed):
    """Documents packed into rows: a query sees only keys of its own segment. Two rows of
    `[T]` tokens with their own segment ids (one array for queries and keys), and a
    chunk of the last `chunk` tokens against all of them (the pair of ids); keys past
    `kv_length` hold NaN (so some rows see no key), RoPE inside or not, ids sorted or
    scattered; forward and gradients against the oracle with the segment mask."""
    hq, hkv = heads
    d = 8
    rng = np.random.default_rng(seed)
    segments = rng.integers(0, documents, (2, t)).astype(np.int32)
    if sorted_ids:
        segments = np.sort(segments, axis=1)
    kv_length = t - min(hide, t)
    q = rng.standard_normal((2, t, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((2, t, hkv, d)).astype(np.float32) for _ in range(2))
    k[:, kv_length:] = np.nan
    v[:, kv_length:] = np.nan
    inv_freq = (10000.0 ** -(np.arange(0, d, 2) / d)).astype(np.float32) if rope else None
    inside = dict(kv_length=kv_length, backend=backend, block_q=8, block_k=8,
                  key_rope_inv_freq=None if inv_freq is None else jnp.asarray(inv_freq))
    d_out = rng.standard_normal(q.shape).astype(np.float32)
    d_lse = rng.standard_normal(q.shape[:-1]).astype(np.float32)
    first = t - min(chunk, t) if chunk else 0

    def attend(q, k, v):
        if chunk:
            return flash_attention(q[:, first:], k, v, causal=causal, q_offset=first,
                                   segment_ids=(segments[:, first:], segments), **inside)
        return flash_attention(q, k, v, causal=causal, segment_ids=segments, **inside)

    (out, lse), vjp = jax.vjp(attend, *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp((jnp.asarray(d_out[:, first:]), jnp.asarray(d_lse[:, first:])))
    for row in range(2):
        visible = attention_oracle.prefill_visibility(t - first, t, causal=causal,
                                                      q_offset=first, kv_length=kv_length)
        visible = visible & (segments[row, first:, None] == segments[row, None, :])
        keys = attention_oracle.rotate(k[row], np.arange(t), inv_freq) if rope else k[row]
        want_out, want_lse = attention_oracle.attention(q[row, first:], keys, v[row],
                                                        visible, d ** -0.5)
        np.testing.assert_allclose(np.asarray(out[row]), want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse[row])), np.isneginf(want_lse))
        want = attention_oracle.attention_vjp(q[row, first:], keys, v[row], visible,
                                              d ** -0.5, d_out[row, first:],
                                              d_lse[row, first:])
        if rope:  # the keys' cotangent, rotated back to where they were stored
            want = (want[0], attention_oracle.rotate(want[1], -np.arange(t), inv_freq),
                    want[2])
        got = (grads[0][row, first:], grads[1][row], grads[2][row])
        for name, g, w in zip("qkv", got, want):
            assert np.all(np.isfinite(np.asarray(g))), name
            np.testing.assert_allclose(np.asarray(g), w, rtol=2e-4, atol=2e-4, err_msg=name)
