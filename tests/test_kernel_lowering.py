"""The Pallas kernels lower for GPU (Triton) and TPU (Mosaic) from this CPU machine.

Lowering runs the whole Pallas-to-Triton / Pallas-to-Mosaic translation; what remains
on the device is the vendor compiler. Real runs on GPU are in BENCHMARKS.md.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.flash_backward_gpu import flash_backward_gpu
from pallas_kernels.flash_backward_tpu import flash_backward_tpu
from pallas_kernels.flash_gpu import flash_attention_gpu
from pallas_kernels.flash_tpu import flash_attention_tpu
from pallas_kernels.paged_gpu import paged_attention_gpu
from pallas_kernels.paged_tpu import paged_attention_tpu
from pallas_kernels.ragged_gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_tpu import ragged_paged_attention_tpu

PLATFORMS = [("cuda", flash_attention_gpu, paged_attention_gpu, "__gpu$xla.gpu.triton"),
             ("tpu", flash_attention_tpu, paged_attention_tpu, "tpu_custom_call")]
RAGGED_PLATFORMS = [("cuda", ragged_paged_attention_gpu, "__gpu$xla.gpu.triton"),
                    ("tpu", ragged_paged_attention_tpu, "tpu_custom_call")]


def _lower(fn, platform, *shapes):
    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,flash,paged,custom_call", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [128, 64, 8])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rotated_keys"])
def test_kernels_lower(platform, flash, paged, custom_call, dtype, head_dim, rope):
    inv_freq = jnp.linspace(1.0, 1e-4, head_dim // 2) if rope else None

    def prefill(q, k, v):
        return flash(q, k, v, causal=True, q_offset=jnp.int32(64), kv_length=jnp.int32(300),
                     sm_scale=0.125, key_rope_inv_freq=inv_freq)

    text = _lower(prefill, platform, ((256, 8, head_dim), dtype), ((320, 2, head_dim), dtype),
                  ((320, 2, head_dim), dtype))
    assert custom_call in text

    def decode(q, k_pages, v_pages, tables, lengths, block_positions=None):
        return paged(q, k_pages, v_pages, tables, lengths, sm_scale=0.125,
                     key_rope_inv_freq=inv_freq, block_positions=block_positions)

    paged_shapes = [((4, 8, head_dim), dtype), ((64, 16, 2, head_dim), dtype),
                    ((64, 16, 2, head_dim), dtype), ((4, 16), jnp.int32), ((4,), jnp.int32)]
    assert custom_call in _lower(decode, platform, *paged_shapes)
    assert custom_call in _lower(decode, platform, *paged_shapes, ((4, 16), jnp.int32))


@pytest.mark.parametrize("platform,ragged,custom_call", RAGGED_PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [128, 64, 8])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rotated_keys"])
def test_ragged_kernels_lower(platform, ragged, custom_call, dtype, head_dim, rope):
    inv_freq = jnp.linspace(1.0, 1e-4, head_dim // 2) if rope else None

    def mixed_batch(q, k_pages, v_pages, tables, query_starts, kv_lengths):
        return ragged(q, k_pages, v_pages, tables, query_starts, kv_lengths, sm_scale=0.125,
                      key_rope_inv_freq=inv_freq)

    pool = ((64, 16, 2, head_dim), dtype)
    tables, query_starts, kv_lengths = ((4, 16), jnp.int32), ((5,), jnp.int32), ((4,), jnp.int32)
    for tokens in (200, 1):
        assert custom_call in _lower(mixed_batch, platform, ((tokens, 8, head_dim), dtype),
                                     pool, pool, tables, query_starts, kv_lengths)


@pytest.mark.parametrize("pages_per_step", [2, 4, 8])
@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rotated_keys"])
def test_paged_gpu_kernel_lowers_with_several_pages_per_step(pages_per_step, rope):
    inv_freq = jnp.linspace(1.0, 1e-4, 64) if rope else None

    def decode(q, k_pages, v_pages, tables, lengths):
        return paged_attention_gpu(q, k_pages, v_pages, tables, lengths, sm_scale=0.125,
                                   key_rope_inv_freq=inv_freq, pages_per_step=pages_per_step)

    pool = ((64, 16, 2, 128), jnp.bfloat16)
    text = _lower(decode, "cuda", ((4, 8, 128), jnp.bfloat16), pool, pool,
                  ((4, 16), jnp.int32), ((4,), jnp.int32))
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("platform,backward,custom_call", [
    ("cuda", flash_backward_gpu, "__gpu$xla.gpu.triton"), ("tpu", flash_backward_tpu,
                                                            "tpu_custom_call")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [128, 64, 8])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_kernels_lower(platform, backward, custom_call, dtype, head_dim, causal):
    def gradients(q, k, v, d_out, shift, delta, d_lse, bounds):
        return backward(q, k, v, d_out, shift, delta, d_lse, bounds, causal=causal,
                        sm_scale=0.125)

    rows, keys = ((256, 8, head_dim), dtype), ((320, 2, head_dim), dtype)
    vector = ((256, 8), jnp.float32)
    text = _lower(gradients, platform, rows, keys, keys, rows, vector, vector, vector,
                  ((2,), jnp.int32))
    assert text.count(custom_call) == 2, text.count(custom_call)  # dK/dV, then dQ


@pytest.mark.parametrize("platform,flash,backward,custom_call", [
    ("cuda", flash_attention_gpu, flash_backward_gpu, "__gpu$xla.gpu.triton"),
    ("tpu", flash_attention_tpu, flash_backward_tpu, "tpu_custom_call")])
@pytest.mark.parametrize("segments", [True, False], ids=["segments", "no_segments"])
@pytest.mark.parametrize("block", [None, 64], ids=["default_tiles", "tiles_64"])
def test_kernels_with_segment_ids_and_small_tiles_lower(platform, flash, backward, custom_call,
                                                        segments, block):
    """Any legal tile lowers, with or without segment ids (a Mosaic block must span the
    whole of an array's last two dimensions or multiples of (8, 128) of them)."""
    tiles = {} if block is None else {"block_q": block, "block_k": block}

    def segment_ids(q_segments, kv_segments):
        return (q_segments, kv_segments) if segments else None

    def forward(q, k, v, q_segments, kv_segments):
        return flash(q, k, v, causal=True, q_offset=jnp.int32(64), kv_length=jnp.int32(300),
                     sm_scale=0.125, segment_ids=segment_ids(q_segments, kv_segments), **tiles)

    rows, keys = ((256, 8, 128), jnp.bfloat16), ((320, 2, 128), jnp.bfloat16)
    id_shapes = [((256,), jnp.int32), ((320,), jnp.int32)]
    assert custom_call in _lower(forward, platform, rows, keys, keys, *id_shapes)

    def gradients(q, k, v, d_out, shift, delta, d_lse, bounds, q_segments, kv_segments):
        return backward(q, k, v, d_out, shift, delta, d_lse, bounds, causal=True,
                        sm_scale=0.125, segment_ids=segment_ids(q_segments, kv_segments), **tiles)

    vector = ((256, 8), jnp.float32)
    text = _lower(gradients, platform, rows, keys, keys, rows, vector, vector, vector,
                  ((2,), jnp.int32), *id_shapes)
    assert text.count(custom_call) == 2
