"""Context parallelism on 8 simulated CPU devices: attention over a sequence sharded over
the mesh, and its gradients, equal the float64 closed form; training the embedded model
over 8 devices gives one device's losses."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import attention_oracle
from jattn.distributed import context_parallel_attention

DEMO = pathlib.Path(__file__).parent.parent / "demos" / "context_parallel_training.py"


def sequence_mesh(devices=8, name="sequence"):
    return Mesh(np.array(jax.devices()[:devices]), (name,))


@pytest.mark.parametrize("causal, hq, hkv, devices, axis, packed, backend", [
    (True, 4, 2, 8, "sequence", False, "xla"), (False, 2, 2, 8, "cp", False, "xla"),
    (True, 4, 1, 4, "x", False, "xla"), (True, 4, 2, 8, "sequence", True, "xla"),
    (True, 4, 2, 2, "x", True, "pallas_gpu")])
def test_forward_and_gradients_equal_the_float64_closed_form(causal, hq, hkv, devices, axis,
                                                             packed, backend):
    """Packed: documents of random lengths across shard boundaries, by segment ids. The
    Pallas kernels (interpreted) under shard_map too."""
    rng = np.random.default_rng(devices + hq + packed)
    b, s, d = 2, 32, 8
    q = rng.standard_normal((b, s, hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, hkv, d)).astype(np.float32) for _ in range(2))
    d_out = rng.standard_normal((b, s, hq, d)).astype(np.float32)
    d_lse = rng.standard_normal((b, s, hq)).astype(np.float32)
    mesh = sequence_mesh(devices, axis)
    segments = np.sort(rng.integers(0, 5, (b, s)), axis=1).astype(np.int32) if packed else None

    def attend(q, k, v):
        return context_parallel_attention(q, k, v, mesh=mesh, causal=causal, backend=backend,
                                          segment_ids=segments)

    (out, lse), vjp = jax.vjp(jax.jit(attend), *(jnp.asarray(x) for x in (q, k, v)))
    grads = vjp((jnp.asarray(d_out), jnp.asarray(d_lse)))
    ordered = attention_oracle.prefill_visibility(s, s, causal=causal, q_offset=0,
                                                  kv_length=s)
    for row in range(b):
        visible = ordered & (segments[row][:, None] == segments[row][None, :]) if packed \
            else ordered
        want_out, want_lse = attention_oracle.attention(q[row], k[row], v[row], visible,
                                                        d ** -0.5)
        np.testing.assert_allclose(np.asarray(out[row]), want_out, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse[row]), want_lse, rtol=2e-5, atol=2e-5)
        want = attention_oracle.attention_vjp(q[row], k[row], v[row], visible, d ** -0.5,
                                              d_out[row], d_lse[row])
        for name, got, expected in zip("qkv", grads, want):
            np.testing.assert_allclose(np.asarray(got[row]), expected, rtol=2e-4, atol=2e-4,
                                       err_msg=name)


def test_refuses_a_mesh_it_cannot_shard_the_sequence_over():
    q = jnp.zeros((1, 12, 2, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"does not split evenly over the 8 devices"):
        context_parallel_attention(q, q, q, mesh=sequence_mesh())
    square = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    with pytest.raises(ValueError, match=r"needs a 1-D mesh.*\('a', 'b'\)"):
        context_parallel_attention(q, q, q, mesh=square)
    with pytest.raises(ValueError, match=r"k must have rank 4"):
        context_parallel_attention(q, q[0], q, mesh=sequence_mesh())


def test_training_over_8_devices_gives_one_devices_losses():
    spec = importlib.util.spec_from_file_location("context_parallel_training", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    tokens = demo.story_tokens(2, 65)
    one = demo.train_losses(tokens, steps=3, learning_rate=0.05)
    spread = demo.train_losses(tokens, steps=3, learning_rate=0.05, mesh=sequence_mesh())
    np.testing.assert_allclose(spread, one, rtol=1e-5)
    assert one[2] < one[0]  # the steps train: the story's loss falls
