"""Tiled attention in plain jnp: the fast path on CPU, and a fallback everywhere.

Prefill walks query tiles in sequence and, for each, only the key tiles it can see
(causal tiles past the diagonal and tiles past `kv_length` are skipped), so memory is
`O(block_q * block_k * Hq)` and never grows with `T * S`. Decode walks the block table in
chunks of pages (split-K) and gathers only one chunk at a time; so do the paged prefill
items, and both prefetch the next chunk's keys through the loop state (see
`paged_attention_xla`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import online_softmax, rotary, tiling
from pallas_kernels.tile_matmul import precision_for
from pallas_kernels.tiling import pad_to, visible_kv_blocks


def flash_attention_xla(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                        key_rope_inv_freq=None, segment_ids=None, block_q: int = 256,
                        block_k: int = 512):
    """Tiled prefill attention; arguments and results as `pallas_kernels.flash_attention`
    (`segment_ids` None or the checked pair).

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
    if segment_ids is not None:
        q_segments = pad_to(segment_ids[0], block_q).reshape(num_q_tiles, block_q)
        k_segments = pad_to(segment_ids[1], block_k)

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
            if segment_ids is not None:
                k_segment = jax.lax.dynamic_slice_in_dim(k_segments, start, block_k)
                visible = visible & (q_segments[tile_index][:, None] == k_segment[None, :])
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


def _rotate(x, cos, sin):
    """Rotates `x [..., T, H, D]` by angles `cos, sin [..., T, D/2]` (as `rotary.angles`
    gives them); float32 result."""
    half = x.shape[-1] // 2
    y1, y2 = rotary.rotate_halves(x[..., :half], x[..., half:], cos[..., None, :],
                                  sin[..., None, :])
    return jnp.concatenate([y1, y2], axis=-1)


