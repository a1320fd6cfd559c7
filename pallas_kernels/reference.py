"""Plain dense attention: the oracle every other backend is compared with.

These functions materialise the full `[Hq, T, S]` score matrix in float32. They are
simple on purpose; use them for testing and for small problems only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import rotary, tiling


def _masked_softmax_attention(q, k, v, visible, sm_scale: float):
    """q `[T, Hq, D]`, k/v `[S, Hkv, D]`, visible bool `[T, S]` -> (out, lse).

    A key that is not visible contributes nothing, even when it holds NaN.
    """
    group = q.shape[1] // k.shape[1]
    k = jnp.repeat(k.astype(jnp.float32), group, axis=1)
    v = jnp.repeat(v.astype(jnp.float32), group, axis=1)
    v = jnp.where(jnp.any(visible, axis=0)[:, None, None], v, 0.0)
    highest = jax.lax.Precision.HIGHEST
    scores = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), k, precision=highest) * sm_scale
    scores = jnp.where(visible[None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1)
    shift = jnp.where(jnp.isneginf(row_max), 0.0, row_max)
    probs = jnp.exp(scores - shift[..., None])
    total = jnp.sum(probs, axis=-1)
    seen = total > 0
    out = jnp.einsum("hts,shd->thd", probs, v, precision=highest) / jnp.where(seen, total, 1.0).T[..., None]
    lse = jnp.where(seen, shift + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse.T


def flash_attention_reference(q, k, v, *, causal, q_offset, kv_length, sm_scale,
                              key_rope_inv_freq=None, segment_ids=None):
    """Dense prefill attention; arguments as `pallas_kernels.flash_attention`
    (`segment_ids` None or the checked pair)."""
    t, s = q.shape[0], k.shape[0]
    if key_rope_inv_freq is not None:
        k = rotary.rotate(k, jnp.arange(s), key_rope_inv_freq).astype(k.dtype)
    q_pos = q_offset + jnp.arange(t)[:, None]
    k_pos = jnp.arange(s)[None, :]
    visible = k_pos < kv_length
    if causal:
        visible = visible & (k_pos <= q_pos)
    if segment_ids is not None:
        visible = visible & (segment_ids[0][:, None] == segment_ids[1][None, :])
    return _masked_softmax_attention(q, k, v, visible, sm_scale)


def paged_attention_reference(q, k_pages, v_pages, block_tables, lengths, *, sm_scale,
                              key_rope_inv_freq=None, block_positions=None):
    """Dense decode attention over gathered pages; arguments as `paged_attention`."""
    num_blocks, block_size = k_pages.shape[:2]
    max_blocks = block_tables.shape[1]
    if block_positions is None:
        block_positions = jnp.broadcast_to(jnp.arange(max_blocks) * block_size,
                                           block_tables.shape)
    key_positions = (block_positions[:, :, None] + jnp.arange(block_size)).reshape(
        block_tables.shape[0], -1)
    owned = jnp.arange(max_blocks)[None, :] * block_size < lengths[:, None]
    tables = jnp.where(owned, jnp.clip(block_tables, 0, num_blocks - 1), 0)
    outs, lses = [], []
    for b in range(q.shape[0]):
        k = k_pages[tables[b]].reshape(max_blocks * block_size, *k_pages.shape[2:])
        if key_rope_inv_freq is not None:
            k = rotary.rotate(k, key_positions[b], key_rope_inv_freq).astype(k.dtype)
        v = v_pages[tables[b]].reshape(max_blocks * block_size, *v_pages.shape[2:])
        visible = (jnp.arange(max_blocks * block_size) < lengths[b])[None, :]
        out, lse = _masked_softmax_attention(q[b][None], k, v, visible, sm_scale)
        outs.append(out[0])
        lses.append(lse[0])
    return jnp.stack(outs), jnp.stack(lses)


def ragged_paged_attention_reference(q, k_pages, v_pages, block_tables, query_starts,
                                     kv_lengths, *, sm_scale, key_rope_inv_freq=None):
    """Dense ragged attention over gathered pages; arguments as `ragged_paged_attention`
    (`block_tables` sanitised). Gathers every sequence's whole table for every token:
    `[T, max_blocks * block_size]` scores per head."""
    num_blocks, block_size = k_pages.shape[:2]
    max_blocks = block_tables.shape[1]
    sequence, position = tiling.ragged_rows(query_starts, kv_lengths, q.shape[0])
    safe = jnp.minimum(sequence, block_tables.shape[0] - 1)
    keys = jnp.arange(max_blocks * block_size)
    k = k_pages[block_tables].reshape(block_tables.shape[0], -1, *k_pages.shape[2:])
    v = v_pages[block_tables].reshape(block_tables.shape[0], -1, *v_pages.shape[2:])
    if key_rope_inv_freq is not None:
        k = rotary.rotate(k, jnp.broadcast_to(keys, k.shape[:2]), key_rope_inv_freq
                          ).astype(k.dtype)

    def one_token(q_row, seq, pos):
        visible = (keys <= pos)[None, :]  # pos < kv_length; padding (-1) sees nothing
        out, lse = _masked_softmax_attention(q_row[None], k[seq], v[seq], visible, sm_scale)
        return out[0], lse[0]

    return jax.vmap(one_token)(q, safe, position)
