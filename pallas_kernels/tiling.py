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


def triton_tiles(queries: int, keys: int, head_dim: int, *, block_q: int, block_k: int,
                 kernel: str) -> tuple[int, int]:
    """`(block_q, block_k)` of a Triton flash kernel over `queries` x `keys`: shrunk to the
    next power of two above the problem (at least 16, Triton's smallest product), and
    ValueError naming `kernel` unless they and `head_dim` are powers of two."""
    block_q = min(block_q, max(16, 1 << max(queries - 1, 0).bit_length()))
    block_k = min(block_k, max(16, 1 << max(keys - 1, 0).bit_length()))
    for name, size in (("block_q", block_q), ("block_k", block_k), ("head_dim", head_dim)):
        if size & (size - 1):
            raise ValueError(f"the GPU {kernel} needs a power-of-two {name}, got {size}")
    return block_q, block_k


def mosaic_tiles(queries: int, keys: int, *, block_q: int, block_k: int,
                 kernel: str) -> tuple[int, int]:
    """`(block_q, block_k)` of a Mosaic flash kernel: shrunk to the problem rounded up to
    8 rows, and ValueError naming `kernel` unless they are multiples of 8."""
    block_q = min(block_q, -(-max(queries, 1) // 8) * 8)
    block_k = min(block_k, -(-max(keys, 1) // 8) * 8)
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size % 8:
            raise ValueError(f"the TPU {kernel} needs {name} to be a multiple of 8, got {size}")
    return block_q, block_k


def tile_visibility(q_first, k_first, *, block_q: int, block_k: int, kv_len, causal: bool):
    """bool `[block_q, block_k]`: which keys of a tile each query sees, the queries at
    positions `q_first + row` and the keys at `k_first + column`: keys before `kv_len`,
    and with `causal` not after the query."""
    q_pos = q_first + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    k_pos = k_first + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    visible = k_pos < kv_len
    return visible & (k_pos <= q_pos) if causal else visible


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


def segment_operands(segment_ids, q_rows: int, kv_rows: int):
    """int32 `(q_segment_ids [q_rows], kv_segment_ids [kv_rows])` for a kernel, padded
    with -1 (padding rows' results are dropped); zeros stand in when `segment_ids` is
    None (the kernel is then built not to read them)."""
    if segment_ids is None:
        return jnp.zeros((q_rows,), jnp.int32), jnp.zeros((kv_rows,), jnp.int32)
    q_ids, kv_ids = segment_ids
    return (jnp.pad(q_ids, (0, q_rows - q_ids.shape[0]), constant_values=-1),
            jnp.pad(kv_ids, (0, kv_rows - kv_ids.shape[0]), constant_values=-1))


def ragged_rows(query_starts, kv_lengths, num_tokens: int):
    """Where each token of a ragged batch belongs.

    Sequence s owns tokens `query_starts[s] <= t < query_starts[s + 1]` (int32 `[S + 1]`,
    non-decreasing) and holds `kv_lengths[s]` keys including them, so its tokens are the
    last of its keys: token t sits at position `kv_lengths[s] - (query_starts[s + 1] - t)`.
    Returns int32 `(sequence [T], position [T])`; a token past `query_starts[S]` (padding)
    gets sequence S and position -1.
    """
    token = jnp.arange(num_tokens, dtype=jnp.int32)
    sequence = jnp.searchsorted(query_starts[1:], token, side="right").astype(jnp.int32)
    padding = token >= query_starts[-1]
    safe = jnp.minimum(sequence, kv_lengths.shape[0] - 1)
    position = kv_lengths[safe] - (query_starts[safe + 1] - token)
    return sequence, jnp.where(padding, -1, position).astype(jnp.int32)


def ragged_work_items(query_starts, *, num_tiles: int, block_q: int):
    """The (query tile, sequence) pairs a ragged batch's attention is split into.

    Tokens are cut into `num_tiles` tiles of `block_q`; a tile meets every sequence that
    owns one of its tokens, so a tile holding the end of one sequence and the start of
    the next gives two items. There are at most `num_tiles + S - 1` items (S sequences;
    the static count every backend's grid is sized by); items past the real ones have
    `valid` False. Returns int32 `(tile [W], sequence [W])` and bool `valid [W]`.
    """
    num_seqs = query_starts.shape[0] - 1
    total = query_starts[-1]
    ends = query_starts[1:]
    first_token = jnp.arange(num_tiles, dtype=jnp.int32) * block_q
    last_token = jnp.minimum(first_token + block_q, total) - 1
    first_seq = jnp.searchsorted(ends, first_token, side="right").astype(jnp.int32)
    last_seq = jnp.searchsorted(ends, last_token, side="right").astype(jnp.int32)
    count = jnp.where(first_token < total, last_seq - first_seq + 1, 0)
    done = jnp.cumsum(count)
    item = jnp.arange(num_tiles + num_seqs - 1, dtype=jnp.int32)
    tile = jnp.minimum(jnp.searchsorted(done, item, side="right"), num_tiles - 1)
    sequence = first_seq[tile] + item - (done[tile] - count[tile])
    valid = item < done[-1]
    return (tile.astype(jnp.int32), jnp.where(valid, sequence, 0).astype(jnp.int32), valid)


def scatter_work_items(outs, lses, tile, valid, num_tokens: int):
    """Puts the items' partial results back in token order.

    outs `[W, block_q, Hq, D]` float32, lses `[W, block_q, Hq]` (rows an item does not own
    hold out 0, lse -inf), `tile`, `valid` as `ragged_work_items` gives them. Each token
    is owned by exactly one item, so adding outputs and taking the max of LSEs per tile
    is exact. Returns `(out [T, Hq, D] float32, lse [T, Hq] float32)`.
    """
    num_items, block_q = lses.shape[:2]
    num_tiles = -(-num_tokens // block_q)
    outs = jnp.where(valid[:, None, None, None], outs, 0.0)
    lses = jnp.where(valid[:, None, None], lses, -jnp.inf)
    out = jnp.zeros((num_tiles, *outs.shape[1:]), jnp.float32).at[tile].add(outs)
    lse = jnp.full((num_tiles, *lses.shape[1:]), -jnp.inf, jnp.float32).at[tile].max(lses)
    rows = num_tiles * block_q
    return (out.reshape(rows, *outs.shape[2:])[:num_tokens],
            lse.reshape(rows, *lses.shape[2:])[:num_tokens])


def item_positions(query_starts, kv_lengths, *, num_tokens: int, block_q: int):
    """The work items of a ragged batch and the positions of their rows.

    Returns `tile [W]`, `sequence [W]`, `valid [W]` as `ragged_work_items` gives
    them; int32 `positions [W, block_q]`: the position of each row of the item's tile that
    the item's sequence owns, -1 for every other row (and every row of an invalid item);
    and int32 `keys [W]`: how many of the sequence's keys the item sees (its last row's
    position + 1; 0 when it owns no row).
    """
    num_tiles = -(-num_tokens // block_q)
    sequence, position = ragged_rows(query_starts, kv_lengths, num_tokens)
    tile, item_seq, valid = ragged_work_items(query_starts, num_tiles=num_tiles,
                                                     block_q=block_q)
    extra = num_tiles * block_q - num_tokens
    row_seq = jnp.pad(sequence, (0, extra)).reshape(num_tiles, block_q)
    row_pos = jnp.pad(position, (0, extra), constant_values=-1).reshape(num_tiles, block_q)
    owned = (row_seq[tile] == item_seq[:, None]) & valid[:, None]
    positions = jnp.where(owned, row_pos[tile], -1)
    keys = jnp.maximum(jnp.max(positions, axis=1) + 1, 0)
    return tile, item_seq, valid, positions, keys
