"""Rotary positions: the rope types of the Llama family, applying them, re-encoding.

jattn stores keys without position. A key gets its position only when it is attended
(`pallas_kernels` rotates it inside the attention kernel), so a cached key stays valid at
any position: after truncation a key simply sits at a new index. `reencode` is the pure
function for keys that were rotated elsewhere: `rotate(k, new - old)`.

Supported rope types (Hugging Face `rope_scaling` / `rope_parameters`): `default`,
`linear` (positions divided by `factor`) and `llama3` (long wavelengths slowed by
`factor`, short ones kept, a smooth blend between).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from pallas_kernels import rotary

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """A rotary encoding: base `theta` and, for scaled types, the scaling parameters."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope type must be one of {ROPE_TYPES}, got {self.type!r}")

    @classmethod
    def from_hf(cls, config: dict) -> "RopeConfig":
        """Reads `rope_theta` with `rope_scaling` (transformers 4) or `rope_parameters` (5)."""
        params = dict(config.get("rope_parameters") or {})
        params.update(config.get("rope_scaling") or {})
        theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r} in config; supported: {ROPE_TYPES}")
        scaled = {}
        if rope_type in ("linear", "llama3"):
            scaled["factor"] = float(params["factor"])
        if rope_type == "llama3":
            scaled.update(
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        return cls(theta=float(theta), type=rope_type, **scaled)


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(rope.theta), exponents)).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_wavelen = old_context / rope.low_freq_factor
        high_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    return inv_freq


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 `[head_dim / 2]`: angle per position of each rotated pair of dimensions."""
    if head_dim % 2:
        raise ValueError(f"rotary encoding needs an even head_dim, got {head_dim}")
    return _inverse_frequencies(rope, head_dim).copy()


def apply_rope(x, positions, rope: RopeConfig):
    """Rotates `x [..., T, H, D]` (half-split layout) to `positions [..., T]`.

    Returns x's shape and dtype; the rotation is computed in float32.
    """
    inv_freq = jnp.asarray(inverse_frequencies(rope, x.shape[-1]))
    return rotary.rotate(x, jnp.asarray(positions), inv_freq).astype(x.dtype)


def reencode(k, old_positions, new_positions, rope: RopeConfig):
    """Moves keys `k [..., T, H, D]` rotated for `old_positions [..., T]` to
    `new_positions [..., T]`: a rotation by the difference, since rotations compose."""
    delta = jnp.asarray(new_positions) - jnp.asarray(old_positions)
    return apply_rope(k, delta, rope)
