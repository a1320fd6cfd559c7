"""The backward pass of `flash_attention`, from the forward's saved log-sum-exp, for
every backend: Pallas kernels on the Pallas backends (`flash_backward_gpu`,
`flash_backward_tpu`), a scan over key blocks in XLA otherwise.

FlashAttention-2's recomputation: with the forward's output O and LSE L kept, a block
of keys' probabilities are P_j = exp(scale * Q K_j^T - L) (zero where a key is hidden),
with no second softmax pass and no `[T, S]` matrix: the loop over key blocks holds
`[T, Hq, block_k]` at a time. With dO and dL the cotangents of O and L:

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
from pallas_kernels.tiling import prefill_bounds

BLOCK_K = 128  # keys per step of the XLA backward loop


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "kind", "interpret",
                                             "tiles"))
def flash_attention_backward(q, k, v, out, lse, d_out, d_lse, *, causal, q_offset,
                             kv_length, sm_scale, key_rope_inv_freq=None,
                             kind: str = "xla", interpret: bool = False, tiles=()):
    """Cotangents `(dq, dk, dv)` of `flash_attention(q, k, v, ...)` (arguments as
    there) whose results were `out [T, Hq, D]` and `lse [T, Hq]`, for the output
    cotangents `d_out [T, Hq, D]` and `d_lse [T, Hq]`. Each has its primal's shape and
    dtype; keys and values past `kv_length` (which may hold NaN) get zero.

    `kind` is the resolved backend ("pallas_gpu", "pallas_tpu": their kernels, run
    interpreted with `interpret`; anything else: XLA); `tiles` the forward's
    `(name, size)` tile overrides, used by the kernels.
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
                               sm_scale=sm_scale, interpret=interpret, **dict(tiles))
    else:
        d_q, d_k, d_v = _scan_backward(q, keys, values, d_out, shift, delta, d_lse,
                                       causal=causal, q_offset=q_offset,
                                       kv_length=kv_length, sm_scale=sm_scale)
    if key_rope_inv_freq is not None:
        d_k = rotary.rotate(d_k, -jnp.arange(s), key_rope_inv_freq)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _scan_backward(q, keys, values, d_out, shift, delta, d_lse, *, causal, q_offset,
                   kv_length, sm_scale, block_k: int = BLOCK_K):
    """The XLA backward: a `lax.scan` over key blocks holding `[T, Hq, block_k]` at a
    time. Operands as `flash_backward_gpu` takes them; returns float32 `(dq, dk, dv)`."""
    t, hq, d = q.shape
    s, hkv, _ = keys.shape
    group = hq // hkv
    block = min(block_k, s)
    blocks = -(-s // block)
    keys, values = (jnp.pad(x.astype(jnp.float32), ((0, blocks * block - s), (0, 0), (0, 0)))
                    for x in (keys, values))
    queries = q.astype(jnp.float32).reshape(t, hkv, group, d)
    d_out = d_out.astype(jnp.float32).reshape(t, hkv, group, d)
    delta = delta.reshape(t, hkv, group)
    d_lse = d_lse.reshape(t, hkv, group)
    shift = shift.reshape(t, hkv, group)
    q_pos = q_offset + jnp.arange(t)

    def step(d_q, j):
        k_j = jax.lax.dynamic_slice_in_dim(keys, j * block, block)
        v_j = jax.lax.dynamic_slice_in_dim(values, j * block, block)
        k_pos = j * block + jnp.arange(block)
        visible = (k_pos < kv_length)[None, :] & (k_pos < s)[None, :]
        if causal:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        visible = visible[:, None, None, :]  # [T, 1, 1, B]
        scores = jnp.einsum("thgd,bhd->thgb", queries, k_j) * sm_scale
        probs = jnp.where(visible, jnp.exp(scores - shift[..., None]), 0.0)
        d_v = jnp.einsum("thgb,thgd->bhd", probs, d_out)
        d_probs = jnp.einsum("thgd,bhd->thgb", d_out, v_j)
        d_scores = jnp.where(visible, probs * (d_probs - delta[..., None] + d_lse[..., None]),
                             0.0) * sm_scale
        d_k = jnp.einsum("thgb,thgd->bhd", d_scores, queries)
        return d_q + jnp.einsum("thgb,bhd->thgd", d_scores, k_j), (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros_like(queries), jnp.arange(blocks))
    return (d_q.reshape(t, hq, d), d_k.reshape(blocks * block, hkv, d)[:s],
            d_v.reshape(blocks * block, hkv, d)[:s])
