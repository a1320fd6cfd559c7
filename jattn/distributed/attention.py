"""DistAttention: attention over a KV block pool sharded over one axis of a device mesh.

Device d of `axis` holds the d-th contiguous range of block ids (`num_blocks / devices`
each). A sequence's block table may point into any device's range. Each device attends
the blocks of each sequence that it holds — compacted to the front of a local table, in
table order, with their true positions so keys rotate correctly — and the partials
merge exactly by LSE (`merge_over_axis`). Queries, tables and lengths are replicated;
only the partial `(out, lse)` crosses devices, never the KV.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jattn.distributed.merge import merge_over_axis
from pallas_kernels import online_softmax, paged_attention as local_paged_attention
from pallas_kernels import rotary


def local_share(tables, lengths, *, device, blocks_per_device: int, block_size: int):
    """The part of each sequence a device holds, as a local block table.

    tables int32 `[B, M]` (global ids), lengths `[B]` -> `(local_tables [B, M]` local ids
    of the device's blocks first, in table order, entries after them meaningless;
    `positions [B, M]` the first token position of each; `local_lengths [B]` tokens held;
    `owned [B, M]` the compacted validity mask)."""
    m = tables.shape[1]
    index = jnp.arange(m, dtype=jnp.int32)
    start = index * block_size
    in_sequence = start[None, :] < lengths[:, None]
    mine = in_sequence & (tables // blocks_per_device == device)
    order = jnp.argsort(~mine, axis=1, stable=True)
    local_tables = jnp.take_along_axis(tables - device * blocks_per_device, order, axis=1)
    positions = jnp.take_along_axis(jnp.broadcast_to(start, tables.shape), order, axis=1)
    tokens = jnp.clip(lengths[:, None] - start[None, :], 0, block_size) * mine
    owned = jnp.take_along_axis(mine, order, axis=1)
    local_tables = jnp.where(owned, local_tables, 0)
    return local_tables, positions, jnp.sum(tokens, axis=1).astype(jnp.int32), owned


def _specs(mesh, axis):
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
    return mesh.shape[axis]


def _check_pool(k_pages, devices: int, axis: str):
    if k_pages.shape[0] % devices:
        raise ValueError(f"the pool's {k_pages.shape[0]} blocks do not split evenly over the "
                         f"{devices} devices of axis {axis!r}")
    return k_pages.shape[0] // devices


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, mesh, axis: str = "kv",
                    sm_scale: float | None = None, backend: str = "auto",
                    key_rope_inv_freq=None):
    """`pallas_kernels.paged_attention` over a pool whose first axis is sharded on `axis`
    of `mesh`: same arguments and results, `(out [B, Hq, D], lse [B, Hq])`, replicated."""
    devices = _specs(mesh, axis)
    per_device = _check_pool(k_pages, devices, axis)
    block_size = k_pages.shape[1]
    rope = key_rope_inv_freq is not None
    inv_freq = key_rope_inv_freq if rope else jnp.zeros((q.shape[-1] // 2,), jnp.float32)

    def local(q, k_pages, v_pages, tables, lengths, inv_freq):
        device = jax.lax.axis_index(axis)
        local_tables, positions, local_lengths, _ = local_share(
            tables, lengths, device=device, blocks_per_device=per_device,
            block_size=block_size)
        out, lse = local_paged_attention(
            q, k_pages, v_pages, local_tables, local_lengths, sm_scale=sm_scale,
            backend=backend, key_rope_inv_freq=inv_freq if rope else None,
            block_positions=positions)
        return merge_over_axis(out, lse, axis)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis), P(), P(), P()),
                         out_specs=(P(), P()), check_vma=False)(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        inv_freq)


def prefill_attention(q, k_pages, v_pages, block_table, *, q_offset, kv_length, mesh,
                      axis: str = "kv", sm_scale: float | None = None,
                      key_rope_inv_freq=None, chunk_blocks: int = 16):
    """Causal attention of a prefill chunk over one sequence whose blocks are spread over
    `axis` of `mesh` (the chunk's own keys already written to the pool).

    q `[T, Hq, D]` at positions `q_offset + t`; block_table int32 `[M]` global ids;
    keys at positions `>= kv_length` are hidden. Each device walks its own blocks of the
    sequence, `chunk_blocks` at a time, with an online softmax masked by true key
    positions; the partials merge by LSE. Returns `(out [T, Hq, D], lse [T, Hq])`.
    """
    devices = _specs(mesh, axis)
    per_device = _check_pool(k_pages, devices, axis)
    block_size, hkv, d = k_pages.shape[1:]
    t, hq, _ = q.shape
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    rope = key_rope_inv_freq is not None
    inv_freq = key_rope_inv_freq if rope else jnp.zeros((d // 2,), jnp.float32)
    steps = -(-block_table.shape[0] // chunk_blocks)
    table = jnp.pad(block_table.astype(jnp.int32), (0, steps * chunk_blocks - block_table.shape[0]))

    def local(q, k_pages, v_pages, table, q_offset, kv_length, inv_freq):
        device = jax.lax.axis_index(axis)
        local_tables, positions, _, owned = local_share(
            table[None], kv_length[None], device=device, blocks_per_device=per_device,
            block_size=block_size)
        q_grouped = (q.astype(jnp.float32) * scale).reshape(t, hkv, group, d)
        q_positions = q_offset + jnp.arange(t)

        def body(step, state):
            ids = jax.lax.dynamic_slice_in_dim(local_tables[0], step * chunk_blocks, chunk_blocks)
            first = jax.lax.dynamic_slice_in_dim(positions[0], step * chunk_blocks, chunk_blocks)
            valid = jax.lax.dynamic_slice_in_dim(owned[0], step * chunk_blocks, chunk_blocks)
            key_positions = (first[:, None] + jnp.arange(block_size)).reshape(-1)
            k = k_pages[ids].reshape(-1, hkv, d)
            if rope:
                k = rotary.rotate(k, key_positions, inv_freq)
            v = v_pages[ids].reshape(-1, hkv, d).astype(jnp.float32)
            visible = (jnp.repeat(valid, block_size)[None, :]
                       & (key_positions[None, :] < kv_length)
                       & (key_positions[None, :] <= q_positions[:, None]))  # [T, S]
            v = jnp.where(jnp.any(visible, axis=0)[:, None, None], v, 0.0)
            scores = jnp.einsum("thgd,shd->hgts", q_grouped, k.astype(jnp.float32))
            scores = jnp.where(visible[None, None], scores, -jnp.inf)
            return online_softmax.update(
                *state, scores, v, lambda p, vals: jnp.einsum("hgts,shd->hgtd", p, vals))

        state = online_softmax.initial_state((hkv, group, t), d)
        out, lse = online_softmax.finish(*jax.lax.fori_loop(0, steps, body, state))
        out = out.transpose(2, 0, 1, 3).reshape(t, hq, d)
        lse = lse[..., 0].transpose(2, 0, 1).reshape(t, hq)
        out, lse = merge_over_axis(out, lse, axis)
        return out.astype(q.dtype), lse

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(P(), P(axis), P(axis), P(), P(), P(), P()),
                         out_specs=(P(), P()), check_vma=False)(
        q, k_pages, v_pages, table, jnp.asarray(q_offset, jnp.int32),
        jnp.asarray(kv_length, jnp.int32), inv_freq)
