"""The exact LSE merge of attention partials held by the devices of a mesh axis.

Inside `shard_map`, device i holds `(o_i, lse_i)` over its own KV blocks; they merge by
`pallas_kernels.merge.merge_partials` (the formula and its `-inf` guards), with a `pmax`
and two `psum`s over the axis as the reductions across parts. Only those cross devices:
`[..., D]` and `[...]` floats, whatever the context length.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.merge import merge_partials


def merge_over_axis(out, lse, axis_name: str):
    """Merges the partials `out [..., D]`, `lse [...]` (natural log) of every device on
    `axis_name`. Returns `(out [..., D] in out's dtype, lse [...] float32)`, the same on
    every device."""
    return merge_partials(out, lse,
                          max_over_parts=functools.partial(jax.lax.pmax, axis_name=axis_name),
                          sum_over_parts=functools.partial(jax.lax.psum, axis_name=axis_name))
