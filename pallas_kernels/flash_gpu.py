"""Flash prefill attention as a Pallas kernel for GPUs (Triton lowering).

Grid `(query tiles, Hq)`. Each program keeps one `[block_q, D]` query tile and walks the
key tiles it can see (causal tiles past the diagonal and tiles past `kv_length` are not
visited) with an online softmax, so the `[T, S]` score matrix never exists. Query head h
reads key/value head `h // (Hq // Hkv)` (GQA/MQA). Triton wants power-of-two tiles:
`block_q`, `block_k` and `D` must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tile_matmul, online_softmax
from pallas_kernels.tiling import visible_kv_blocks


def _flash_kernel(bounds_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, *,
                  sm_scale, causal, block_q, block_k, num_kv_tiles):
    """One query tile of one head.

    bounds_ref `[2]` int32 (q_offset, kv_length); q_ref `[block_q, D]`; k_ref, v_ref
    `[S_pad, D]` (this head's keys); out_ref `[block_q, D]`; lse_ref `[block_q]`.
    """
    tile = pl.program_id(0)
    q_offset, kv_len = bounds_ref[0], bounds_ref[1]
    q = q_ref[...]
    q_pos = q_offset + tile * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, state):
        start = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        visible = k_pos < kv_len
        if causal:
            visible = visible & (k_pos <= q_pos)
        in_range = (start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)) < kv_len
        v = jnp.where(in_range, v, jnp.zeros_like(v))
        scores = jnp.where(visible, tile_matmul.dot_nt(q, k) * sm_scale, -jnp.inf)
        return online_softmax.update(*state, scores, v, tile_matmul.dot_nn)

    count = jnp.minimum(
        visible_kv_blocks(tile, block_q=block_q, block_k=block_k, causal=causal,
                          q_offset=q_offset, kv_len=kv_len),
        num_kv_tiles)
    state = online_softmax.initial_state((block_q,), q.shape[-1])
    out, lse = online_softmax.finish(*jax.lax.fori_loop(0, count, body, state))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse[:, 0]


def flash_attention_gpu(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                        block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                        num_stages: int = 2, interpret: bool = False):
    """Prefill attention; arguments and results as `pallas_kernels.flash_attention`.

    q `[T, Hq, D]`, k/v `[S, Hkv, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    block_q = min(block_q, max(16, pl.next_power_of_2(t)))
    block_k = min(block_k, max(16, pl.next_power_of_2(s)))
    for name, size in (("block_q", block_q), ("block_k", block_k), ("head_dim", d)):
        if size & (size - 1):
            raise ValueError(f"the GPU flash kernel needs a power-of-two {name}, got {size}")
    t_pad = pl.cdiv(t, block_q) * block_q
    s_pad = pl.cdiv(s, block_k) * block_k
    q_h = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0))).transpose(1, 0, 2)
    k_h = jnp.pad(k, ((0, s_pad - s), (0, 0), (0, 0))).transpose(1, 0, 2)
    v_h = jnp.pad(v, ((0, s_pad - s), (0, 0), (0, 0))).transpose(1, 0, 2)
    bounds = jnp.stack([jnp.asarray(q_offset, jnp.int32),
                        jnp.clip(jnp.asarray(kv_length, jnp.int32), 0, s)])
    kernel = functools.partial(
        _flash_kernel, sm_scale=sm_scale, causal=causal, block_q=block_q,
        block_k=block_k, num_kv_tiles=s_pad // block_k)
    out, lse = pl.pallas_call(
        kernel,
        grid=(t_pad // block_q, hq),
        in_specs=[
            pl.BlockSpec((2,), lambda i, h: (0,)),
            pl.BlockSpec((None, block_q, d), lambda i, h: (h, i, 0)),
            pl.BlockSpec((None, s_pad, d), lambda i, h: (jax.lax.div(h, group), 0, 0)),
            pl.BlockSpec((None, s_pad, d), lambda i, h: (jax.lax.div(h, group), 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, d), lambda i, h: (h, i, 0)),
            pl.BlockSpec((None, block_q), lambda i, h: (h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((hq, t_pad, d), q.dtype),
            jax.ShapeDtypeStruct((hq, t_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jattn_flash_gpu",
    )(bounds, q_h, k_h, v_h)
    return out.transpose(1, 0, 2)[:t], lse.T[:t]
