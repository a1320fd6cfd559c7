"""Paged decode attention as a Pallas kernel for GPUs (Triton lowering), split-K.

Grid `(B, Hkv, splits)`. Program (b, h, s) takes the query heads of group h (GQA: the
`Hq // Hkv` heads sharing key/value head h, padded to a power of two), walks the pages of
split s of sequence b's block table `pages_per_step` at a time (each step's page loads
issued together, so more memory is in flight per program), loading each
`[block_size, D]` page slice straight from the pool through the table, and writes a
partial `(out, lse)`. The partials are
merged after the kernel by `merge_attention`. Pages past a sequence's length are never
visited; slots past its length inside its last page are masked and zeroed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import online_softmax, rotary, tile_matmul
from pallas_kernels.merge import merge_attention

TARGET_PROGRAMS = 264
"""About two waves of an H100's 132 SMs: the split count aims for this many programs."""


def _paged_kernel(lengths_ref, tables_ref, positions_ref, inv_freq_ref, q_ref, k_ref, v_ref,
                  out_ref, lse_ref, *, sm_scale, block_size, pages_per_split, pages_per_step,
                  rotate_keys):
    """One (sequence, kv head, split).

    lengths_ref `[B]`, tables_ref and positions_ref `[B, max_blocks]` int32 (the position
    of each table entry's first token); inv_freq_ref `[D/2]` float32 (positions and
    inv_freq used when `rotate_keys`); q_ref `[G, D]`; k_ref, v_ref the whole pool
    `[num_blocks, block_size, Hkv, D]`; out_ref `[G, D]`; lse_ref `[G]`.
    """
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = lengths_ref[b]
    first = split * pages_per_split
    end = jnp.minimum(first + pages_per_split, jax.lax.div(length + block_size - 1, block_size))
    q = q_ref[...]
    d = q.shape[-1]
    half = d // 2
    if rotate_keys:
        q1, q2 = q_ref[:, pl.ds(0, half)], q_ref[:, pl.ds(half, half)]
        inv_freq = inv_freq_ref[...][None, :]
    slot = jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)
    slot_row = jax.lax.broadcasted_iota(jnp.int32, (q.shape[0], block_size), 1)

    def page_tile(page):
        """Page `page`'s values (zeroed where not owned) and masked scores `[G, bs]`; a
        page at or past `end` (a step's tail) is wholly masked, read from page `end - 1`."""
        visible = page < end
        entry = jnp.minimum(page, end - 1)
        block = tables_ref[b, entry]
        v = v_ref[block, :, h, :]
        v = jnp.where(visible & (page * block_size + slot < length), v, jnp.zeros_like(v))
        if rotate_keys:
            raw = rotary.rotated_key_scores(
                q1, q2, k_ref[block, :, h, pl.ds(0, half)], k_ref[block, :, h, pl.ds(half, half)],
                positions_ref[b, entry] + slot, inv_freq, tile_matmul.dot_nt)
        else:
            raw = tile_matmul.dot_nt(q, k_ref[block, :, h, :])
        scores = jnp.where(visible & (page * block_size + slot_row < length), raw * sm_scale,
                           -jnp.inf)
        return scores, v

    def body(step, state):
        tiles = [page_tile(first + step * pages_per_step + i) for i in range(pages_per_step)]
        for scores, v in tiles:
            state = online_softmax.update(*state, scores, v, tile_matmul.dot_nn)
        return state

    steps = jax.lax.div(end - first + pages_per_step - 1, pages_per_step)
    state = online_softmax.initial_state((q.shape[0],), d)
    out, lse = online_softmax.finish(*jax.lax.fori_loop(0, steps, body, state))
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse[:, 0]


def paged_attention_gpu(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                        key_rope_inv_freq=None, block_positions=None,
                        num_splits: int | None = None, pages_per_step: int = 1,
                        num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """Decode attention; arguments and results as `pallas_kernels.paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32. `num_splits`
    defaults to enough splits to fill the GPU (`TARGET_PROGRAMS`). With
    `key_rope_inv_freq [D/2]`, keys are rotated inside the kernel: slot r of table entry j
    of sequence b to position `block_positions[b, j] + r` (int32 `[B, max_blocks]`, in
    tokens; default `j * block_size`, i.e. token i at position i). `pages_per_step`
    pages are read per step of each program's loop.
    """
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_pages.shape
    max_blocks = block_tables.shape[1]
    group = hq // hkv
    group_pad = max(16, pl.next_power_of_2(group))
    if pages_per_step < 1:
        raise ValueError(f"pages_per_step must be >= 1, got {pages_per_step}")
    for name, size in (("block_size", block_size), ("head_dim", d)):
        if size & (size - 1):
            raise ValueError(f"the GPU paged kernel needs a power-of-two {name}, got {size}")
    if num_splits is None:
        num_splits = pl.cdiv(TARGET_PROGRAMS, batch * hkv)
    num_splits = max(1, min(num_splits, max_blocks))
    pages_per_split = pl.cdiv(max_blocks, num_splits)
    if block_positions is None:
        block_positions = jnp.broadcast_to(
            jnp.arange(max_blocks, dtype=jnp.int32) * block_size, block_tables.shape)
    q_grouped = jnp.pad(q.reshape(batch, hkv, group, d),
                        ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    rotate_keys, inv_freq = rotary.kernel_operand(key_rope_inv_freq, d)
    kernel = functools.partial(_paged_kernel, sm_scale=sm_scale, block_size=block_size,
                               pages_per_split=pages_per_split, pages_per_step=pages_per_step,
                               rotate_keys=rotate_keys)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    outs, lses = pl.pallas_call(
        kernel,
        grid=(batch, hkv, num_splits),
        in_specs=[
            whole,
            whole,
            whole,
            pl.BlockSpec((d // 2,), lambda b, h, s: (0,)),
            pl.BlockSpec((None, None, group_pad, d), lambda b, h, s: (b, h, 0, 0)),
            whole,
            whole,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, group_pad, d), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, group_pad), lambda b, h, s: (s, b, h, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((num_splits, batch, hkv, group_pad, d), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, batch, hkv, group_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jattn_paged_gpu",
    )(lengths, block_tables, block_positions, inv_freq, q_grouped, k_pages, v_pages)
    out, lse = merge_attention(outs[:, :, :, :group], lses[:, :, :, :group])
    return out.reshape(batch, hq, d).astype(q.dtype), lse.reshape(batch, hq)
