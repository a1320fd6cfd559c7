"""Context parallelism: attention over a sequence sharded over a 1-D device mesh, exact
forward and backward, for training on a context longer than one device holds.

The sequence axis of `[batch, seq, heads, dim]` queries, keys and values is split into
N contiguous shards, shard i on device i. Ring attention: every device keeps its queries
and passes its keys and values around the ring, N - 1 hops (`ppermute`); at each hop it
attends the shard it holds with `pallas_kernels.flash_attention` (positions offset by
whose shard it is: under the causal mask a later shard is hidden, an earlier one fully
seen, its own one causal), and the N partials merge exactly by LSE
(`pallas_kernels.merge_attention`). Only keys and values travel, one shard per hop.

The backward pass is JAX's own transpose of that program: `flash_attention`'s
custom VJP (which differentiates the LSE too, so the merge differentiates exactly), the
merge's, and `ppermute`'s (the reverse ring). The gradient equals the single-device one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import flash_attention, merge_attention


def _sequence_axis(mesh, seq_len: int) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"context_parallel_attention needs a 1-D mesh (its one axis shards "
                         f"the sequence), got axes {mesh.axis_names}")
    (axis,) = mesh.axis_names
    if seq_len % mesh.shape[axis]:
        raise ValueError(f"the sequence length {seq_len} does not split evenly over the "
                         f"{mesh.shape[axis]} devices of axis {axis!r}")
    return axis


def _check_layout(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 ([batch, seq, heads, head_dim]), got "
                             f"shape {tuple(x.shape)}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q and k must have the same batch and sequence length (self-"
                         f"attention), got q {tuple(q.shape)} and k {tuple(k.shape)}")


def context_parallel_attention(q, k, v, *, mesh, causal: bool = True, segment_ids=None,
                               sm_scale: float | None = None, backend: str = "auto"):
    """Self-attention over a sequence sharded over `mesh`, by ring passing and LSE merge.

    Args:
      q: `[B, S, Hq, D]` queries, already rotated (RoPE) if the model uses it; token s is
        at position s.
      k, v: `[B, S, Hkv, D]`, `Hq % Hkv == 0`, keys rotated like q.
      mesh: a 1-D `jax.sharding.Mesh` of N devices; its axis, whatever its name, shards
        the sequence (S % N == 0). The arrays may come sharded that way or not.
      causal: hide keys after each query.
      segment_ids: None or int32 `[B, S]`: a token sees only tokens of its own segment
        (documents packed into one row); the keys' ids travel around the ring with them.
      sm_scale: score scale, default `D ** -0.5`.
      backend: the local kernel's backend (see `pallas_kernels.backend`).

    Returns:
      `(out [B, S, Hq, D] in q's dtype, lse [B, S, Hq] float32)`, sharded over the
      sequence like the inputs; differentiable in q, k and v (`jax.grad` equals the
      single-device gradient).
    """
    _check_layout(q, k, v)
    axis = _sequence_axis(mesh, q.shape[1])
    devices = mesh.shape[axis]
    shard = q.shape[1] // devices
    ring = [(i, (i + 1) % devices) for i in range(devices)]

    segments = jnp.zeros(q.shape[:2], jnp.int32) if segment_ids is None else \
        jnp.asarray(segment_ids, jnp.int32)
    if segments.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must have shape {tuple(q.shape[:2])} (one per token), "
                         f"got {tuple(segments.shape)}")

    def local(q, k, v, q_segments):
        me = jax.lax.axis_index(axis)
        kv_segments = q_segments
        outs, lses = [], []
        for hop in range(devices):
            owner = (me - hop) % devices  # whose keys this device holds at this hop
            seen = (owner <= me) if causal else True
            out, lse = flash_attention(
                q, k, v, causal=causal, backend=backend, sm_scale=sm_scale,
                q_offset=jnp.where(seen, (me - owner) * shard, 0) if causal else 0,
                kv_length=jnp.where(seen, shard, 0),
                segment_ids=None if segment_ids is None else (q_segments, kv_segments))
            outs.append(out)
            lses.append(lse)
            if hop < devices - 1:
                k, v, kv_segments = (jax.lax.ppermute(x, axis, ring)
                                     for x in (k, v, kv_segments))
        return merge_attention(jnp.stack(outs), jnp.stack(lses))

    spec = P(None, axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec),
                         out_specs=(spec, spec), check_vma=False)(q, k, v, segments)
