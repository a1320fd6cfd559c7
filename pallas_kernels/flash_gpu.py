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

from pallas_kernels import online_softmax, rotary, tile_matmul
from pallas_kernels.tiling import (head_major, prefill_bounds, segment_operands,
                                   tile_visibility, triton_tiles, visible_kv_blocks)


def _flash_kernel(bounds_ref, inv_freq_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref,
                  out_ref, lse_ref, *, sm_scale, causal, block_q, block_k, num_kv_tiles,
                  rotate_keys, segments):
    """One query tile of one head.

    bounds_ref `[2]` int32 (q_offset, kv_length); inv_freq_ref `[D/2]` float32 (used when
    `rotate_keys`); q_ref `[block_q, D]`; k_ref, v_ref `[S_pad, D]` (this head's keys);
    q_seg_ref `[block_q]`, kv_seg_ref `[S_pad]` int32 segment ids (used when `segments`);
    out_ref `[block_q, D]`; lse_ref `[block_q]`.
    """
    tile = pl.program_id(0)
    q_offset, kv_len = bounds_ref[0], bounds_ref[1]
    d = q_ref.shape[-1]
    half = d // 2
    q = q_ref[...]
    if rotate_keys:
        q1, q2 = q_ref[:, pl.ds(0, half)], q_ref[:, pl.ds(half, half)]
        inv_freq = inv_freq_ref[...][None, :]

    def body(j, state):
        start = pl.multiple_of(j * block_k, block_k)
        v = v_ref[pl.ds(start, block_k), :]
        visible = tile_visibility(q_offset + tile * block_q, start, block_q=block_q,
                                  block_k=block_k, kv_len=kv_len, causal=causal)
        if segments:
            visible = visible & (q_seg_ref[...][:, None]
                                 == kv_seg_ref[pl.ds(start, block_k)][None, :])
        in_range = (start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)) < kv_len
        v = jnp.where(in_range, v, jnp.zeros_like(v))
        if rotate_keys:
            raw = rotary.rotated_key_scores(
                q1, q2, k_ref[pl.ds(start, block_k), pl.ds(0, half)],
                k_ref[pl.ds(start, block_k), pl.ds(half, half)],
                start + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0), inv_freq,
                tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q, k_ref[pl.ds(start, block_k), :])
        scores = jnp.where(visible, raw * sm_scale, -jnp.inf)
        return online_softmax.update(*state, scores, v, tile_matmul.dot_nn)

    count = jnp.minimum(
        visible_kv_blocks(tile, block_q=block_q, block_k=block_k, causal=causal,
                          q_offset=q_offset, kv_len=kv_len),
        num_kv_tiles)
    state = online_softmax.initial_state((block_q,), d)
    out, lse = online_softmax.finish(*jax.lax.fori_loop(0, count, body, state))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse[:, 0]


def flash_attention_gpu(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                        key_rope_inv_freq=None, segment_ids=None, block_q: int = 64,
                        block_k: int = 64,
                        num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Prefill attention; arguments and results as `pallas_kernels.flash_attention`.

    q `[T, Hq, D]`, k/v `[S, Hkv, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32.
    With `key_rope_inv_freq [D/2]`, key s is rotated to position s inside the kernel;
    `segment_ids` is None or the checked pair `(q_segment_ids [T], kv_segment_ids [S])`.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    block_q, block_k = triton_tiles(t, s, d, block_q=block_q, block_k=block_k,
                                    kernel="flash kernel")
    q_h, k_h, v_h = head_major(q, k, v, block_q=block_q, block_k=block_k)
    t_pad, s_pad = q_h.shape[1], k_h.shape[1]
    bounds = prefill_bounds(q_offset, kv_length, s)
    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    q_seg, kv_seg = segment_operands(segment_ids, t_pad, s_pad)
    kernel = functools.partial(
        _flash_kernel, sm_scale=sm_scale, causal=causal, block_q=block_q,
        block_k=block_k, num_kv_tiles=s_pad // block_k, rotate_keys=rotate_keys,
        segments=segment_ids is not None)
    out, lse = pl.pallas_call(
        kernel,
        grid=(t_pad // block_q, hq),
        in_specs=[
            pl.BlockSpec((2,), lambda i, h: (0,)),
            pl.BlockSpec((d // 2,), lambda i, h: (0,)),
            pl.BlockSpec((None, block_q, d), lambda i, h: (h, i, 0)),
            pl.BlockSpec((None, s_pad, d), lambda i, h: (jax.lax.div(h, group), 0, 0)),
            pl.BlockSpec((None, s_pad, d), lambda i, h: (jax.lax.div(h, group), 0, 0)),
            pl.BlockSpec((block_q,), lambda i, h: (i,)),
            pl.BlockSpec((s_pad,), lambda i, h: (0,)),
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
    )(bounds, inv_freq, q_h, k_h, v_h, q_seg, kv_seg)
    return out.transpose(1, 0, 2)[:t], lse.T[:t]
