"""flash_attention on every backend against the float64 numpy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from kernel_cases import KERNEL_BACKENDS, assert_attention_close, rounded
from pallas_kernels import flash_attention
from pallas_kernels.reference import flash_attention_reference
from pallas_kernels.xla_attention import flash_attention_xla

# (T, S, q_offset, kv_length, causal): empty, single token, tile multiples and not,
# chunked prefill (q_offset > 0), keys hidden past kv_length, rows that see nothing.
CASES = [
    (0, 16, 0, None, True),
    (5, 0, 0, None, False),
    (1, 1, 0, None, True),
    (16, 16, 0, None, True),
    (13, 29, 16, None, True),
    (7, 40, 10, 17, True),
    (9, 24, 0, 20, False),
    (6, 12, 0, 0, False),
    (24, 8, 0, None, True),
]
HEADS = [(2, 2), (4, 2), (8, 2), (8, 1), (16, 2)]  # GQA ratios 1, 2, 4, 8 and MQA


def _run(backend, t, s, q_offset, kv_length, causal, hq, hkv, d, dtype, seed, rope=False):
    rng = np.random.default_rng(seed)
    q, q64 = rounded(rng.standard_normal((t, hq, d)), dtype)
    k_np = rng.standard_normal((s, hkv, d))
    v_np = rng.standard_normal((s, hkv, d))
    hidden_from = s if kv_length is None else kv_length
    k_np[hidden_from:] = np.nan
    v_np[hidden_from:] = np.nan
    k, k64 = rounded(k_np, dtype)
    v, v64 = rounded(v_np, dtype)
    inv_freq = 10000.0 ** -(np.arange(0, d, 2) / d) if rope else None
    out, lse = flash_attention(q, k, v, causal=causal, q_offset=q_offset, kv_length=kv_length,
                               backend=backend, block_q=8, block_k=8,
                               key_rope_inv_freq=None if inv_freq is None else
                               jnp.asarray(inv_freq, jnp.float32))
    if rope:
        k64 = attention_oracle.rotate(k64, np.arange(s), inv_freq)
    visible = attention_oracle.prefill_visibility(
        t, s, causal=causal, q_offset=q_offset, kv_length=hidden_from)
    want_out, want_lse = attention_oracle.attention(q64, k64, v64, visible, d ** -0.5)
    assert out.shape == (t, hq, d) and out.dtype == dtype
    assert lse.shape == (t, hq) and lse.dtype == jnp.float32
    assert_attention_close(out, lse, want_out, want_lse, dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_matches_oracle(backend, case):
    hq, hkv = HEADS[CASES.index(case) % len(HEADS)]
    _run(backend, *case, hq, hkv, 16, jnp.float32, seed=CASES.index(case))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("hq,hkv", HEADS)
def test_flash_gqa_ratios(backend, hq, hkv):
    _run(backend, 11, 27, 16, None, True, hq, hkv, 8, jnp.float32, seed=hq * 10 + hkv)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_rotates_position_free_keys(backend, dtype):
    """Keys stored without position, rotated inside the kernel, match rotating first."""
    _run(backend, 14, 37, 23, 33, True, 8, 2, 32, dtype, seed=9, rope=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_flash_bfloat16(backend):
    _run(backend, 19, 45, 26, None, True, 8, 2, 32, jnp.bfloat16, seed=3)


def test_flash_traced_offsets_match_static():
    """q_offset and kv_length may be arrays (chunked prefill under jit)."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((6, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((20, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((20, 2, 16)), jnp.float32)
    static = flash_attention(q, k, v, q_offset=9, kv_length=14, backend="xla")
    traced = flash_attention(q, k, v, q_offset=jnp.int32(9), kv_length=jnp.int32(14),
                             backend="xla")
    np.testing.assert_array_equal(static[0], traced[0])
    np.testing.assert_array_equal(static[1], traced[1])


@settings(max_examples=25, deadline=None)
@given(
    t=st.integers(1, 40), extra=st.integers(0, 70), q_offset=st.integers(0, 30),
    ratio=st.sampled_from([1, 2, 4, 8]), hkv=st.integers(1, 2), causal=st.booleans(),
    hide=st.integers(0, 20), d=st.sampled_from([8, 16, 32]), seed=st.integers(0, 2**16),
)
def test_flash_xla_random(t, extra, q_offset, ratio, hkv, causal, hide, d, seed):
    s = q_offset + t + extra
    _run("xla", t, s, q_offset, max(s - hide, 0), causal, ratio * hkv, hkv, d,
         jnp.float32, seed)


@settings(max_examples=6, deadline=None)
@given(t=st.integers(1, 20), extra=st.integers(0, 20), q_offset=st.integers(0, 20),
       ratio=st.sampled_from([1, 2, 4]), backend=st.sampled_from(["pallas_gpu", "pallas_tpu"]),
       seed=st.integers(0, 2**16))
def test_flash_pallas_random(t, extra, q_offset, ratio, backend, seed):
    s = q_offset + t + extra
    _run(backend, t, s, q_offset, s - extra // 2, True, 2 * ratio, 2, 16, jnp.float32, seed)


def _temp_bytes(fn, length):
    args = [jax.ShapeDtypeStruct((length, heads, 64), jnp.float32) for heads in (8, 2, 2)]
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_flash_xla_memory_does_not_grow_with_t_times_s():
    """From T = S = 1K to 4K the tiled path's scratch grows at most linearly (its
    re-laid-out copies of q, k, v); the dense oracle's grows 16x (it holds every score)."""
    tiled = lambda q, k, v: flash_attention_xla(q, k, v, causal=True, q_offset=0,
                                                kv_length=k.shape[0], sm_scale=0.125)
    dense = lambda q, k, v: flash_attention_reference(q, k, v, causal=True, q_offset=0,
                                                      kv_length=k.shape[0], sm_scale=0.125)
    assert _temp_bytes(tiled, 4096) <= 4 * _temp_bytes(tiled, 1024)
    assert _temp_bytes(dense, 4096) >= 15 * _temp_bytes(dense, 1024)
