"""The backward pass of flash attention as Pallas kernels for TPUs (Mosaic lowering).

The same two kernels as `flash_backward_gpu`, written the TPU way: the loop is the
innermost, sequential grid axis and the accumulator lives in VMEM scratch across it.
  * dK, dV: grid `(Hkv, key tiles, Hq / Hkv * query tiles)`; the inner axis walks every
    (query head of the group, query tile) pair.
  * dQ: grid `(Hq, query tiles, key tiles)`.
`q_offset` and `kv_length` are scalar-prefetched into SMEM; index maps clamp the walked
tile to a visible one, so the steps that see nothing (before the causal diagonal, past
`kv_length`) fetch no new block and skip their compute. Tiles must be multiples of 8.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tile_matmul
from pallas_kernels.tiling import (mosaic_tiles, pad_to, segment_operands, tile_visibility,
                                   visible_kv_blocks)


def _first_query_tile(j, bounds_ref, *, block_q, block_k, causal):
    """The first query tile that sees key tile j (causal), else 0."""
    if not causal:
        return 0
    return jax.lax.div(jnp.maximum(j * block_k - bounds_ref[0], 0), block_q)


def _tile_gradients(inputs, bounds_ref, i, j, *, sm_scale, causal, segments):
    """`(P, dS)` float32 `[block_q, block_k]` of query tile i against key tile j.

    `inputs` are both kernels' input refs in order: q, dO `[block_q, D]`; shift, delta,
    dL `[block_q, 1]`; k, v `[block_k, D]`; the segment ids `[block_q, 1]` and
    `[1, block_k]` (read when `segments`)."""
    q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref = inputs
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    visible = tile_visibility(bounds_ref[0] + i * block_q, j * block_k, block_q=block_q,
                              block_k=block_k, kv_len=bounds_ref[1], causal=causal)
    if segments:
        visible = visible & (q_seg_ref[...] == kv_seg_ref[...])
    scores = tile_matmul.dot_nt(q_ref[...], k_ref[...]) * sm_scale
    probs = jnp.where(visible, jnp.exp(scores - shift_ref[...]), 0.0)
    return probs, probs * (tile_matmul.dot_nt(do_ref[...], v_ref[...]) - delta_ref[...]
                           + dlse_ref[...])


def _key_values_kernel(bounds_ref, q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref,
                       v_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref, dk_acc, dv_acc, *,
                       sm_scale, causal, block_q, block_k, num_q_tiles, segments):
    """One (key head, key tile, (query head of the group, query tile)) step.

    q_ref, do_ref `[block_q, D]`; shift_ref, delta_ref, dlse_ref `[block_q, 1]` float32;
    k_ref, v_ref `[block_k, D]`; q_seg_ref `[block_q, 1]`, kv_seg_ref `[1, block_k]` int32
    (read when `segments`); dk_ref, dv_ref `[block_k, D]` float32; scratch dk_acc,
    dv_acc `[block_k, D]` float32.
    """
    j, n = pl.program_id(1), pl.program_id(2)
    i = jax.lax.rem(n, num_q_tiles)  # truncating: n >= 0, and it lowers everywhere
    first = _first_query_tile(j, bounds_ref, block_q=block_q, block_k=block_k, causal=causal)

    @pl.when(n == 0)
    def _init():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    @pl.when((i >= first) & (j * block_k < bounds_ref[1]))
    def _step():
        probs, d_scores = _tile_gradients(
            (q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref, v_ref, q_seg_ref,
             kv_seg_ref), bounds_ref, i, j, sm_scale=sm_scale, causal=causal,
            segments=segments)
        dv_acc[...] += tile_matmul.dot_nn(probs.T, do_ref[...])
        dk_acc[...] += tile_matmul.dot_nn(d_scores.T, q_ref[...]) * sm_scale

    @pl.when(n == pl.num_programs(2) - 1)
    def _finish():
        dk_ref[...] = dk_acc[...]
        dv_ref[...] = dv_acc[...]


def _queries_kernel(bounds_ref, q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref, v_ref,
                    q_seg_ref, kv_seg_ref, dq_ref, dq_acc, *, sm_scale, causal, block_q,
                    block_k, segments):
    """One (query head, query tile, key tile) step; refs as in `_key_values_kernel`, with
    dq_ref and scratch dq_acc `[block_q, D]` float32."""
    i, j = pl.program_id(1), pl.program_id(2)
    count = visible_kv_blocks(i, block_q=block_q, block_k=block_k, causal=causal,
                              q_offset=bounds_ref[0], kv_len=bounds_ref[1])

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros_like(dq_acc)

    @pl.when(j < count)
    def _step():
        _, d_scores = _tile_gradients(
            (q_ref, do_ref, shift_ref, delta_ref, dlse_ref, k_ref, v_ref, q_seg_ref,
             kv_seg_ref), bounds_ref, i, j, sm_scale=sm_scale, causal=causal,
            segments=segments)
        dq_acc[...] += tile_matmul.dot_nn(d_scores, k_ref[...]) * sm_scale

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        dq_ref[...] = dq_acc[...]


def flash_backward_tpu(q, keys, values, d_out, shift, delta, d_lse, bounds, *, causal,
                       sm_scale, segment_ids=None, block_q: int = 128, block_k: int = 128,
                       interpret: bool = False):
    """`(dq [T, Hq, D], dk [S, Hkv, D], dv [S, Hkv, D])` float32; arguments as
    `flash_backward_gpu` takes them."""
    t, hq, d = q.shape
    s, hkv, _ = keys.shape
    group = hq // hkv
    block_q, block_k = mosaic_tiles(t, s, block_q=block_q, block_k=block_k,
                                    kernel="flash backward")
    q_h, do_h = (pad_to(x, block_q).transpose(1, 0, 2) for x in (q, d_out))
    k_h, v_h = (pad_to(x, block_k).transpose(1, 0, 2) for x in (keys, values))
    t_pad, s_pad = q_h.shape[1], k_h.shape[1]
    num_q_tiles, num_kv_tiles = t_pad // block_q, s_pad // block_k
    shift_h = jnp.pad(shift, ((0, t_pad - t), (0, 0)), constant_values=jnp.inf).T[..., None]
    delta_h, dlse_h = (pad_to(x, block_q).T[..., None] for x in (delta, d_lse))
    q_seg, kv_seg = segment_operands(segment_ids, t_pad, s_pad)
    # Key ids one row of block_k per tile: a block of the whole last two dims, legal for
    # any tile (a [1, block_k] block of a [1, S_pad] row would need block_k % 128 == 0).
    q_seg, kv_seg = q_seg[:, None], kv_seg.reshape(num_kv_tiles, 1, block_k)
    static = dict(sm_scale=sm_scale, causal=causal, block_q=block_q, block_k=block_k,
                  segments=segment_ids is not None)
    first = functools.partial(_first_query_tile, block_q=block_q, block_k=block_k,
                              causal=causal)
    interpret = pltpu.InterpretParams() if interpret else False

    def query_rows(h, j, n, bounds_ref):
        """The (query head, tile) step n reads: clamped to the first tile that sees key
        tile j; one fixed block throughout when no query sees it (past `kv_length`)."""
        live = j * block_k < bounds_ref[1]
        i = jnp.minimum(jnp.maximum(jax.lax.rem(n, num_q_tiles), first(j, bounds_ref)),
                        num_q_tiles - 1)
        return (h * group + jnp.where(live, jax.lax.div(n, num_q_tiles), 0),
                jnp.where(live, i, 0), 0)

    d_k, d_v = pl.pallas_call(
        functools.partial(_key_values_kernel, num_q_tiles=num_q_tiles, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hkv, num_kv_tiles, group * num_q_tiles),
            in_specs=[pl.BlockSpec((None, block_q, d), query_rows)] * 2
            + [pl.BlockSpec((None, block_q, 1), query_rows)] * 3
            + [pl.BlockSpec((None, block_k, d), lambda h, j, n, b: (h, j, 0))] * 2
            + [pl.BlockSpec((block_q, 1), lambda h, j, n, b: query_rows(h, j, n, b)[1:]),
               pl.BlockSpec((None, 1, block_k), lambda h, j, n, b: (j, 0, 0))],
            out_specs=[pl.BlockSpec((None, block_k, d), lambda h, j, n, b: (h, j, 0))] * 2,
            scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct((hkv, s_pad, d), jnp.float32)] * 2,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="jattn_flash_backward_kv_tpu",
    )(bounds, q_h, do_h, shift_h, delta_h, dlse_h, k_h, v_h, q_seg, kv_seg)

    def key_rows(h, i, j, bounds_ref):  # clamped to the last tile query tile i sees
        count = visible_kv_blocks(i, block_q=block_q, block_k=block_k, causal=causal,
                                  q_offset=bounds_ref[0], kv_len=bounds_ref[1])
        return (jax.lax.div(h, group), jnp.minimum(j, jnp.maximum(count - 1, 0)), 0)

    d_q = pl.pallas_call(
        functools.partial(_queries_kernel, **static),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(hq, num_q_tiles, num_kv_tiles),
            in_specs=[pl.BlockSpec((None, block_q, d), lambda h, i, j, b: (h, i, 0))] * 2
            + [pl.BlockSpec((None, block_q, 1), lambda h, i, j, b: (h, i, 0))] * 3
            + [pl.BlockSpec((None, block_k, d), key_rows)] * 2
            + [pl.BlockSpec((block_q, 1), lambda h, i, j, b: (i, 0)),
               pl.BlockSpec((None, 1, block_k),
                            lambda h, i, j, b: (key_rows(h, i, j, b)[1], 0, 0))],
            out_specs=pl.BlockSpec((None, block_q, d), lambda h, i, j, b: (h, i, 0)),
            scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct((hq, t_pad, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="jattn_flash_backward_q_tpu",
    )(bounds, q_h, do_h, shift_h, delta_h, dlse_h, k_h, v_h, q_seg, kv_seg)
    return (d_q.transpose(1, 0, 2)[:t], d_k.transpose(1, 0, 2)[:s],
            d_v.transpose(1, 0, 2)[:s])
