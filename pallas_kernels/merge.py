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

`merge_partials` is the formula, over reductions across parts that its caller gives: sums
over an array axis (`merge_attention`), or collectives over a mesh axis inside
`shard_map` (`jattn.distributed.merge`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from pallas_kernels.validation import check_merge_args


def merge_partials(out, lse, *, max_over_parts: Callable, sum_over_parts: Callable):
    """Merges attention partials; `max_over_parts` and `sum_over_parts` reduce an array
    of any shape across the parts.

    Args:
      out: the parts' normalised outputs `[..., D]` (with the parts on whatever the
        reductions reduce), any float dtype.
      lse: their natural-log LSE, `out.shape[:-1]`; `-inf` for a part with no visible
        key.

    Returns:
      `(out, lse)`: out `[..., D]` in out's dtype, lse `[...]` float32, reduced across
      the parts. Rows where all parts are empty get out = 0 and lse = -inf.
    """
    lse = lse.astype(jnp.float32)
    top = max_over_parts(lse)
    shift = jnp.where(jnp.isneginf(top), 0.0, top)
    weight = jnp.exp(lse - shift)  # exactly 0 where lse = -inf
    part = jnp.where(weight[..., None] > 0, out.astype(jnp.float32), 0.0)
    numerator = sum_over_parts(weight[..., None] * part)
    total = sum_over_parts(weight)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    merged = jnp.where(seen[..., None], numerator / safe_total[..., None], 0.0)
    return merged.astype(out.dtype), jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)


def merge_attention(outs, lses):
    """Merges `n` attention partials stacked on a leading axis into one.

    Args:
      outs: `[n, ..., D]` per-part normalised outputs, any float dtype.
      lses: `[n, ...]` per-part natural-log LSE of the scaled scores; `-inf` for a part
        with no visible key.

    Returns:
      `(out, lse)`: out `[..., D]` in outs' dtype, lse `[...]` float32. Rows where all
      parts are empty get out = 0 and lse = -inf.
    """
    check_merge_args(outs, lses)
    return merge_partials(outs, lses, max_over_parts=lambda x: jnp.max(x, axis=0),
                          sum_over_parts=lambda x: jnp.sum(x, axis=0))
