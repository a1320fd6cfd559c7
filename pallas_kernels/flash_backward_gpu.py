"""The backward pass of flash attention as Pallas kernels for GPUs (Triton lowering).

Two kernels, as FlashAttention-2 splits the work so that no program adds into another's
output:
  * dK, dV: grid `(key tiles, Hkv)`. A program keeps one `[block_k, D]` tile of keys and
    values and walks every query tile that can see it, for each of the `Hq / Hkv` query
    heads that share the key head (causal: from the tile holding the key's position on),
    accumulating `dV += P^T dO` and `dK += scale * dS^T Q`.
  * dQ: grid `(query tiles, Hq)`. A program keeps one query tile and walks the key tiles
    it can see, accumulating `dQ += scale * dS K`.
Both recompute `P = exp(scale * Q K^T - L)` from the forward's LSE, with
`dS = P * (dO V^T - delta + dL)`; `pallas_kernels.flash_backward` prepares their operands
(rotated, zeroed keys; `delta = rowsum(dO * O)`; L with `-inf` as `+inf`). Tiles and D
must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import tile_matmul
from pallas_kernels.tiling import (pad_to, segment_operands, tile_visibility, triton_tiles,
                                   visible_kv_blocks)


def _probabilities(q, k, shift, *, sm_scale, visible):
    """`[block_q, block_k]` float32 probabilities of a tile, zero where hidden."""
    scores = tile_matmul.dot_nt(q, k) * sm_scale
    return jnp.where(visible, jnp.exp(scores - shift[:, None]), 0.0)


def _score_cotangents(probs, d_out, v, delta, d_lse):
    """`dS = P * (dO V^T - delta + dL)`, `[block_q, block_k]` float32."""
    return probs * (tile_matmul.dot_nt(d_out, v) - delta[:, None] + d_lse[:, None])


def _visibility(q_first, k_first, q_segments, k_segments, *, block_q, block_k, kv_len,
                causal, segments):
    """bool `[block_q, block_k]`; the segment ids `[block_q]`, `[block_k]` are read only
    when `segments`."""
    visible = tile_visibility(q_first, k_first, block_q=block_q, block_k=block_k,
                              kv_len=kv_len, causal=causal)
    if segments:
        visible = visible & (q_segments()[:, None] == k_segments()[None, :])
    return visible


def _key_values_kernel(bounds_ref, q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref,
                       v_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref, *, sm_scale, causal,
                       block_q, block_k, group, num_q_tiles, segments):
    """One key tile of one key head.

    bounds_ref `[2]` int32 (q_offset, kv_length); q_ref, do_ref `[group, T_pad, D]` (the
    query heads sharing this key head); shift_ref, delta_ref, dlse_ref `[group, T_pad]`
    float32; k_ref, v_ref `[block_k, D]`; q_seg_ref `[T_pad]`, kv_seg_ref `[block_k]`
    int32 segment ids (read when `segments`); dk_ref, dv_ref `[block_k, D]` float32.
    """
    q_offset, kv_len = bounds_ref[0], bounds_ref[1]
    k_first = pl.program_id(0) * block_k
    k, v = k_ref[...], v_ref[...]
    first = jax.lax.div(jnp.maximum(k_first - q_offset, 0), block_q) if causal else 0
    last = jnp.where(k_first < kv_len, num_q_tiles, first)

    def head(g, grads):
        def tile(i, grads):
            d_k, d_v = grads
            rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, d_out = q_ref[g, rows, :], do_ref[g, rows, :]
            visible = _visibility(q_offset + i * block_q, k_first, lambda: q_seg_ref[rows],
                                  lambda: kv_seg_ref[...], block_q=block_q, block_k=block_k,
                                  kv_len=kv_len, causal=causal, segments=segments)
            probs = _probabilities(q, k, shift_ref[g, rows], sm_scale=sm_scale,
                                   visible=visible)
            d_scores = _score_cotangents(probs, d_out, v, delta_ref[g, rows],
                                         dlse_ref[g, rows])
            return (d_k + tile_matmul.dot_nn(d_scores.T, q) * sm_scale,
                    d_v + tile_matmul.dot_nn(probs.T, d_out))

        return jax.lax.fori_loop(first, last, tile, grads)

    zeros = jnp.zeros(k.shape, jnp.float32)
    d_k, d_v = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = d_k
    dv_ref[...] = d_v


def _queries_kernel(bounds_ref, q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref, v_ref,
                    q_seg_ref, kv_seg_ref, dq_ref, *, sm_scale, causal, block_q, block_k,
                    num_kv_tiles, segments):
    """One query tile of one query head.

    q_ref, do_ref `[block_q, D]`; shift_ref, delta_ref, dlse_ref `[block_q]` float32;
    k_ref, v_ref `[S_pad, D]` (this head's key head); q_seg_ref `[block_q]`, kv_seg_ref
    `[S_pad]` int32 (read when `segments`); dq_ref `[block_q, D]` float32.
    """
    tile = pl.program_id(0)
    q_offset, kv_len = bounds_ref[0], bounds_ref[1]
    q, d_out = q_ref[...], do_ref[...]
    shift, delta, d_lse = shift_ref[...], delta_ref[...], dlse_ref[...]

    def step(j, d_q):
        keys = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[keys, :]
        visible = _visibility(q_offset + tile * block_q, j * block_k, lambda: q_seg_ref[...],
                              lambda: kv_seg_ref[keys], block_q=block_q, block_k=block_k,
                              kv_len=kv_len, causal=causal, segments=segments)
        probs = _probabilities(q, k, shift, sm_scale=sm_scale, visible=visible)
        d_scores = _score_cotangents(probs, d_out, v_ref[keys, :], delta, d_lse)
        return d_q + tile_matmul.dot_nn(d_scores, k) * sm_scale

    count = jnp.minimum(visible_kv_blocks(tile, block_q=block_q, block_k=block_k,
                                          causal=causal, q_offset=q_offset, kv_len=kv_len),
                        num_kv_tiles)
    dq_ref[...] = jax.lax.fori_loop(0, count, step, jnp.zeros(q.shape, jnp.float32))


def flash_backward_gpu(q, keys, values, d_out, shift, delta, d_lse, bounds, *, causal,
                       sm_scale, segment_ids=None, block_q: int = 64, block_k: int = 64,
                       num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """`(dq [T, Hq, D], dk [S, Hkv, D], dv [S, Hkv, D])` float32.

    q, d_out `[T, Hq, D]`; keys (rotated), values `[S, Hkv, D]` zero where hidden;
    shift (the LSE, `+inf` for a row that saw nothing), delta, d_lse `[T, Hq]` float32;
    bounds int32 `[2]` (q_offset, kv_length clipped to S); segment_ids None or the pair
    `(q_segment_ids [T], kv_segment_ids [S])`. dk is for the keys as given.
    """
    t, hq, d = q.shape
    s, hkv, _ = keys.shape
    group = hq // hkv
    block_q, block_k = triton_tiles(t, s, d, block_q=block_q, block_k=block_k,
                                    kernel="flash backward")
    q_h, do_h = (pad_to(x, block_q).transpose(1, 0, 2) for x in (q, d_out))
    k_h, v_h = (pad_to(x, block_k).transpose(1, 0, 2) for x in (keys, values))
    t_pad, s_pad = q_h.shape[1], k_h.shape[1]
    shift_h = jnp.pad(shift, ((0, t_pad - t), (0, 0)), constant_values=jnp.inf).T
    delta_h, dlse_h = (pad_to(x, block_q).T for x in (delta, d_lse))
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    q_seg, kv_seg = segment_operands(segment_ids, t_pad, s_pad)
    static = dict(sm_scale=sm_scale, causal=causal, block_q=block_q, block_k=block_k,
                  segments=segment_ids is not None)

    d_k, d_v = pl.pallas_call(
        functools.partial(_key_values_kernel, group=group, num_q_tiles=t_pad // block_q,
                          **static),
        grid=(s_pad // block_k, hkv),
        in_specs=[pl.BlockSpec((2,), lambda j, h: (0,))]
        + [pl.BlockSpec((group, t_pad, d), lambda j, h: (h, 0, 0))] * 2
        + [pl.BlockSpec((group, t_pad), lambda j, h: (h, 0))] * 3
        + [pl.BlockSpec((None, block_k, d), lambda j, h: (h, j, 0))] * 2
        + [pl.BlockSpec((t_pad,), lambda j, h: (0,)), pl.BlockSpec((block_k,), lambda j, h: (j,))],
        out_specs=[pl.BlockSpec((None, block_k, d), lambda j, h: (h, j, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((hkv, s_pad, d), jnp.float32)] * 2,
        compiler_params=params, interpret=interpret, name="jattn_flash_backward_kv_gpu",
    )(bounds, q_h, do_h, shift_h, delta_h, dlse_h, k_h, v_h, q_seg, kv_seg)

    d_q = pl.pallas_call(
        functools.partial(_queries_kernel, num_kv_tiles=s_pad // block_k, **static),
        grid=(t_pad // block_q, hq),
        in_specs=[pl.BlockSpec((2,), lambda i, h: (0,))]
        + [pl.BlockSpec((None, block_q, d), lambda i, h: (h, i, 0))] * 2
        + [pl.BlockSpec((None, block_q), lambda i, h: (h, i))] * 3
        + [pl.BlockSpec((None, s_pad, d), lambda i, h: (jax.lax.div(h, group), 0, 0))] * 2
        + [pl.BlockSpec((block_q,), lambda i, h: (i,)), pl.BlockSpec((s_pad,), lambda i, h: (0,))],
        out_specs=pl.BlockSpec((None, block_q, d), lambda i, h: (h, i, 0)),
        out_shape=jax.ShapeDtypeStruct((hq, t_pad, d), jnp.float32),
        compiler_params=params, interpret=interpret, name="jattn_flash_backward_q_gpu",
    )(bounds, q_h, do_h, shift_h, delta_h, dlse_h, k_h, v_h, q_seg, kv_seg)
    return (d_q.transpose(1, 0, 2)[:t], d_k.transpose(1, 0, 2)[:s],
            d_v.transpose(1, 0, 2)[:s])
