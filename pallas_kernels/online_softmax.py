"""The online-softmax step shared by the tiled XLA path and the Pallas kernels.

State per query row, each with a trailing axis of 1 so kernels stay 2-D: running max
`m [..., 1]` (float32, `-inf` before any visible key), running sum of exponentials
`l [..., 1]`, and the unnormalised output accumulator `acc [..., D]`.

Numerical guards: a masked score is `-inf`; while a row has seen no key, the shift used
for `exp` is 0 instead of `-inf`, so `exp(-inf - shift) = 0` and no `-inf - -inf` NaN is
formed. `finish` turns a row with `l = 0` into out = 0, lse = -inf.
"""

from __future__ import annotations

import jax.numpy as jnp


def initial_state(rows: tuple[int, ...], head_dim: int):
    """`(m, l, acc)` for `rows` query rows before any key: `-inf`, 0, 0 (float32)."""
    return (
        jnp.full((*rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((*rows, 1), jnp.float32),
        jnp.zeros((*rows, head_dim), jnp.float32),
    )


def update(m, l, acc, scores, values, contract):
    """Folds one tile of masked scores into the running state.

    Args:
      m, l: `[..., 1]` float32 running max and sum.
      acc: `[..., D]` float32 accumulator.
      scores: `[..., K]` float32 scaled scores, `-inf` where hidden.
      values: the tile's values, zeroed where hidden keys could hold NaN.
      contract: `(probs [..., K] float32, values) -> [..., D]` float32.

    Returns:
      the new `(m, l, acc)`.
    """
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    probs = jnp.exp(scores - shift)
    rescale = jnp.exp(m - shift)
    l_new = rescale * l + jnp.sum(probs, axis=-1, keepdims=True)
    acc_new = rescale * acc + contract(probs, values)
    return m_new, l_new, acc_new


def finish(m, l, acc):
    """Returns `(out [..., D], lse [..., 1])`, both float32, from the final state."""
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen, acc / safe_l, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)
    return out, lse


def init_scratch(m_ref, l_ref, acc_ref) -> None:
    """Resets kernel scratch refs `m, l [rows, 1]`, `acc [rows, D]` to the empty state."""
    m0, l0, acc0 = initial_state((acc_ref.shape[0],), acc_ref.shape[1])
    m_ref[...], l_ref[...], acc_ref[...] = m0, l0, acc0


def update_scratch(m_ref, l_ref, acc_ref, scores, values, contract) -> None:
    """`update` on state held in kernel scratch refs."""
    m, l, acc = update(m_ref[...], l_ref[...], acc_ref[...], scores, values, contract)
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc


def finish_scratch(m_ref, l_ref, acc_ref, out_ref, lse_ref) -> None:
    """`finish` from scratch refs into `out_ref [rows, D]` (its dtype) and `lse_ref [rows, 1]`."""
    out, lse = finish(m_ref[...], l_ref[...], acc_ref[...])
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse
