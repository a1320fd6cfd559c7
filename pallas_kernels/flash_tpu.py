"""Flash prefill attention as a Pallas kernel for TPUs (Mosaic lowering).

Grid `(Hq, query tiles, key tiles)`, the key axis innermost and sequential: the online
softmax state lives in VMEM scratch across it. `q_offset` and `kv_length` are scalar-
prefetched into SMEM, so the index maps clamp the key tile to the last one the query tile
can see: tiles past the causal diagonal or past `kv_length` repeat the previous block
index, which the pipeline does not fetch again, and their compute is skipped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax, rotary, tile_matmul
from pallas_kernels.tiling import (head_major, mosaic_tiles, prefill_bounds,
                                   segment_operands, tile_visibility, visible_kv_blocks)


def _last_visible_tile(i, bounds_ref, *, block_q, block_k, causal):
    count = visible_kv_blocks(i, block_q=block_q, block_k=block_k, causal=causal,
                              q_offset=bounds_ref[0], kv_len=bounds_ref[1])
    return jnp.maximum(count - 1, 0), count


def _flash_kernel(bounds_ref, inv_freq_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref,
                  out_ref, lse_ref, m_ref, l_ref, acc_ref, *, sm_scale, causal, block_q,
                  block_k, rotate_keys, segments):
    """One (head, query tile, key tile) step.

    bounds_ref SMEM `[2]` int32 (q_offset, kv_length); inv_freq_ref `[1, D/2]` float32
    (used when `rotate_keys`); q_ref `[block_q, D]`; k_ref, v_ref
    `[block_k, D]`; q_seg_ref `[block_q, 1]`, kv_seg_ref `[1, block_k]` int32 segment ids
    (used when `segments`); out_ref `[block_q, D]`; lse_ref `[block_q, 1]`; scratch m_ref, l_ref
    `[block_q, 1]` and acc_ref `[block_q, D]` float32.
    """
    i, j = pl.program_id(1), pl.program_id(2)
    _, count = _last_visible_tile(i, bounds_ref, block_q=block_q, block_k=block_k,
                                  causal=causal)

    @pl.when(j == 0)
    def _init():
        online_softmax.init_scratch(m_ref, l_ref, acc_ref)

    @pl.when(j < count)
    def _step():
        q_offset, kv_len = bounds_ref[0], bounds_ref[1]
        visible = tile_visibility(q_offset + i * block_q, j * block_k, block_q=block_q,
                                  block_k=block_k, kv_len=kv_len, causal=causal)
        if segments:
            visible = visible & (q_seg_ref[...] == kv_seg_ref[...])
        in_range = (j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0)) < kv_len
        v = jnp.where(in_range, v_ref[...], jnp.zeros_like(v_ref[...]))
        if rotate_keys:
            half = q_ref.shape[-1] // 2
            raw = rotary.rotated_key_scores(
                q_ref[:, :half], q_ref[:, half:], k_ref[:, :half], k_ref[:, half:],
                j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0),
                inv_freq_ref[...], tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q_ref[...], k_ref[...])
        scores = jnp.where(visible, raw * sm_scale, -jnp.inf)
        online_softmax.update_scratch(m_ref, l_ref, acc_ref, scores, v, tile_matmul.dot_nn)

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        online_softmax.finish_scratch(m_ref, l_ref, acc_ref, out_ref, lse_ref)


def flash_attention_tpu(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                        key_rope_inv_freq=None, segment_ids=None, block_q: int = 128,
                        block_k: int = 128, interpret: bool = False):
    """Prefill attention; arguments and results as `pallas_kernels.flash_attention`.

    q `[T, Hq, D]`, k/v `[S, Hkv, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32.
    Tiles must be multiples of 8 rows; 128 is the natural size for the MXU. With
    `key_rope_inv_freq [D/2]`, key s is rotated to position s inside the kernel;
    `segment_ids` is None or the checked pair `(q_segment_ids [T], kv_segment_ids [S])`.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    block_q, block_k = mosaic_tiles(t, s, block_q=block_q, block_k=block_k,
                                    kernel="flash kernel")
    q_h, k_h, v_h = head_major(q, k, v, block_q=block_q, block_k=block_k)
    t_pad, s_pad = q_h.shape[1], k_h.shape[1]
    bounds = prefill_bounds(q_offset, kv_length, s)
    last = functools.partial(_last_visible_tile, block_q=block_q, block_k=block_k,
                             causal=causal)

    def kv_index(h, i, j, bounds_ref):
        return (jax.lax.div(h, group), jnp.minimum(j, last(i, bounds_ref)[0]), 0)

    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    inv_freq = inv_freq.reshape(1, d // 2)
    q_seg, kv_seg = segment_operands(segment_ids, t_pad, s_pad)
    kernel = functools.partial(_flash_kernel, sm_scale=sm_scale, causal=causal,
                               block_q=block_q, block_k=block_k, rotate_keys=rotate_keys,
                               segments=segment_ids is not None)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hq, t_pad // block_q, s_pad // block_k),
            in_specs=[
                pl.BlockSpec((1, d // 2), lambda h, i, j, b: (0, 0)),
                pl.BlockSpec((None, block_q, d), lambda h, i, j, b: (h, i, 0)),
                pl.BlockSpec((None, block_k, d), kv_index),
                pl.BlockSpec((None, block_k, d), kv_index),
                pl.BlockSpec((block_q, 1), lambda h, i, j, b: (i, 0)),
                pl.BlockSpec((None, 1, block_k),  # (a block of the whole last two dims:
                             lambda h, i, j, b: (kv_index(h, i, j, b)[1], 0, 0)),  # any tile)
            ],
            out_specs=[
                pl.BlockSpec((None, block_q, d), lambda h, i, j, b: (h, i, 0)),
                pl.BlockSpec((None, block_q, 1), lambda h, i, j, b: (h, i, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, 1), jnp.float32),
                pltpu.VMEM((block_q, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((hq, t_pad, d), q.dtype),
            jax.ShapeDtypeStruct((hq, t_pad, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jattn_flash_tpu",
    )(bounds, inv_freq, q_h, k_h, v_h, q_seg[:, None], kv_seg.reshape(-1, 1, block_k))
    return out.transpose(1, 0, 2)[:t], lse[..., 0].T[:t]
