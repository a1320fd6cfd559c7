"""Tile arithmetic shared by the XLA path and the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_to(x, multiple: int, axis: int = 0):
    """Zero-pads `axis` of `x` up to a multiple of `multiple`."""
    size = x.shape[axis]
    padded = -(-size // multiple) * multiple
    if padded == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, padded - size)
    return jnp.pad(x, widths)


def visible_kv_blocks(tile_index, *, block_q, block_k, causal, q_offset, kv_len):
    """Number of key tiles that query tile `tile_index` can see (int32, may be traced).

    Query row t of the tile is at position `q_offset + tile_index * block_q + t`; with
    `causal` it sees keys up to that position, and never keys at or past `kv_len`.
    Truncating division on a non-negative value: it lowers to a plain integer divide in
    every kernel backend (floor division would need a sign correction).
    """
    end = kv_len
    if causal:
        end = jnp.minimum(end, q_offset + (tile_index + 1) * block_q)
    end = jnp.maximum(end, 0)
    return jax.lax.div(end + block_k - 1, block_k)


def head_major(q, k, v, *, block_q: int, block_k: int):
    """Pads queries to a multiple of `block_q` and keys to one of `block_k`, heads first.

    q `[T, Hq, D]`, k/v `[S, Hkv, D]` -> q `[Hq, T_pad, D]`, k/v `[Hkv, S_pad, D]`.
    """
    q_h = pad_to(q, block_q).transpose(1, 0, 2)
    return q_h, pad_to(k, block_k).transpose(1, 0, 2), pad_to(v, block_k).transpose(1, 0, 2)


def prefill_bounds(q_offset, kv_length, num_keys: int):
    """int32 `[2]`: the first query's position and the visible key count (clipped to S)."""
    return jnp.stack([jnp.asarray(q_offset, jnp.int32),
                      jnp.clip(jnp.asarray(kv_length, jnp.int32), 0, num_keys)])
