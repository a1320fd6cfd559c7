"""Tiled attention in plain jnp: the fast path on CPU, and a fallback everywhere.

Prefill walks query tiles in sequence and, for each, only the key tiles it can see
(causal tiles past the diagonal and tiles past `kv_length` are skipped), so memory is
`O(block_q * block_k * Hq)` and never grows with `T * S`. Decode walks the block table in
chunks of pages (split-K) and gathers only one chunk at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import online_softmax, rotary, tiling
from pallas_kernels.tile_matmul import precision_for
from pallas_kernels.tiling import pad_to, visible_kv_blocks


def flash_attention_xla(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                        key_rope_inv_freq=None, block_q: int = 256, block_k: int = 512):
    """Tiled prefill attention; arguments and results as `pallas_kernels.flash_attention`.

    q `[T, Hq, D]`, k/v `[S, Hkv, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32.
    With `key_rope_inv_freq [D/2]`, keys are rotated to their positions once, up front.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    block_q = min(block_q, max(t, 1))
    block_k = min(block_k, max(s, 1))
    kv_len = jnp.clip(jnp.asarray(kv_length, jnp.int32), 0, s)
    q_offset = jnp.asarray(q_offset, jnp.int32)

    if key_rope_inv_freq is not None:
        k = rotary.rotate(k, jnp.arange(s), key_rope_inv_freq).astype(k.dtype)
    precision = precision_for(q.dtype)
    # Heads lead so every product is a plain batched matmul over the key/value heads.
    q_tiles = (pad_to(q, block_q).reshape(-1, block_q, hkv, group, d)
               .transpose(0, 2, 3, 1, 4).astype(jnp.float32) * sm_scale)
    k_all = pad_to(k, block_k).transpose(1, 0, 2)
    v_all = pad_to(v, block_k).transpose(1, 0, 2)
    num_q_tiles = q_tiles.shape[0]

    def attend_tile(args):
        tile_index, q_tile = args
        q_pos = q_offset + tile_index * block_q + jnp.arange(block_q)

        def body(j, state):
            start = j * block_k
            k_tile = jax.lax.dynamic_slice_in_dim(k_all, start, block_k, axis=1)
            v_tile = jax.lax.dynamic_slice_in_dim(v_all, start, block_k, axis=1)
            k_pos = start + jnp.arange(block_k)
            in_range = k_pos < kv_len
            visible = in_range[None, :]
            if causal:
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            v_tile = jnp.where(in_range[None, :, None], v_tile.astype(jnp.float32), 0.0)
            scores = jnp.einsum("hgqd,hkd->hgqk", q_tile, k_tile.astype(jnp.float32),
                                precision=precision)
            scores = jnp.where(visible, scores, -jnp.inf)
            return online_softmax.update(
                *state, scores, v_tile,
                lambda p, vals: jnp.einsum("hgqk,hkd->hgqd", p, vals, precision=precision))

        state = online_softmax.initial_state((hkv, group, block_q), d)
        count = visible_kv_blocks(tile_index, block_q=block_q, block_k=block_k,
                                  causal=causal, q_offset=q_offset, kv_len=kv_len)
        out, lse = online_softmax.finish(*jax.lax.fori_loop(0, count, body, state))
        return out, lse[..., 0]

    out, lse = jax.lax.map(attend_tile, (jnp.arange(num_q_tiles), q_tiles))
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_q_tiles * block_q, hq, d)[:t]
    lse = lse.transpose(0, 3, 1, 2).reshape(num_q_tiles * block_q, hq)[:t]
    return out.astype(q.dtype), lse


def paged_attention_xla(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                        key_rope_inv_freq=None, block_positions=None,
                        chunk_tokens: int = 64):
    """Split-K decode over a paged cache; arguments and results as `paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32. Each step
    gathers about `chunk_tokens` tokens per sequence; small chunks stay in cache (64 ran
    fastest on a 2-core x86 host, 7.8 GB/s of KV at 32K context). With
    `key_rope_inv_freq [D/2]`, each chunk's keys are rotated to their positions as they
    are gathered: token i at position i, or with `block_positions [B, max_blocks]` the
    slot r of table entry j at `block_positions[b, j] + r`.
    """
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_pages.shape
    group = hq // hkv
    pages_per_chunk = min(max(1, chunk_tokens // block_size), block_tables.shape[1])
    tables = pad_to(block_tables, pages_per_chunk, axis=1)
    step_tokens = pages_per_chunk * block_size
    if block_positions is not None:
        starts = pad_to(block_positions, pages_per_chunk, axis=1)
    q_grouped = q.reshape(batch, hkv, group, d).astype(jnp.float32) * sm_scale
    precision = precision_for(q.dtype)

    def body(c, state):
        ids = jax.lax.dynamic_slice_in_dim(tables, c * pages_per_chunk, pages_per_chunk, axis=1)
        k = k_pages[ids].reshape(batch, step_tokens, hkv, d)
        if key_rope_inv_freq is not None:
            if block_positions is None:
                positions = c * step_tokens + jnp.arange(step_tokens)
            else:
                first = jax.lax.dynamic_slice_in_dim(starts, c * pages_per_chunk,
                                                     pages_per_chunk, axis=1)
                positions = (first[:, :, None] + jnp.arange(block_size)).reshape(batch, -1)
            k = rotary.rotate(k, positions, key_rope_inv_freq).astype(k.dtype)
        k = k.transpose(0, 2, 1, 3)
        v = v_pages[ids].reshape(batch, step_tokens, hkv, d).transpose(0, 2, 1, 3)
        owned = c * step_tokens + jnp.arange(step_tokens)[None, :] < lengths[:, None]
        v = jnp.where(owned[:, None, :, None], v.astype(jnp.float32), 0.0)
        scores = jnp.einsum("bhgd,bhsd->bhgs", q_grouped, k.astype(jnp.float32),
                            precision=precision)
        scores = jnp.where(owned[:, None, None, :], scores, -jnp.inf)
        return online_softmax.update(
            *state, scores, v,
            lambda p, vals: jnp.einsum("bhgs,bhsd->bhgd", p, vals, precision=precision))

    state = online_softmax.initial_state((batch, hkv, group), d)
    num_chunks = (jnp.max(lengths, initial=0) + step_tokens - 1) // step_tokens
    num_chunks = jnp.minimum(num_chunks, tables.shape[1] // pages_per_chunk)
    out, lse = online_softmax.finish(*jax.lax.fori_loop(0, num_chunks, body, state))
    return out.reshape(batch, hq, d).astype(q.dtype), lse.reshape(batch, hq)


def ragged_paged_attention_xla(q, k_pages, v_pages, block_tables, query_starts, kv_lengths,
                               *, sm_scale, key_rope_inv_freq=None, block_q: int = 32,
                               chunk_tokens: int = 64):
    """Ragged attention over a paged cache; arguments and results as
    `ragged_paged_attention` (`block_tables` sanitised).

    q `[T, Hq, D]` -> out `[T, Hq, D]` (q's dtype), lse `[T, Hq]` float32. The sequences
    with one query row (decodes) go through `paged_attention_xla` together, one row each.
    The others go by (query tile, sequence) items (`tiling.ragged_work_items`): item
    (i, s) takes the `block_q` queries of tile i that sequence s owns and walks s's pages
    in chunks of about `chunk_tokens` tokens, up to the last key its last query sees,
    rotating each chunk's keys to their positions as they are gathered (with
    `key_rope_inv_freq [D/2]`). Items run one after another; with no sequence of more
    than one row they are skipped. The default tiles ran fastest on a 2-core x86 host
    across one 512-token prompt, 16 prompts of 32 and 4 of 120 packed together.
    """
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_pages.shape
    group = hq // hkv
    block_q = min(block_q, t)
    num_tiles = -(-t // block_q)
    pages_per_chunk = min(max(1, chunk_tokens // block_size), block_tables.shape[1])
    tables = pad_to(block_tables, pages_per_chunk, axis=1)
    step_tokens = pages_per_chunk * block_size
    q_tiles = (pad_to(q, block_q).reshape(num_tiles, block_q, hkv, group, d)
               .transpose(0, 2, 3, 1, 4).astype(jnp.float32) * sm_scale)
    rows = query_starts[1:] - query_starts[:-1]
    single = rows == 1
    precision = precision_for(q.dtype)

    def attend_item(args):
        tile_index, seq, pos, seen_keys = args
        q_tile = q_tiles[tile_index]
        table = tables[seq]

        def body(c, state):
            ids = jax.lax.dynamic_slice_in_dim(table, c * pages_per_chunk, pages_per_chunk)
            k_pos = c * step_tokens + jnp.arange(step_tokens)
            k = k_pages[ids].reshape(step_tokens, hkv, d)
            if key_rope_inv_freq is not None:
                k = rotary.rotate(k, k_pos, key_rope_inv_freq).astype(k.dtype)
            visible = k_pos[None, :] <= pos[:, None]
            seen = jnp.any(visible, axis=0)
            v = v_pages[ids].reshape(step_tokens, hkv, d).transpose(1, 0, 2)
            v = jnp.where(seen[None, :, None], v.astype(jnp.float32), 0.0)
            scores = jnp.einsum("hgqd,hkd->hgqk", q_tile,
                                k.transpose(1, 0, 2).astype(jnp.float32), precision=precision)
            scores = jnp.where(visible, scores, -jnp.inf)
            return online_softmax.update(
                *state, scores, v,
                lambda p, vals: jnp.einsum("hgqk,hkd->hgqd", p, vals, precision=precision))

        state = online_softmax.initial_state((hkv, group, block_q), d)
        chunks = jnp.minimum(jax.lax.div(seen_keys + step_tokens - 1, step_tokens),
                             tables.shape[1] // pages_per_chunk)
        out, lse = online_softmax.finish(*jax.lax.fori_loop(0, chunks, body, state))
        return (out.transpose(2, 0, 1, 3).reshape(block_q, hq, d),
                lse[..., 0].transpose(2, 0, 1).reshape(block_q, hq))

    def attend_items():
        tile, item_seq, valid, item_pos, keys = tiling.item_positions(
            query_starts, kv_lengths, num_tokens=t, block_q=block_q)
        item_pos = jnp.where(single[item_seq][:, None], -1, item_pos)
        keys = jnp.where(single[item_seq], 0, keys)
        outs, lses = jax.lax.map(attend_item, (tile, item_seq, item_pos, keys))
        return tiling.scatter_work_items(outs, lses, tile, valid, t)

    def nothing():
        return (jnp.zeros((t, hq, d), jnp.float32), jnp.full((t, hq), -jnp.inf, jnp.float32))

    out, lse = jax.lax.cond(jnp.any(rows > 1), attend_items, nothing)
    row = jnp.where(single, query_starts[:-1], t)  # each decode's row; t: none
    decoded, decoded_lse = paged_attention_xla(
        q[jnp.minimum(row, t - 1)], k_pages, v_pages, block_tables,
        jnp.where(single, kv_lengths, 0), sm_scale=sm_scale,
        key_rope_inv_freq=key_rope_inv_freq)
    out = out.at[row].set(decoded.astype(jnp.float32), mode="drop")
    lse = lse.at[row].set(decoded_lse, mode="drop")
    return out.astype(q.dtype), lse
