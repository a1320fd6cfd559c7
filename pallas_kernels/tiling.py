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
