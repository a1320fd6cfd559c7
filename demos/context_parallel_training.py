"""Fine-tune the embedded model on one context spread over a device mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python demos/context_parallel_training.py

A few steps of plain gradient descent on next-token loss, twice from the same weights:
on one device with `pallas_kernels.flash_attention`, and with each sequence's tokens split
over every device (8 simulated CPU devices above) with
`jattn.distributed.context_parallel_attention`, which attends by passing keys and values
around the ring and merging by LSE. Everything but attention is per token, so jit shards
it along the sequence by itself. The two loss curves agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.distributed import context_parallel_attention
from jattn.llm import EMBEDDED_MODEL
from jattn.model.config import ModelConfig
from jattn.model.weights import load_safetensors
from jattn.tokenizer import Tokenizer
from pallas_kernels import flash_attention


def next_token_loss(model, inputs, targets, attend):
    """Mean cross-entropy of `targets [B, S]` (each input's next token) given
    `inputs [B, S]`."""
    log_probs = jax.nn.log_softmax(model.sequence_logits(inputs, attend), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))


def train_losses(tokens: np.ndarray, *, steps: int, learning_rate: float,
                 mesh: Mesh | None = None) -> list[float]:
    """The loss before each of `steps` gradient-descent steps on `tokens [B, S + 1]`,
    starting from the embedded model's weights; over `mesh`'s devices (the sequence
    split on its one axis, S a multiple of their number) or, with None, on one device."""
    model = load_safetensors(EMBEDDED_MODEL, ModelConfig.from_dir(EMBEDDED_MODEL),
                             progress=False)
    graph, params = nnx.split(model)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if mesh is None:
        def attend(q, k, v):
            return flash_attention(q, k, v, causal=True)[0]
    else:
        def attend(q, k, v):
            return context_parallel_attention(q, k, v, mesh=mesh, causal=True)[0]
        by_sequence = NamedSharding(mesh, P(None, *mesh.axis_names))
        inputs, targets = (jax.device_put(x, by_sequence) for x in (inputs, targets))
        params = jax.device_put(params, NamedSharding(mesh, P()))

    @jax.jit
    def step(params, inputs, targets):
        def loss(params):
            return next_token_loss(nnx.merge(graph, params), inputs, targets, attend)

        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)

    losses = []
    for _ in range(steps):
        value, params = step(params, inputs, targets)
        losses.append(float(value))
    return losses


STORY = ("Once upon a time, there was a little girl named Lily. She loved to play in the "
         "park with her big red ball. One day, the ball rolled away and Lily ran after it. "
         "She found a small dog under a tree. The dog was sad, so Lily gave him a hug. "
         "They became best friends and played together every day. ")


def story_tokens(batch: int, length: int) -> np.ndarray:
    """int32 `[batch, length]`: the story, repeated, tokenized; row i starts i tokens in."""
    ids = Tokenizer.from_dir(EMBEDDED_MODEL).encode(STORY * (1 + length // 16))
    return np.stack([ids[i:i + length] for i in range(batch)]).astype(np.int32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sequence", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    args = parser.parse_args()
    devices = jax.devices()
    if args.sequence % len(devices):
        parser.error(f"--sequence must be a multiple of the {len(devices)} devices")
    tokens = story_tokens(args.batch, args.sequence + 1)
    mesh = Mesh(np.array(devices), ("sequence",))
    one = train_losses(tokens, steps=args.steps, learning_rate=args.learning_rate)
    spread = train_losses(tokens, steps=args.steps, learning_rate=args.learning_rate,
                          mesh=mesh)
    print(f"{'step':>4}  {'1 device':>10}  {f'{len(devices)} devices':>10}")
    for i, (a, b) in enumerate(zip(one, spread)):
        print(f"{i:>4}  {a:>10.5f}  {b:>10.5f}")
    print(f"largest difference: {max(abs(a - b) for a, b in zip(one, spread)):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
