"""Paged decode attention as a Pallas kernel for TPUs (Mosaic lowering), split-K.

Grid `(B, splits, pages per split)`, the page axis innermost and sequential. The block
table, lengths and block positions are scalar-prefetched into SMEM and the key/value
index maps follow the table, so each step DMAs one whole page `[block_size * Hkv, D]`
(the pool's `[block_size, Hkv, D]` page viewed flat, no copy). Steps past a sequence's
last page repeat its last block index (no new DMA) and skip compute.

All query heads attend the flat page in one `[Hq, D] x [D, block_size * Hkv]` product and
a mask keeps, for query head q, only the columns of its key/value head `q // (Hq // Hkv)`.
That spends `Hkv` times the minimal MXU work on a step that is bound by HBM bandwidth, in
exchange for plain 2-D tiles with no strided loads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax, rotary, tile_matmul
from pallas_kernels.merge import merge_attention


def _num_pages(length, block_size):
    return jax.lax.div(length + block_size - 1, block_size)


def _paged_kernel(tables_ref, lengths_ref, positions_ref, row_head_ref, col_head_ref,
                  col_slot_ref, page_slot_ref, inv_freq_ref, q_ref, k_ref, v_ref, out_ref,
                  lse_ref, m_ref, l_ref, acc_ref, *, sm_scale, block_size, max_blocks,
                  pages_per_split, rotate_keys):
    """One (sequence, split, page) step.

    tables_ref and positions_ref SMEM `[B * max_blocks]` (the block and the position of
    the first token of each table entry), lengths_ref SMEM `[B]`; row_head_ref `[Hq, 1]`,
    col_head_ref and col_slot_ref `[1, block_size * Hkv]` int32 (the key/value head and
    slot of each flat page column); q_ref `[Hq, D]`; k_ref, v_ref `[block_size * Hkv, D]`;
    out_ref `[Hq, D]`; lse_ref `[Hq, 1]`; scratch m, l `[Hq, 1]`, acc `[Hq, D]` float32.
    """
    b, split, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    page = split * pages_per_split + step

    @pl.when(step == 0)
    def _init():
        online_softmax.init_scratch(m_ref, l_ref, acc_ref)

    @pl.when(page < _num_pages(length, block_size))
    def _step():
        page_start = page * block_size
        slot_owned = page_start + col_slot_ref[...] < length
        visible = slot_owned & (col_head_ref[...] == row_head_ref[...])
        v = v_ref[...]
        v = jnp.where(page_start + page_slot_ref[...] < length, v, jnp.zeros_like(v))
        if rotate_keys:
            half = q_ref.shape[-1] // 2
            raw = rotary.rotated_key_scores(
                q_ref[:, :half], q_ref[:, half:], k_ref[:, :half], k_ref[:, half:],
                positions_ref[b * max_blocks + page] + page_slot_ref[...], inv_freq_ref[...],
                tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q_ref[...], k_ref[...])
        scores = jnp.where(visible, raw * sm_scale, -jnp.inf)
        online_softmax.update_scratch(m_ref, l_ref, acc_ref, scores, v, tile_matmul.dot_nn)

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        online_softmax.finish_scratch(m_ref, l_ref, acc_ref, out_ref, lse_ref)


def paged_attention_tpu(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                        key_rope_inv_freq=None, block_positions=None, num_splits: int = 1,
                        interpret: bool = False):
    """Decode attention; arguments and results as `pallas_kernels.paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32. `num_splits > 1`
    adds a parallel split of each sequence's pages (for megacore chips), merged after.
    With `key_rope_inv_freq [D/2]`, keys are rotated in the kernel: slot r of table entry j
    of sequence b to position `block_positions[b, j] + r` (int32 `[B, max_blocks]`, in
    tokens; default `j * block_size`, i.e. token i at position i).
    """
    batch, hq, d = q.shape
    num_blocks, block_size, hkv, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = hq // hkv
    num_splits = max(1, min(num_splits, max_blocks))
    pages_per_split = pl.cdiv(max_blocks, num_splits)
    if block_positions is None:
        block_positions = jnp.broadcast_to(
            jnp.arange(max_blocks, dtype=jnp.int32) * block_size, block_tables.shape)
    width = block_size * hkv
    row_head = jnp.asarray(np.arange(hq, dtype=np.int32)[:, None] // group)
    col_head = jnp.asarray(np.tile(np.arange(hkv, dtype=np.int32), block_size)[None, :])
    slots = np.repeat(np.arange(block_size, dtype=np.int32), hkv)
    col_slot = jnp.asarray(slots[None, :])
    page_slot = jnp.asarray(slots[:, None])

    def page_index(b, split, step, tables_ref, lengths_ref, _positions_ref):
        last = jnp.maximum(_num_pages(lengths_ref[b], block_size) - 1, 0)
        page = jnp.minimum(split * pages_per_split + step, last)
        return (tables_ref[b * max_blocks + page], 0, 0)

    def constant(shape):
        return pl.BlockSpec(shape, lambda *_: (0, 0))

    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    inv_freq = inv_freq.reshape(1, d // 2)
    kernel = functools.partial(_paged_kernel, sm_scale=sm_scale, block_size=block_size,
                               max_blocks=max_blocks, pages_per_split=pages_per_split,
                               rotate_keys=rotate_keys)
    outs, lses = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, num_splits, pages_per_split),
            in_specs=[
                constant((hq, 1)),
                constant((1, width)),
                constant((1, width)),
                constant((width, 1)),
                constant((1, d // 2)),
                pl.BlockSpec((None, hq, d), lambda b, s, p, *_: (b, 0, 0)),
                pl.BlockSpec((None, width, d), page_index),
                pl.BlockSpec((None, width, d), page_index),
            ],
            out_specs=[
                pl.BlockSpec((None, None, hq, d), lambda b, s, p, *_: (s, b, 0, 0)),
                pl.BlockSpec((None, None, hq, 1), lambda b, s, p, *_: (s, b, 0, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((hq, 1), jnp.float32),
                pltpu.VMEM((hq, 1), jnp.float32),
                pltpu.VMEM((hq, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, batch, hq, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, batch, hq, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jattn_paged_tpu",
    )(block_tables.reshape(-1), lengths, block_positions.reshape(-1), row_head, col_head,
      col_slot, page_slot, inv_freq, q,
      k_pages.reshape(num_blocks, width, d), v_pages.reshape(num_blocks, width, d))
    out, lse = merge_attention(outs, lses[..., 0])
    return out.astype(q.dtype), lse
