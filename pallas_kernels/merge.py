"""Exact merge of attention partials by their natural-log log-sum-exp.

Attention over a KV cache split into parts 0..n-1, where part i gives the normalised
output `o_i` and the LSE `lse_i` of its scores, is recovered exactly as

    m = max_i lse_i;  w_i = exp(lse_i - m)
    o = sum_i w_i o_i / sum_i w_i;  lse = m + log sum_i w_i

Numerical guards:
  * a part that saw no key has `lse_i = -inf`; its weight is exactly 0 and its output,
    whatever it holds, is never multiplied in (selected away, so NaN cannot leak);
  * when every part is empty, `m = -inf`; the shift uses 0 instead so no `-inf - -inf`
    is formed, the result is out = 0 and lse = -inf.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.validation import check_merge_args


def safe_max(lses, axis: int = 0):
    """Max over `axis`, with `-inf` (all parts empty) replaced by 0 for use as a shift."""
    m = jnp.max(lses, axis=axis)
    return jnp.where(jnp.isneginf(m), 0.0, m)


def merge_attention(outs, lses):
    """Merges `n` attention partials into one.

    Args:
      outs: `[n, ..., D]` per-part normalised outputs, any float dtype.
      lses: `[n, ...]` per-part natural-log LSE of the scaled scores; `-inf` for a part
        with no visible key.

    Returns:
      `(out, lse)`: out `[..., D]` in outs' dtype, lse `[...]` float32. Rows where all
      parts are empty get out = 0 and lse = -inf.
    """
    check_merge_args(outs, lses)
    lses = lses.astype(jnp.float32)
    shift = safe_max(lses)
    weights = jnp.exp(lses - shift[None])  # exactly 0 where lse = -inf
    total = jnp.sum(weights, axis=0)
    parts = jnp.where(weights[..., None] > 0, outs.astype(jnp.float32), 0.0)
    numerator = jnp.sum(weights[..., None] * parts, axis=0)
    seen = total > 0
    out = jnp.where(seen[..., None], numerator / jnp.where(seen, total, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, shift + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    return out.astype(outs.dtype), lse
