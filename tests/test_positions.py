"""RoPE: rope types against an independent float64 implementation; re-encoding."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_oracle
from jattn.model.config import ModelConfig
from jattn.positions import RopeConfig, apply_rope, inverse_frequencies, reencode
from model_references import model_dir

ROPES = [
    RopeConfig(theta=10000.0),
    RopeConfig(theta=500000.0, type="linear", factor=4.0),
    RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
               high_freq_factor=4.0, original_max_position_embeddings=256),
]


def llama3_inv_freq_float64(rope, head_dim):
    """Llama 3.1's published frequency rule, written out again in float64."""
    inv = rope.theta ** -(np.arange(0, head_dim, 2) / head_dim)
    out = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < rope.original_max_position_embeddings / rope.high_freq_factor:
            out.append(f)
        elif wavelen > rope.original_max_position_embeddings / rope.low_freq_factor:
            out.append(f / rope.factor)
        else:
            smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
                rope.high_freq_factor - rope.low_freq_factor)
            out.append((1 - smooth) * f / rope.factor + smooth * f)
    return np.array(out)


def test_inverse_frequencies_by_type():
    d = 64
    base = 10000.0 ** -(np.arange(0, d, 2) / d)
    np.testing.assert_allclose(inverse_frequencies(ROPES[0], d), base, rtol=1e-6)
    linear = 500000.0 ** -(np.arange(0, d, 2) / d) / 4.0
    np.testing.assert_allclose(inverse_frequencies(ROPES[1], d), linear, rtol=1e-6)
    np.testing.assert_allclose(inverse_frequencies(ROPES[2], d),
                               llama3_inv_freq_float64(ROPES[2], d), rtol=1e-5)


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: r.type)
def test_apply_rope_matches_float64_rotation(rope):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3, 32))
    positions = rng.integers(0, 3000, size=50)
    got = apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions), rope)
    want = attention_oracle.rotate(x, positions, inverse_frequencies(rope, 32).astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-3)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), rope_index=st.integers(0, 2), tokens=st.integers(1, 40))
def test_reencode_moves_keys_to_new_positions(seed, rope_index, tokens):
    rope = ROPES[rope_index]
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((tokens, 2, 16)), jnp.float32)
    p0 = jnp.asarray(rng.integers(0, 4096, size=tokens))
    p1 = jnp.asarray(rng.integers(0, 4096, size=tokens))
    moved = reencode(apply_rope(k, p0, rope), p0, p1, rope)
    np.testing.assert_allclose(np.asarray(moved), np.asarray(apply_rope(k, p1, rope)),
                               atol=5e-3)


def test_rope_configs_read_from_checkpoints():
    llama3 = ModelConfig.from_dir(model_dir("tiny-llama3-random")).rope
    assert llama3 == RopeConfig(theta=500000.0, type="llama3", factor=8.0, low_freq_factor=1.0,
                                high_freq_factor=4.0, original_max_position_embeddings=256)
    assert ModelConfig.from_dir(model_dir("stories260K")).rope == RopeConfig(theta=10000.0)
    legacy = RopeConfig.from_hf({"rope_theta": 1e6,
                                 "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy == RopeConfig(theta=1e6, type="linear", factor=2.0)
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'"):
        RopeConfig.from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
