"""The exact LSE merge of attention partials held by the devices of a mesh axis.

Inside `shard_map`, device i holds `(o_i, lse_i)` over its own KV blocks; the merged
result is `o = sum_i w_i o_i / sum_i w_i`, `lse = m + log sum_i w_i` with
`w_i = exp(lse_i - m)`, `m = max_i lse_i`. Only a max and two sums of the partials
cross devices: `[..., D]` and `[...]` floats, whatever the context length.

Numerical guards (as `pallas_kernels.merge`): a device that saw no key has
`lse_i = -inf` and weight exactly 0, its output selected away so nothing it holds can
leak; when no device saw a key, the shift is 0 instead of `-inf` and the result is
out = 0, lse = -inf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def merge_over_axis(out, lse, axis_name: str):
    """Merges the partials `out [..., D]`, `lse [...]` (natural log) of every device on
    `axis_name`. Returns `(out [..., D] in out's dtype, lse [...] float32)`, the same on
    every device."""
    lse = lse.astype(jnp.float32)
    m = jax.lax.pmax(lse, axis_name)
    shift = jnp.where(jnp.isneginf(m), 0.0, m)
    weight = jnp.exp(lse - shift)  # exactly 0 where lse = -inf
    part = jnp.where(weight[..., None] > 0, out.astype(jnp.float32), 0.0)
    numerator = jax.lax.psum(weight[..., None] * part, axis_name)
    total = jax.lax.psum(weight, axis_name)
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    merged = jnp.where(seen[..., None], numerator / safe_total[..., None], 0.0)
    return merged.astype(out.dtype), jnp.where(seen, shift + jnp.log(safe_total), -jnp.inf)
