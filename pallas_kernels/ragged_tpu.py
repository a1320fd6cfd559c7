"""Ragged paged attention as a Pallas kernel for TPUs (Mosaic lowering).

Work goes by (query tile, sequence) items (`tiling.ragged_work_items`): grid
`(W, max_blocks)`, W = tiles + sequences - 1, the page axis innermost and sequential.
Each item's tile, sequence and visible key count and the (flat) block tables are
scalar-prefetched into SMEM: the query index map picks the item's tile `[block_q * Hq, D]`
(row `t * Hq + head`), and the key/value index maps follow the sequence's table, so each
step DMAs one whole page `[block_size * Hkv, D]` (the pool's `[block_size, Hkv, D]` page
viewed flat, no copy). Steps past the last page the item's last row sees repeat that
page's block index (no new DMA) and skip compute. Each item writes a partial
`(out, lse)` for its tile; the partials go back to token order with
`tiling.scatter_work_items`.

As in the decode kernel, all query heads of the tile attend the flat page in one
`[block_q * Hq, D] x [D, block_size * Hkv]` product and a mask keeps, for query head q,
only the columns of its key/value head `q // (Hq // Hkv)`. The same mask is causal: a row
sees the sequence's keys up to its own position; rows of the tile the item's sequence
does not own get position -1 and see nothing (out 0, lse -inf). Value slots past the
item's last visible key are zeroed (they may hold NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax, rotary, tile_matmul, tiling


def _num_pages(keys, block_size):
    return jax.lax.div(keys + block_size - 1, block_size)


def _ragged_kernel(_tile_ref, _seq_ref, keys_ref, _tables_ref, row_head_ref, col_head_ref,
                   col_slot_ref, page_slot_ref, inv_freq_ref, pos_ref, q_ref, k_ref, v_ref,
                   out_ref, lse_ref, m_ref, l_ref, acc_ref, *, sm_scale, block_size,
                   rotate_keys):
    """One (work item, page) step.

    keys_ref SMEM `[W]` (each item's visible key count; the item tiles, sequences and the
    flat tables are read by the index maps only); row_head_ref `[block_q * Hq, 1]` (the
    key/value head of each row), col_head_ref and col_slot_ref `[1, block_size * Hkv]`
    int32 (the key/value head and slot of each flat page column), page_slot_ref
    `[block_size * Hkv, 1]` (the slot of each flat page row); inv_freq_ref `[1, D/2]`
    float32 (used when `rotate_keys`); pos_ref `[block_q * Hq, 1]` int32 (each row's
    position, -1: sees nothing); q_ref `[block_q * Hq, D]`; k_ref, v_ref
    `[block_size * Hkv, D]`; out_ref `[block_q * Hq, D]`; lse_ref `[block_q * Hq, 1]`;
    scratch m, l `[block_q * Hq, 1]`, acc `[block_q * Hq, D]` float32.
    """
    item, page = pl.program_id(0), pl.program_id(1)
    keys = keys_ref[item]

    @pl.when(page == 0)
    def _init():
        online_softmax.init_scratch(m_ref, l_ref, acc_ref)

    @pl.when(page < _num_pages(keys, block_size))
    def _step():
        page_start = page * block_size
        visible = ((col_head_ref[...] == row_head_ref[...])
                   & (page_start + col_slot_ref[...] <= pos_ref[...]))
        v = v_ref[...]
        v = jnp.where(page_start + page_slot_ref[...] < keys, v, jnp.zeros_like(v))
        if rotate_keys:
            half = q_ref.shape[-1] // 2
            raw = rotary.rotated_key_scores(
                q_ref[:, :half], q_ref[:, half:], k_ref[:, :half], k_ref[:, half:],
                page_start + page_slot_ref[...], inv_freq_ref[...], tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q_ref[...], k_ref[...])
        scores = jnp.where(visible, raw * sm_scale, -jnp.inf)
        online_softmax.update_scratch(m_ref, l_ref, acc_ref, scores, v, tile_matmul.dot_nn)

    @pl.when(page == pl.num_programs(1) - 1)
    def _finish():
        online_softmax.finish_scratch(m_ref, l_ref, acc_ref, out_ref, lse_ref)


def ragged_paged_attention_tpu(q, k_pages, v_pages, block_tables, query_starts, kv_lengths,
                               *, sm_scale, key_rope_inv_freq=None, block_q: int = 16,
                               interpret: bool = False):
    """Ragged attention; arguments and results as `pallas_kernels.ragged_paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[T, Hq, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32. `block_q` is cut
    down to T; a tile has `block_q * Hq` rows (best a multiple of 8). With
    `key_rope_inv_freq [D/2]`, token i's key is rotated to position i inside the kernel.
    """
    t, hq, d = q.shape
    num_blocks, block_size, hkv, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = hq // hkv
    block_q = min(block_q, t)
    rows = block_q * hq
    width = block_size * hkv
    tile, item_seq, valid, positions, keys = tiling.item_positions(
        query_starts, kv_lengths, num_tokens=t, block_q=block_q)
    num_items = tile.shape[0]
    row_positions = jnp.repeat(positions, hq, axis=1)[:, :, None]
    q_tiles = tiling.pad_to(q, block_q).reshape(-1, rows, d)
    row_head = jnp.asarray(np.tile(np.arange(hq, dtype=np.int32) // group, block_q)[:, None])
    col_head = jnp.asarray(np.tile(np.arange(hkv, dtype=np.int32), block_size)[None, :])
    slots = np.repeat(np.arange(block_size, dtype=np.int32), hkv)
    col_slot = jnp.asarray(slots[None, :])
    page_slot = jnp.asarray(slots[:, None])

    def page_index(item, page, _tile_ref, seq_ref, keys_ref, tables_ref):
        last = jnp.maximum(_num_pages(keys_ref[item], block_size) - 1, 0)
        return (tables_ref[seq_ref[item] * max_blocks + jnp.minimum(page, last)], 0, 0)

    def constant(shape):
        return pl.BlockSpec(shape, lambda *_: (0, 0))

    def per_item(shape):
        return pl.BlockSpec((None, *shape), lambda item, *_: (item, 0, 0))

    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    inv_freq = inv_freq.reshape(1, d // 2)
    kernel = functools.partial(_ragged_kernel, sm_scale=sm_scale, block_size=block_size,
                               rotate_keys=rotate_keys)
    outs, lses = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(num_items, max_blocks),
            in_specs=[
                constant((rows, 1)),
                constant((1, width)),
                constant((1, width)),
                constant((width, 1)),
                constant((1, d // 2)),
                per_item((rows, 1)),
                pl.BlockSpec((None, rows, d), lambda item, page, tile_ref, *_:
                             (tile_ref[item], 0, 0)),
                pl.BlockSpec((None, width, d), page_index),
                pl.BlockSpec((None, width, d), page_index),
            ],
            out_specs=[per_item((rows, d)), per_item((rows, 1))],
            scratch_shapes=[
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, 1), jnp.float32),
                pltpu.VMEM((rows, d), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((num_items, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((num_items, rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="jattn_ragged_tpu",
    )(tile, item_seq, keys, block_tables.reshape(-1), row_head, col_head, col_slot,
      page_slot, inv_freq, row_positions, q_tiles,
      k_pages.reshape(num_blocks, width, d), v_pages.reshape(num_blocks, width, d))
    out, lse = tiling.scatter_work_items(
        outs.reshape(num_items, block_q, hq, d), lses.reshape(num_items, block_q, hq),
        tile, valid, t)
    return out.astype(q.dtype), lse
