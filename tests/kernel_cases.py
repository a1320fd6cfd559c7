"""Random inputs and tolerances shared by the kernel tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

KERNEL_BACKENDS = ("reference", "xla", "pallas_gpu", "pallas_tpu")

TOLERANCE = {
    jnp.float32: dict(out=2e-5, lse=2e-5),
    jnp.bfloat16: dict(out=3e-2, lse=2e-2),
}


def rounded(x, dtype):
    """`x` cast to `dtype` (the kernel's input) and back to float64 (the oracle's input)."""
    cast = jnp.asarray(x, dtype)
    return cast, np.asarray(cast.astype(jnp.float32), np.float64)


def assert_attention_close(out, lse, want_out, want_lse, dtype):
    """Compares a kernel's (out, lse) with the float64 oracle; -inf must match exactly."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    lse = np.asarray(lse, np.float64)
    assert not np.isnan(out).any(), "NaN in out"
    assert not np.isnan(lse).any(), "NaN in lse"
    tol = TOLERANCE[dtype]
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(out, want_out, atol=tol["out"], rtol=tol["out"])
    seen = ~np.isneginf(want_lse)
    np.testing.assert_allclose(lse[seen], want_lse[seen], atol=tol["lse"], rtol=tol["lse"])
    np.testing.assert_array_equal(out[~seen], 0.0)
