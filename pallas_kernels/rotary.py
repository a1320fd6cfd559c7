"""Rotary position encoding (RoPE), half-split layout, as attention applies it to keys.

A head vector x of size D is split into halves `x1 = x[:D/2]`, `x2 = x[D/2:]`. At position
p, with inverse frequencies `inv_freq [D/2]`, the angles are `a = p * inv_freq` and

    rotate(x, p) = concat(x1 * cos(a) - x2 * sin(a), x2 * cos(a) + x1 * sin(a))

(the `rotate_half` layout of Hugging Face Llama checkpoints). Rotations compose by adding
positions, `rotate(rotate(x, p), d) == rotate(x, p + d)`, so a key stored without rotation
can be used at any position. Angles are formed in float32 as `float32(p) * inv_freq`, the
way Hugging Face forms them, so logits match its to float32 rounding.
"""

from __future__ import annotations

import jax.numpy as jnp


def angles(positions, inv_freq):
    """`positions [...]` (int or float) -> `(cos, sin)`, each `[..., D/2]` float32."""
    theta = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return jnp.cos(theta), jnp.sin(theta)


def rotate_halves(x1, x2, cos, sin):
    """Rotates the halves `x1, x2 [..., D/2]` by angles given as `cos, sin` (broadcast).

    Returns the rotated halves in float32.
    """
    x1 = x1.astype(jnp.float32)
    x2 = x2.astype(jnp.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def rotate(x, positions, inv_freq):
    """Rotates `x [..., T, H, D]` whose rows sit at `positions [..., T]`.

    Returns float32 `[..., T, H, D]`. `inv_freq` is `[D/2]`.
    """
    half = x.shape[-1] // 2
    cos, sin = angles(positions, inv_freq)
    y1, y2 = rotate_halves(x[..., :half], x[..., half:], cos[..., None, :], sin[..., None, :])
    return jnp.concatenate([y1, y2], axis=-1)


def rotated_key_scores(q1, q2, k1, k2, key_positions, inv_freq, dot_nt):
    """Scores of queries against keys rotated to their positions, inside a kernel tile.

    Args:
      q1, q2: `[M, D/2]` halves of the (already rotated) queries.
      k1, k2: `[N, D/2]` halves of the unrotated keys.
      key_positions: `[N, 1]` int32 positions of the keys.
      inv_freq: `[1, D/2]` float32.
      dot_nt: `(a [M, K], b [N, K]) -> [M, N]` float32.

    Returns `[M, N]` float32 unscaled scores. Rotated keys are cast back to the keys'
    dtype for the product, as the model would have stored them.
    """
    theta = key_positions.astype(jnp.float32) * inv_freq
    r1, r2 = rotate_halves(k1, k2, jnp.cos(theta), jnp.sin(theta))
    return dot_nt(q1, r1.astype(k1.dtype)) + dot_nt(q2, r2.astype(k2.dtype))


def kernel_operand(inv_freq, head_dim: int):
    """`(rotate_keys, inv_freq float32 [D/2])` for a kernel: zeros stand in when None."""
    if inv_freq is None:
        return False, jnp.zeros((head_dim // 2,), jnp.float32)
    return True, inv_freq.astype(jnp.float32)
