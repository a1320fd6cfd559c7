"""Argument checks shared by every backend.

Each check raises `ValueError` that names the offending argument and the shapes or
dtypes it saw, before any tracing or kernel launch, so a bad call changes nothing.
"""

from __future__ import annotations

import jax.numpy as jnp

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_float(name: str, x) -> None:
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}"
        )


def _check_heads(q_heads: int, kv_heads: int, q_shape, kv_shape) -> None:
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"query heads ({q_heads}) must be a multiple of key/value heads "
            f"({kv_heads}); q shape {tuple(q_shape)}, k shape {tuple(kv_shape)}"
        )


def check_flash_args(q, k, v) -> None:
    """Checks q `[T, Hq, D]`, k and v `[S, Hkv, D]` for `flash_attention`, or the
    batched `[B, T, Hq, D]` and `[B, S, Hkv, D]`."""
    rank = q.ndim
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim not in (3, 4) or x.ndim != rank:
            raise ValueError(
                f"{name} must have rank 3 ([tokens, heads, head_dim]) or 4 ([batch, tokens, "
                f"heads, head_dim]), the same as q's, got shape {tuple(x.shape)}"
            )
        _check_float(name, x)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}"
        )
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share a dtype, got k {k.dtype} and v {v.dtype}")
    if rank == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    _check_heads(q.shape[-2], k.shape[-2], q.shape, k.shape)


def check_per_sequence(name: str, value, batch: int | None) -> None:
    """Checks that `q_offset` or `kv_length` is a scalar or, in a call batched over
    `batch` sequences (None: not batched), `[batch]`."""
    shape = tuple(getattr(value, "shape", ()))
    if batch is None and shape != ():
        raise ValueError(f"{name} must be a scalar for unbatched q (batch it, [B, T, H, D], "
                         f"for one per sequence), got shape {shape}")
    if batch is not None and shape not in ((), (batch,)):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},) (one per "
                         f"sequence), got shape {shape}")


def check_segment_ids(segment_ids, q, k):
    """Checks `flash_attention`'s `segment_ids` for q `[(B,) T, ...]` and k `[(B,) S, ...]`;
    returns None or the pair `(q_segment_ids, kv_segment_ids)` as int32 arrays."""
    if segment_ids is None:
        return None
    if not isinstance(segment_ids, (tuple, list)):
        if q.shape[:-2] != k.shape[:-2]:
            raise ValueError(
                f"one segment_ids array stands for queries and keys only when they are the "
                f"same tokens; q {tuple(q.shape)} and k {tuple(k.shape)} differ: give "
                f"(q_segment_ids, kv_segment_ids)")
        segment_ids = (segment_ids, segment_ids)
    if len(segment_ids) != 2:
        raise ValueError(f"segment_ids must be one array or a pair (q_segment_ids, "
                         f"kv_segment_ids), got {len(segment_ids)} items")
    pair = []
    for name, ids, x in (("q_segment_ids", segment_ids[0], q),
                         ("kv_segment_ids", segment_ids[1], k)):
        ids = jnp.asarray(ids)
        if ids.shape != x.shape[:-2]:
            raise ValueError(f"{name} must have shape {tuple(x.shape[:-2])} (one per "
                             f"token), got {tuple(ids.shape)}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {ids.dtype}")
        pair.append(ids.astype(jnp.int32))
    return tuple(pair)