def paged_attention_xla(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                        key_rope_inv_freq=None, block_positions=None,
                        chunk_tokens: int = 64):
    """Split-K decode over a paged cache; arguments and results as `paged_attention`.

    `block_tables` must already be sanitised (entries past a sequence's pages in range).
    q `[B, Hq, D]` -> out `[B, Hq, D]` (q's dtype), lse `[B, Hq]` float32. Each step
    of the loop attends one chunk of `chunk_tokens` tokens of every sequence, up to the
    longest. With `key_rope_inv_freq [D/2]`, each chunk's keys are rotated to their
    positions: token i at position i, or with `block_positions [B, max_blocks]` the
    slot r of table entry j at `block_positions[b, j] + r`.

    XLA on CPU fuses a gather into its consumers, so gathering and rotating a chunk in
    one step redid the page lookup, and the angles' sin and cos, for every element of
    the rotation (three quarters of the time). Instead each step fetches the next
    chunk's keys and angles into the loop state, which XLA materialises once; values
    only feed a masked copy and are gathered in place (prefetching them too ran
    slower). On a 2-core x86 host (head_dim 8, 8 query and 4 KV heads, 16-slot pages,
    rotated keys, float32), 16 sequences: 0.21 ms at 11 tokens, 0.37 ms at 100, 0.8 ms
    at 10..300 (from 0.8, 1.6 and 3.6 ms before the prefetch); 8 sequences of 4K
    tokens: 12 ms (from 34). 64-token chunks ran fastest up to 300 tokens (16: 2x
    faster at 11 tokens but slower from 100 on; 128 save a fifth at 4K).
    """
    batch, hq, d = q.shape
    _, block_size, hkv, _ = k_pages.shape
    group = hq // hkv
    pages_per_chunk = min(max(1, chunk_tokens // block_size), block_tables.shape[1])
    tables = pad_to(block_tables, pages_per_chunk, axis=1)
    step_tokens = pages_per_chunk * block_size
    if block_positions is not None:
        starts = pad_to(block_positions, pages_per_chunk, axis=1)
    q_grouped = q.reshape(batch, hkv, group, d).astype(jnp.float32)[..., None, :] * sm_scale
    precision = precision_for(q.dtype)

    def chunk_pages(c):
        return jax.lax.dynamic_slice_in_dim(tables, c * pages_per_chunk, pages_per_chunk,
                                            axis=1)

    def fetch_keys(c):
        """Chunk c's keys `[B, step, Hkv, D]` and, with rotary, their `(cos, sin)`
        `[1 or B, step, D/2]`. Past the last chunk the slice clamps (never used)."""
        k = k_pages[chunk_pages(c)].reshape(batch, step_tokens, hkv, d)
        if key_rope_inv_freq is None:
            return k, None
        if block_positions is None:
            positions = (c * step_tokens + jnp.arange(step_tokens))[None]
        else:
            first = jax.lax.dynamic_slice_in_dim(starts, c * pages_per_chunk,
                                                 pages_per_chunk, axis=1)
            positions = (first[:, :, None] + jnp.arange(block_size)).reshape(batch, -1)
        return k, rotary.angles(positions, key_rope_inv_freq)

    def body(c, carry):
        state, (k, angles) = carry
        if angles is not None:
            k = _rotate(k, *angles).astype(k.dtype)
        v = v_pages[chunk_pages(c)].reshape(batch, step_tokens, hkv, d)
        owned = c * step_tokens + jnp.arange(step_tokens)[None, :] < lengths[:, None]
        v = jnp.where(owned[:, :, None, None], v.astype(jnp.float32), 0.0)
        scores = jnp.einsum("bhgqd,bshd->bhgqs", q_grouped, k.astype(jnp.float32),
                            precision=precision)
        scores = jnp.where(owned[:, None, None, None, :], scores, -jnp.inf)
        state = online_softmax.update(
            *state, scores, v,
            lambda p, vals: jnp.einsum("bhgqs,bshd->bhgqd", p, vals, precision=precision))
        return state, fetch_keys(c + 1)

    state = online_softmax.initial_state((batch, hkv, group, 1), d)
    num_chunks = (jnp.max(lengths, initial=0) + step_tokens - 1) // step_tokens
    num_chunks = jnp.minimum(num_chunks, tables.shape[1] // pages_per_chunk)
    state, _ = jax.lax.fori_loop(0, num_chunks, body, (state, fetch_keys(0)))
    out, lse = online_softmax.finish(*state)
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
    rotating each chunk's keys to their positions (with `key_rope_inv_freq [D/2]`;
    keys and angles prefetched as in `paged_attention_xla`). Items run one after
    another; with no sequence of more than one row they are skipped. The default tiles
    ran fastest on a 2-core x86 host across one 512-token prompt, 16 prompts of 32 and
    4 of 120 packed together.
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

        def chunk_pages(c):
            return jax.lax.dynamic_slice_in_dim(table, c * pages_per_chunk, pages_per_chunk)

        def fetch_keys(c):
            """Chunk c's keys `[step, Hkv, D]` and their `(cos, sin)` `[step, D/2]`,
            prefetched as `paged_attention_xla` does."""
            k = k_pages[chunk_pages(c)].reshape(step_tokens, hkv, d)
            if key_rope_inv_freq is None:
                return k, None
            return k, rotary.angles(c * step_tokens + jnp.arange(step_tokens),
                                    key_rope_inv_freq)

        def body(c, carry):
            state, (k, angles) = carry
            k_pos = c * step_tokens + jnp.arange(step_tokens)
            if angles is not None:
                k = _rotate(k, *angles).astype(k.dtype)
            visible = k_pos[None, :] <= pos[:, None]
            seen = jnp.any(visible, axis=0)
            v = v_pages[chunk_pages(c)].reshape(step_tokens, hkv, d).transpose(1, 0, 2)
            v = jnp.where(seen[None, :, None], v.astype(jnp.float32), 0.0)
            scores = jnp.einsum("hgqd,hkd->hgqk", q_tile,
                                k.transpose(1, 0, 2).astype(jnp.float32), precision=precision)
            scores = jnp.where(visible, scores, -jnp.inf)
            state = online_softmax.update(
                *state, scores, v,
                lambda p, vals: jnp.einsum("hgqk,hkd->hgqd", p, vals, precision=precision))
            return state, fetch_keys(c + 1)

        state = online_softmax.initial_state((hkv, group, block_q), d)
        chunks = jnp.minimum(jax.lax.div(seen_keys + step_tokens - 1, step_tokens),
                             tables.shape[1] // pages_per_chunk)
        state, _ = jax.lax.fori_loop(0, chunks, body, (state, fetch_keys(0)))
        out, lse = online_softmax.finish(*state)
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
