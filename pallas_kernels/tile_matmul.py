"""Tile products for the Pallas kernels.

Triton's `dot` needs every dimension >= 16, and tiny tiles waste the TPU's MXU anyway.
Tiles smaller than that (tiny models with head_dim 8, a handful of query heads) fall
back to a broadcast multiply and a sum, which lowers everywhere. Products accumulate in
float32; float32 inputs use full precision (no TF32 or bf16 passes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MIN_DOT = 16


def precision_for(dtype):
    """Full float32 precision for float32 inputs (no TF32 passes on GPU); the backend's
    default for narrower inputs, whose products TF32 and bf16 passes represent exactly."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def dot_nt(a, b):
    """`a [M, D] @ b[N, D].T -> [M, N]` float32."""
    if min(a.shape[0], b.shape[0], a.shape[1]) >= _MIN_DOT:
        return jax.lax.dot_general(
            a, b, (((1,), (1,)), ((), ())),
            preferred_element_type=jnp.float32, precision=precision_for(a.dtype))
    return jnp.sum(a.astype(jnp.float32)[:, None, :] * b.astype(jnp.float32)[None, :, :], axis=-1)


def dot_nn(p, v):
    """`p [M, K] @ v [K, D] -> [M, D]` float32; p is cast to v's dtype for the product."""
    if min(p.shape[0], p.shape[1], v.shape[1]) >= _MIN_DOT:
        return jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32, precision=precision_for(v.dtype))
    return jnp.sum(p[:, :, None] * v.astype(jnp.float32)[None, :, :], axis=1)