def _check_query_and_pool(q, k_pages, v_pages, rows: str) -> None:
    """q `[rows, Hq, D]` and the pool `[num_blocks, block_size, Hkv, D]` x2."""
    if q.ndim != 3:
        raise ValueError(
            f"q must have rank 3 ([{rows}, heads, head_dim]), got shape {tuple(q.shape)}"
        )
    _check_float("q", q)
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must have rank 4 ([num_blocks, block_size, kv_heads, head_dim]), "
                f"got shape {tuple(x.shape)}"
            )
        _check_float(name, x)
    if k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must have the same shape, got {tuple(k_pages.shape)} "
            f"and {tuple(v_pages.shape)}"
        )
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(
            f"k_pages and v_pages must share a dtype, got {k_pages.dtype} and {v_pages.dtype}"
        )
    if q.shape[2] != k_pages.shape[3]:
        raise ValueError(
            f"q and k_pages must have the same head_dim, got q {tuple(q.shape)} and "
            f"k_pages {tuple(k_pages.shape)}"
        )
    _check_heads(q.shape[1], k_pages.shape[2], q.shape, k_pages.shape)


def _check_int_vector(name: str, x, size: int, meaning: str) -> None:
    if tuple(x.shape) != (size,):
        raise ValueError(f"{name} must have shape [{meaning}={size}], got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be int32, got dtype {x.dtype}")


def _check_tables(block_tables, rows: int, meaning: str) -> None:
    if block_tables.ndim != 2 or block_tables.shape[0] != rows:
        raise ValueError(
            f"block_tables must have shape [{meaning}={rows}, max_blocks], got "
            f"{tuple(block_tables.shape)}"
        )
    if not jnp.issubdtype(block_tables.dtype, jnp.integer):
        raise ValueError(f"block_tables must be int32, got dtype {block_tables.dtype}")


def check_paged_args(q, k_pages, v_pages, block_tables, lengths) -> None:
    """Checks the arguments of `paged_attention`.

    q `[B, Hq, D]`; k_pages, v_pages `[num_blocks, block_size, Hkv, D]`;
    block_tables int32 `[B, max_blocks]`; lengths int32 `[B]`.
    """
    _check_query_and_pool(q, k_pages, v_pages, "batch")
    _check_tables(block_tables, q.shape[0], "batch")
    _check_int_vector("lengths", lengths, q.shape[0], "batch")


def check_ragged_args(q, k_pages, v_pages, block_tables, query_starts, kv_lengths) -> None:
    """Checks the arguments of `ragged_paged_attention`.

    q `[T, Hq, D]`; the pool as for `paged_attention`; block_tables int32
    `[S, max_blocks]`; query_starts int32 `[S + 1]`; kv_lengths int32 `[S]`.
    """
    _check_query_and_pool(q, k_pages, v_pages, "tokens")
    if block_tables.ndim != 2 or block_tables.shape[0] < 1:
        raise ValueError(f"block_tables must have shape [sequences >= 1, max_blocks], got "
                         f"{tuple(block_tables.shape)}")
    seqs = block_tables.shape[0]
    _check_tables(block_tables, seqs, "sequences")
    _check_int_vector("query_starts", query_starts, seqs + 1, "sequences + 1")
    _check_int_vector("kv_lengths", kv_lengths, seqs, "sequences")


def check_merge_args(outs, lses) -> None:
    """Checks outs `[n, ..., D]` against lses `[n, ...]` for `merge_attention`."""
    if outs.ndim < 2:
        raise ValueError(f"outs must have shape [n, ..., D], got {tuple(outs.shape)}")
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(
            f"lses must have shape outs.shape[:-1] = {tuple(outs.shape[:-1])}, "
            f"got {tuple(lses.shape)}"
        )
    if outs.shape[0] == 0:
        raise ValueError("outs must hold at least one part, got n = 0")


def check_inv_freq(inv_freq, head_dim: int) -> None:
    """Checks the optional key RoPE inverse frequencies: `[head_dim / 2]`, head_dim even."""
    if inv_freq is None:
        return
    if head_dim % 2:
        raise ValueError(f"key_rope_inv_freq needs an even head_dim, got {head_dim}")
    if tuple(inv_freq.shape) != (head_dim // 2,):
        raise ValueError(
            f"key_rope_inv_freq must have shape [head_dim / 2] = ({head_dim // 2},), "
            f"got {tuple(inv_freq.shape)}"
        )

