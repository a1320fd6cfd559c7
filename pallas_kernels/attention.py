"""Public attention entry points: validate, pick the backend, run.

Every function returns the output together with the natural-log log-sum-exp (LSE) of the
scaled scores, so results over any split of the KV cache merge exactly with
`merge_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import backend as backends
from pallas_kernels.flash_backward import flash_attention_backward
from pallas_kernels.flash_gpu import flash_attention_gpu
from pallas_kernels.flash_tpu import flash_attention_tpu
from pallas_kernels.paged_gpu import paged_attention_gpu
from pallas_kernels.paged_tpu import paged_attention_tpu
from pallas_kernels.ragged_gpu import ragged_paged_attention_gpu
from pallas_kernels.ragged_tpu import ragged_paged_attention_tpu
from pallas_kernels.reference import (
    flash_attention_reference,
    paged_attention_reference,
    ragged_paged_attention_reference,
)
from pallas_kernels.validation import (
    check_flash_args,
    check_inv_freq,
    check_paged_args,
    check_per_sequence,
    check_ragged_args,
    check_segment_ids,
)
from pallas_kernels.xla_attention import (
    flash_attention_xla,
    paged_attention_xla,
    ragged_paged_attention_xla,
)


def _empty_result(rows: tuple[int, ...], head_dim: int, dtype):
    return (jnp.zeros((*rows, head_dim), dtype),
            jnp.full(rows, -jnp.inf, jnp.float32))


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "choice", "tiles"))
def _flash(q, k, v, q_offset, kv_length, inv_freq, segments, *, causal, sm_scale, choice,
           tiles):
    kwargs = dict(causal=causal, q_offset=q_offset, kv_length=kv_length, sm_scale=sm_scale,
                  key_rope_inv_freq=inv_freq, segment_ids=segments)
    tiles = dict(tiles)
    if choice.kind == "reference":
        return flash_attention_reference(q, k, v, **kwargs)
    if choice.kind == "xla":
        return flash_attention_xla(q, k, v, **kwargs, **tiles)
    if choice.kind == "pallas_gpu":
        return flash_attention_gpu(q, k, v, **kwargs, **tiles, interpret=choice.interpret)
    return flash_attention_tpu(q, k, v, **kwargs, **tiles, interpret=choice.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _differentiable_flash(q, k, v, q_offset, kv_length, inv_freq, segments, causal, sm_scale,
                          choice, tiles):
    """`_flash`, whose gradient is `flash_attention_backward` of its saved results."""
    return _flash(q, k, v, q_offset, kv_length, inv_freq, segments, causal=causal,
                  sm_scale=sm_scale, choice=choice, tiles=tiles)


def _flash_forward(q, k, v, q_offset, kv_length, inv_freq, segments, causal, sm_scale, choice,
                   tiles):
    out, lse = _flash(q, k, v, q_offset, kv_length, inv_freq, segments, causal=causal,
                      sm_scale=sm_scale, choice=choice, tiles=tiles)
    return (out, lse), (q, k, v, q_offset, kv_length, inv_freq, segments, out, lse)


def _flash_backward(causal, sm_scale, choice, tiles, saved, cotangents):
    q, k, v, q_offset, kv_length, inv_freq, segments, out, lse = saved
    d_q, d_k, d_v = flash_attention_backward(
        q, k, v, out, lse, *cotangents, causal=causal, q_offset=q_offset,
        kv_length=kv_length, sm_scale=sm_scale, key_rope_inv_freq=inv_freq,
        segment_ids=segments, kind=choice.kind, interpret=choice.interpret, tiles=tiles)
    # Positions, frequencies and segments are not trained.
    return d_q, d_k, d_v, None, None, None, None


_differentiable_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, *, causal: bool = True, q_offset=0, kv_length=None,
                    segment_ids=None, sm_scale: float | None = None, backend: str = "auto",
                    key_rope_inv_freq=None, block_q: int | None = None,
                    block_k: int | None = None):
    """Prefill attention over a contiguous KV cache, with its LSE.

    Args:
      q: `[T, Hq, D]` queries; row t is at absolute position `q_offset + t`. Or batched,
        `[B, T, Hq, D]`: each sequence on its own, as `jax.nn.dot_product_attention`
        takes them (and `jax.vmap` over the unbatched form gives the same).
      k, v: `[S, Hkv, D]` (batched: `[B, S, Hkv, D]`) keys and values; row s is at
        position s. `Hq % Hkv == 0`.
      causal: hide keys at positions `s > q_offset + t`.
      q_offset: int or int32 array, scalar or (batched) `[B]`; the position of the first
        query (chunked prefill attends the cached prefix and itself).
      kv_length: int or int32 array, scalar or (batched) `[B]`; keys at `s >= kv_length`
        are hidden (may hold anything, NaN included): a padded batch's per-sequence
        lengths. Defaults to S.
      segment_ids: None, or int32 `(q_segment_ids [T], kv_segment_ids [S])` (batched:
        `[B, T]`, `[B, S]`): a query sees only keys of its own segment, as in a packed
        batch of several documents per row. One array `[T]` (or `[B, T]`) stands for
        both when queries and keys are the same tokens (T == S).
      sm_scale: score scale, default `D ** -0.5`.
      backend: see `pallas_kernels.backend`.
      key_rope_inv_freq: `[D/2]` float32 or None. Given, keys are taken as stored without
        position and key s is rotated to position s (half-split RoPE, see
        `pallas_kernels.rotary`) inside the kernel; q must already be rotated.
      block_q, block_k: tile sizes; `None` keeps the backend's default.

    Returns:
      `(out [T, Hq, D] in q's dtype, lse [T, Hq] float32)`, batched `[B, T, Hq, D]` and
      `[B, T, Hq]`. A row that sees no key has out = 0 and lse = -inf. Both are
      differentiable in q, k and v on every backend: the backward pass recomputes the
      probabilities from the saved LSE (`pallas_kernels.flash_backward`), in Pallas
      kernels on the Pallas backends.
    """
    check_flash_args(q, k, v)
    check_inv_freq(key_rope_inv_freq, q.shape[-1])
    choice = backends.resolve(backend)
    *rows, hq, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if q.shape[-3] == 0 or k.shape[-3] == 0:
        return _empty_result((*rows, hq), d, q.dtype)
    kv_length = k.shape[-3] if kv_length is None else kv_length
    tiles = tuple((name, size) for name, size in (("block_q", block_q), ("block_k", block_k))
                  if size is not None)

    segments = check_segment_ids(segment_ids, q, k)

    def attend(q, k, v, q_offset, kv_length, segments):
        return _differentiable_flash(q, k, v, q_offset, kv_length, key_rope_inv_freq,
                                     segments, bool(causal), sm_scale, choice, tiles)

    q_offset = jnp.asarray(q_offset, jnp.int32)
    kv_length = jnp.asarray(kv_length, jnp.int32)
    if q.ndim == 3:
        check_per_sequence("q_offset", q_offset, None)
        check_per_sequence("kv_length", kv_length, None)
        return attend(q, k, v, q_offset, kv_length, segments)
    batch = q.shape[0]
    check_per_sequence("q_offset", q_offset, batch)
    check_per_sequence("kv_length", kv_length, batch)
    return jax.vmap(attend)(q, k, v, jnp.broadcast_to(q_offset, (batch,)),
                            jnp.broadcast_to(kv_length, (batch,)), segments)


def sanitize_block_tables(block_tables, lengths, *, num_blocks: int, block_size: int):
    """Makes table entries past each sequence's last page point at block 0.

    Entries a sequence does not own may hold anything (-1, garbage); kernels that fetch
    pages through the table must never be handed an out-of-range block id. Lengths are
    clipped to `[0, max_blocks * block_size]`.

    Returns `(tables int32 [B, max_blocks], lengths int32 [B])`.
    """
    max_blocks = block_tables.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_blocks * block_size)
    pages = (lengths + block_size - 1) // block_size
    owned = jnp.arange(max_blocks, dtype=jnp.int32)[None, :] < pages[:, None]
    tables = jnp.where(owned, jnp.clip(block_tables.astype(jnp.int32), 0, num_blocks - 1), 0)
    return tables, lengths


@functools.partial(jax.jit, static_argnames=("sm_scale", "choice", "num_splits",
                                             "pages_per_step"))
def _paged(q, k_pages, v_pages, block_tables, lengths, inv_freq, block_positions, *,
           sm_scale, choice, num_splits, pages_per_step):
    tables, lengths = sanitize_block_tables(
        block_tables, lengths, num_blocks=k_pages.shape[0], block_size=k_pages.shape[1])
    args = (q, k_pages, v_pages, tables, lengths)
    kwargs = dict(sm_scale=sm_scale, key_rope_inv_freq=inv_freq)
    if block_positions is not None:
        kwargs["block_positions"] = block_positions.astype(jnp.int32)
    if choice.kind == "reference":
        return paged_attention_reference(*args, **kwargs)
    if choice.kind == "xla":
        return paged_attention_xla(*args, **kwargs)
    if num_splits is not None:
        kwargs["num_splits"] = num_splits
    if choice.kind == "pallas_gpu":
        return paged_attention_gpu(*args, **kwargs, pages_per_step=pages_per_step or 1,
                                   interpret=choice.interpret)
    return paged_attention_tpu(*args, **kwargs, interpret=choice.interpret)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *,
                    sm_scale: float | None = None, backend: str = "auto",
                    key_rope_inv_freq=None, num_splits: int | None = None,
                    block_positions=None, pages_per_step: int | None = None):
    """Decode attention, one query per sequence, over a paged KV cache, with its LSE.

    Args:
      q: `[B, Hq, D]`, the new token of each sequence.
      k_pages, v_pages: `[num_blocks, block_size, Hkv, D]` the block pool. Slots a
        sequence does not own may hold anything, NaN included.
      block_tables: int32 `[B, max_blocks]`; sequence b's token i lives in block
        `block_tables[b, i // block_size]`, slot `i % block_size`. Entries past the last
        block are never read.
      lengths: int32 `[B]`, tokens per sequence (0 allowed).
      sm_scale: score scale, default `D ** -0.5`.
      backend: see `pallas_kernels.backend`.
      key_rope_inv_freq: `[D/2]` float32 or None. Given, the pool holds keys without
        position and token i's key is rotated to position i (half-split RoPE) inside the
        kernel; q must already be rotated to its own position.
      num_splits: split-K factor for the Pallas kernels; `None` picks one.
      block_positions: int32 `[B, max_blocks]` or None: the position of the first token
        of each table entry, for `key_rope_inv_freq` (default `j * block_size` for entry
        j). A table may then list any subset of a sequence's blocks, in any order, each
        full but the last: the keys still take their true positions (DistAttention
        attends each device's share of a sequence this way).
      pages_per_step: pages the Pallas GPU kernel reads per step of its loop (more
        memory in flight per program); `None`: one. Other backends ignore it.

    Returns:
      `(out [B, Hq, D] in q's dtype, lse [B, Hq] float32)`; a sequence of length 0 gets
      out = 0 and lse = -inf.
    """
    check_paged_args(q, k_pages, v_pages, block_tables, lengths)
    check_inv_freq(key_rope_inv_freq, q.shape[-1])
    if block_positions is not None and (block_positions.shape != block_tables.shape or not
                                        jnp.issubdtype(block_positions.dtype, jnp.integer)):
        raise ValueError(f"block_positions must be integers shaped like block_tables "
                         f"{tuple(block_tables.shape)}, got {tuple(block_positions.shape)} "
                         f"{block_positions.dtype}")
    choice = backends.resolve(backend)
    batch, hq, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if batch == 0 or block_tables.shape[1] == 0 or k_pages.shape[0] == 0:
        return _empty_result((batch, hq), d, q.dtype)
    return _paged(q, k_pages, v_pages, block_tables, lengths, key_rope_inv_freq,
                  block_positions, sm_scale=sm_scale, choice=choice, num_splits=num_splits,
                  pages_per_step=pages_per_step)


@functools.partial(jax.jit, static_argnames=("sm_scale", "choice", "block_q"))
def _ragged(q, k_pages, v_pages, block_tables, query_starts, kv_lengths, inv_freq, *,
            sm_scale, choice, block_q):
    tables, kv_lengths = sanitize_block_tables(
        block_tables, kv_lengths, num_blocks=k_pages.shape[0], block_size=k_pages.shape[1])
    args = (q, k_pages, v_pages, tables, query_starts.astype(jnp.int32), kv_lengths)
    kwargs = dict(sm_scale=sm_scale, key_rope_inv_freq=inv_freq)
    if choice.kind == "reference":
        return ragged_paged_attention_reference(*args, **kwargs)
    if block_q is not None:
        kwargs["block_q"] = block_q
    if choice.kind == "xla":
        return ragged_paged_attention_xla(*args, **kwargs)
    if choice.kind == "pallas_gpu":
        return ragged_paged_attention_gpu(*args, **kwargs, interpret=choice.interpret)
    return ragged_paged_attention_tpu(*args, **kwargs, interpret=choice.interpret)


def ragged_paged_attention(q, k_pages, v_pages, block_tables, query_starts, kv_lengths, *,
                           sm_scale: float | None = None, backend: str = "auto",
                           key_rope_inv_freq=None, block_q: int | None = None):
    """Attention of a ragged batch (query runs of many sequences packed into one array)
    over a paged KV cache, with its LSE: chunked prefills and decodes in one call.

    Args:
      q: `[T, Hq, D]`. Sequence s owns rows `query_starts[s] <= t < query_starts[s + 1]`,
        its newest tokens: row t is at position `kv_lengths[s] - (query_starts[s + 1] - t)`
        and sees that sequence's keys up to its own position (causal). Rows from
        `query_starts[S]` on are padding.
      k_pages, v_pages: `[num_blocks, block_size, Hkv, D]` the block pool, holding every
        key of each sequence, this call's included. Slots no sequence owns may hold
        anything, NaN included.
      block_tables: int32 `[S, max_blocks]`; sequence s's token i lives in block
        `block_tables[s, i // block_size]`, slot `i % block_size`. Entries past its last
        block are never read.
      query_starts: int32 `[S + 1]`, non-decreasing from 0: the cumulative query counts.
        A sequence with no rows (padding) is allowed.
      kv_lengths: int32 `[S]`, keys per sequence (its rows included).
      sm_scale: score scale, default `D ** -0.5`.
      backend: see `pallas_kernels.backend`.
      key_rope_inv_freq: `[D/2]` float32 or None. Given, the pool holds keys without
        position and token i's key is rotated to position i inside the kernel; q must
        already be rotated to its own positions.
      block_q: query rows per tile; `None` keeps the backend's default.

    Returns:
      `(out [T, Hq, D] in q's dtype, lse [T, Hq] float32)`; padding rows, and rows that
      see no key, get out = 0 and lse = -inf.
    """
    check_ragged_args(q, k_pages, v_pages, block_tables, query_starts, kv_lengths)
    check_inv_freq(key_rope_inv_freq, q.shape[-1])
    choice = backends.resolve(backend)
    t, hq, d = q.shape
    sm_scale = float(d ** -0.5 if sm_scale is None else sm_scale)
    if t == 0 or block_tables.shape[1] == 0 or k_pages.shape[0] == 0:
        return _empty_result((t, hq), d, q.dtype)
    return _ragged(q, k_pages, v_pages, block_tables, query_starts, kv_lengths,
                   key_rope_inv_freq, sm_scale=sm_scale, choice=choice, block_q=block_q)
