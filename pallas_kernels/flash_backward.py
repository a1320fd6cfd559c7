"""The backward pass of `flash_attention`, from the forward's saved log-sum-exp, for
every backend: Pallas kernels on the Pallas backends (`flash_backward_gpu`,
`flash_backward_tpu`), a blockwise loop in XLA otherwise.

FlashAttention-2's recomputation: with the forward's output O and LSE L kept, a block
of keys' probabilities are P_j = exp(scale * Q K_j^T - L) (zero where a key is hidden),
with no second softmax pass and no `[T, S]` matrix, a tile of queries and keys at a
time. With dO and dL the cotangents of O and L:

    dV_j = P_j^T dO
    dS_j = P_j * (dO V_j^T - rowsum(dO * O) + dL)
    dQ  += scale * dS_j K_j
    dK_j = scale * dS_j^T Q

summed over the query heads that share a key head (GQA). dL makes the LSE output
differentiable, so partials merged by `merge_attention` differentiate exactly. With
RoPE applied inside, K_j are the rotated keys and dK_j is rotated back: a rotation's
transpose is the rotation by the negative angle. The operands every implementation
shares are prepared here once: keys rotated and hidden rows zeroed (they may hold NaN),
`delta = rowsum(dO * O)`, and L with `-inf` (a row that saw no key) as `+inf`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import rotary
from pallas_kernels.flash_backward_gpu import flash_backward_gpu
from pallas_kernels.flash_backward_tpu import flash_backward_tpu
from pallas_kernels.tile_matmul import precision_for
from pallas_kernels.tiling import prefill_bounds, segment_operands

BLOCK = 256  # query and key rows per tile of the XLA backward


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "kind", "interpret",
                                             "tiles"))
def flash_attention_backward(q, k, v, out, lse, d_out, d_lse, *, causal, q_offset,
                             kv_length, sm_scale, key_rope_inv_freq=None, segment_ids=None,
                             kind: str = "xla", interpret: bool = False, tiles=()):
    """Cotangents `(dq, dk, dv)` of `flash_attention(q, k, v, ...)` (arguments as
    there) whose results were `out [T, Hq, D]` and `lse [T, Hq]`, for the output
    cotangents `d_out [T, Hq, D]` and `d_lse [T, Hq]`. Each has its primal's shape and
    dtype; keys and values past `kv_length` (which may hold NaN) get zero.

    `segment_ids` is None or the checked pair `(q_segment_ids [T], kv_segment_ids [S])`.
    `kind` is the resolved backend ("pallas_gpu", "pallas_tpu": their kernels, run
    interpreted with `interpret`; anything else: XLA); `tiles` the forward's
    `(name, size)` tile overrides (`block_q`, `block_k`), used here too.
    """
    s = k.shape[0]
    stored = (jnp.arange(s) < kv_length)[:, None, None]  # rows holding keys, not junk
    keys = jnp.where(stored, k, jnp.zeros_like(k))
    values = jnp.where(stored, v, jnp.zeros_like(v))
    if key_rope_inv_freq is not None:  # rotated as the forward rotates, in k's dtype
        keys = rotary.rotate(keys, jnp.arange(s), key_rope_inv_freq).astype(k.dtype)
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    shift = jnp.where(jnp.isneginf(lse), jnp.inf, lse).astype(jnp.float32)
    d_lse = d_lse.astype(jnp.float32)
    if kind in ("pallas_gpu", "pallas_tpu"):
        kernel = flash_backward_gpu if kind == "pallas_gpu" else flash_backward_tpu
        d_q, d_k, d_v = kernel(q, keys, values, d_out, shift, delta, d_lse,
                               prefill_bounds(q_offset, kv_length, s), causal=causal,
                               sm_scale=sm_scale, segment_ids=segment_ids,
                               interpret=interpret, **dict(tiles))
    else:
        d_q, d_k, d_v = _blockwise_backward(q, keys, values, d_out, shift, delta, d_lse,
                                            causal=causal, q_offset=q_offset,
                                            kv_length=kv_length, sm_scale=sm_scale,
                                            segment_ids=segment_ids, **dict(tiles))
    if key_rope_inv_freq is not None:
        d_k = rotary.rotate(d_k, -jnp.arange(s), key_rope_inv_freq)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _blockwise_backward(q, keys, values, d_out, shift, delta, d_lse, *, causal, q_offset,
                        kv_length, sm_scale, segment_ids=None, block_q: int = BLOCK,
                        block_k: int = BLOCK):
    """The XLA backward: a loop over key blocks, and inside it over the query blocks
    that see the key block (causal: from the diagonal on; none past `kv_length`), with
    `[Hkv, block_q * Hq / Hkv, block_k]` scores at a time as head-batched products.
    Operands as `flash_backward_gpu` takes them; returns float32 `(dq, dk, dv)`."""
    t, hq, d = q.shape
    s, hkv, _ = keys.shape
    group = hq // hkv
    block_q, block_k = min(block_q, t), min(block_k, s)
    q_tiles, k_tiles = -(-t // block_q), -(-s // block_k)
    rows = block_q * group  # a query block's rows: its tokens times the group's heads
    kv_length = jnp.minimum(kv_length, s)
    precision = precision_for(q.dtype)  # as the forward multiplies: no TF32 for float32

    def head_major_rows(x, fill=0.0):  # [T, Hq, ...] -> [Hkv, T_pad * group, ...]
        x = jnp.pad(x.astype(jnp.float32), [(0, q_tiles * block_q - t)] +
                    [(0, 0)] * (x.ndim - 1), constant_values=fill)
        x = x.reshape(q_tiles * block_q, hkv, group, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(hkv, q_tiles * rows, *x.shape[3:])

    queries, d_out = head_major_rows(q), head_major_rows(d_out)
    shift, delta, d_lse = head_major_rows(shift, jnp.inf), head_major_rows(delta), \
        head_major_rows(d_lse)
    keys, values = (jnp.pad(x.astype(jnp.float32), ((0, k_tiles * block_k - s), (0, 0), (0, 0)))
                    .transpose(1, 0, 2) for x in (keys, values))
    q_segments, k_segments = segment_operands(segment_ids, q_tiles * block_q, k_tiles * block_k)
    q_segments = jnp.repeat(q_segments, group)  # per row: token-major, then the group

    def key_block(j, grads):
        d_q, d_k, d_v = grads
        k_j = jax.lax.dynamic_slice_in_dim(keys, j * block_k, block_k, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(values, j * block_k, block_k, axis=1)
        k_pos = j * block_k + jnp.arange(block_k)
        k_segment = jax.lax.dynamic_slice_in_dim(k_segments, j * block_k, block_k)
        first = jax.lax.div(jnp.maximum(j * block_k - q_offset, 0), block_q) if causal else 0
        last = jnp.where(j * block_k < kv_length, q_tiles, first)

        def query_block(i, grads):
            d_q, d_k_j, d_v_j = grads
            q_i, do_i, shift_i, delta_i, dlse_i = (
                jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1)
                for x in (queries, d_out, shift, delta, d_lse))
            q_pos = q_offset + i * block_q + jnp.arange(rows) // group
            visible = k_pos[None, :] < kv_length
            if causal:
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            if segment_ids is not None:
                q_segment = jax.lax.dynamic_slice_in_dim(q_segments, i * rows, rows)
                visible = visible & (q_segment[:, None] == k_segment[None, :])
            scores = jnp.einsum("hrd,hbd->hrb", q_i, k_j, precision=precision) * sm_scale
            probs = jnp.where(visible, jnp.exp(scores - shift_i[..., None]), 0.0)
            d_probs = jnp.einsum("hrd,hbd->hrb", do_i, v_j, precision=precision)
            d_scores = probs * (d_probs - delta_i[..., None] + dlse_i[..., None]) * sm_scale
            d_q_i = jax.lax.dynamic_slice_in_dim(d_q, i * rows, rows, axis=1)
            d_q = jax.lax.dynamic_update_slice_in_dim(
                d_q, d_q_i + jnp.einsum("hrb,hbd->hrd", d_scores, k_j, precision=precision),
                i * rows, axis=1)
            return (d_q,
                    d_k_j + jnp.einsum("hrb,hrd->hbd", d_scores, q_i, precision=precision),
                    d_v_j + jnp.einsum("hrb,hrd->hbd", probs, do_i, precision=precision))

        d_q, d_k_j, d_v_j = jax.lax.fori_loop(first, last, query_block,
                                              (d_q, jnp.zeros_like(k_j), jnp.zeros_like(v_j)))
        return (d_q, jax.lax.dynamic_update_slice_in_dim(d_k, d_k_j, j * block_k, axis=1),
                jax.lax.dynamic_update_slice_in_dim(d_v, d_v_j, j * block_k, axis=1))

    d_q, d_k, d_v = jax.lax.fori_loop(
        0, k_tiles, key_block,
        (jnp.zeros_like(queries), jnp.zeros_like(keys), jnp.zeros_like(values)))
    d_q = d_q.reshape(hkv, q_tiles * block_q, group, d).swapaxes(0, 1)
    return (d_q.reshape(q_tiles * block_q, hq, d)[:t], d_k.transpose(1, 0, 2)[:s],
            d_v.transpose(1, 0, 2)[:s])
