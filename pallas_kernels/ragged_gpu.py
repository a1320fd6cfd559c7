"""Ragged paged attention as a Pallas kernel for GPUs (Triton lowering).

Work goes by (query tile, sequence) items (`tiling.ragged_work_items`): grid `(W, Hkv)`,
W = tiles + sequences - 1. Program (w, h) takes the `block_q` query rows of item w's
tile, with the query heads of group h (GQA: the `Hq // Hkv` heads sharing key/value head
h, padded to a power of two), as one `[block_q * G_pad, D]` tile: row `t * G_pad + g` is
token t's head g of the group. It walks the pages of the item's sequence up to the last
key its last row sees, loading each `[block_size, D]` page slice straight from the pool
through the block table, and writes a partial `(out, lse)` for the tile; the partials go
back to token order with `tiling.scatter_work_items`.

Masks: a row sees the sequence's keys up to its own position (causal); rows of the tile
the item's sequence does not own get position -1 and see nothing (out 0, lse -inf).
Value slots past the item's last visible key are zeroed (they may hold NaN). Triton
wants power-of-two tiles: `block_q`, `block_size` and `D` must be powers of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import online_softmax, rotary, tile_matmul, tiling


def _ragged_kernel(tile_ref, seq_ref, keys_ref, tables_ref, inv_freq_ref, pos_ref, q_ref,
                   k_ref, v_ref, out_ref, lse_ref, *, sm_scale, block_size, rows,
                   rotate_keys):
    """One (work item, kv head).

    tile_ref, seq_ref, keys_ref `[W]` int32 (each item's tile, sequence and visible key
    count); tables_ref `[S, max_blocks]` int32; inv_freq_ref `[D/2]` float32 (used when
    `rotate_keys`); pos_ref `[rows]` int32 (each row's position, -1: sees nothing); q_ref
    the whole `[Hkv, T_pad * G_pad, D]`; k_ref, v_ref the whole pool
    `[num_blocks, block_size, Hkv, D]`; out_ref `[rows, D]`; lse_ref `[rows]`.
    """
    item, h = pl.program_id(0), pl.program_id(1)
    seq, keys = seq_ref[item], keys_ref[item]
    start = pl.multiple_of(tile_ref[item] * rows, rows)
    q = q_ref[h, pl.ds(start, rows), :]
    d = q.shape[-1]
    half = d // 2
    if rotate_keys:
        q1 = q_ref[h, pl.ds(start, rows), pl.ds(0, half)]
        q2 = q_ref[h, pl.ds(start, rows), pl.ds(half, half)]
        inv_freq = inv_freq_ref[...][None, :]
    pos = pos_ref[...][:, None]
    slot = jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    slot_row = jax.lax.broadcasted_iota(jnp.int32, (rows, block_size), 1)

    def body(page, state):
        block = tables_ref[seq, page]
        first = page * block_size
        v = v_ref[block, :, h, :]
        v = jnp.where(first + slot < keys, v, jnp.zeros_like(v))
        if rotate_keys:
            raw = rotary.rotated_key_scores(
                q1, q2, k_ref[block, :, h, pl.ds(0, half)], k_ref[block, :, h, pl.ds(half, half)],
                first + slot, inv_freq, tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q, k_ref[block, :, h, :])
        scores = jnp.where(first + slot_row <= pos, raw * sm_scale, -jnp.inf)
        return online_softmax.update(*state, scores, v, tile_matmul.dot_nn)

    pages = jax.lax.div(keys + block_size - 1, block_size)
    state = online_softmax.initial_state((rows,), d)
    out, lse = online_softmax.finish(*jax.lax.fori_loop(0, pages, body, state))
    out_ref[...] = out
    lse_ref[...] = lse[:, 0]


def ragged_paged_attention_gpu(q, k_pages, v_pages, block_tables, query_starts, kv_lengths,
                               *, sm_scale, key_rope_inv_freq=None, block_q: int = 16,
                               num_warps: int = 4, num_stages: int = 2,
                               interpret: bool = False):
    """Ragged attention; arguments and results as `pallas_kernels.ragged_paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[T, Hq, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32. `block_q` (a
    power of two) is cut down to T rounded up to a power of two; the group is padded so a
    tile has at least 16 rows, the least `dot` takes. With `key_rope_inv_freq [D/2]`,
    token i's key is rotated to position i inside the kernel.
    """
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_pages.shape
    group = hq // hkv
    for name, size in (("block_q", block_q), ("block_size", block_size), ("head_dim", d)):
        if size & (size - 1):
            raise ValueError(f"the GPU ragged kernel needs a power-of-two {name}, got {size}")
    block_q = min(block_q, pl.next_power_of_2(t))
    group_pad = max(pl.next_power_of_2(group), pl.cdiv(16, block_q))
    rows = block_q * group_pad
    tile, item_seq, valid, positions, keys = tiling.item_positions(
        query_starts, kv_lengths, num_tokens=t, block_q=block_q)
    num_items = tile.shape[0]
    q_grouped = jnp.pad(tiling.pad_to(q, block_q).reshape(-1, hkv, group, d),
                        ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    q_grouped = q_grouped.transpose(1, 0, 2, 3).reshape(hkv, -1, d)
    row_positions = jnp.repeat(positions, group_pad, axis=1)
    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    kernel = functools.partial(_ragged_kernel, sm_scale=sm_scale, block_size=block_size,
                               rows=rows, rotate_keys=rotate_keys)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    outs, lses = pl.pallas_call(
        kernel,
        grid=(num_items, hkv),
        in_specs=[
            whole,
            whole,
            whole,
            whole,
            pl.BlockSpec((d // 2,), lambda w, h: (0,)),
            pl.BlockSpec((None, rows), lambda w, h: (w, 0)),
            whole,
            whole,
            whole,
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows, d), lambda w, h: (w, h, 0, 0)),
            pl.BlockSpec((None, None, rows), lambda w, h: (w, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_items, hkv, rows, d), jnp.float32),
            jax.ShapeDtypeStruct((num_items, hkv, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jattn_ragged_gpu",
    )(tile, item_seq, keys, block_tables, inv_freq, row_positions, q_grouped, k_pages,
      v_pages)
    outs = outs.reshape(num_items, hkv, block_q, group_pad, d)[:, :, :, :group]
    lses = lses.reshape(num_items, hkv, block_q, group_pad)[:, :, :, :group]
    out, lse = tiling.scatter_work_items(
        outs.transpose(0, 2, 1, 3, 4).reshape(num_items, block_q, hq, d),
        lses.transpose(0, 2, 1, 3).reshape(num_items, block_q, hq), tile, valid, t)
    return out.astype(q.dtype), lse
