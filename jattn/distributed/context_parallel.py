"""Context parallelism: attention over a sequence sharded over a 1-D device mesh, exact
forward and backward, for training on a context longer than one device holds.

The sequence axis of `[batch, seq, heads, dim]` queries, keys and values is split into
N contiguous shards, shard i on device i. Ring attention: every device keeps its queries
and passes its keys and values around the ring, N - 1 hops (`ppermute`); at each hop it
attends the shard it holds with `pallas_kernels.flash_attention` (positions offset by
whose shard it is: under the causal mask a later shard is hidden, an earlier one fully
seen, its own one causal) and merges the partial into its running result by LSE
(`pallas_kernels.merge_attention`). Only keys and values travel (with their segment ids
when given), one shard per hop.

The backward pass is a second ring (a custom VJP, as FlashAttention's ring variants do):
each device keeps only its own q, k, v and the merged output and LSE from the forward;
keys and values go around again, carrying the cotangents of their keys and values, and
at each hop the device adds that shard's share, `flash_attention`'s backward from the
merged LSE (exact: the softmax over all keys, block by block). After N hops each shard's
dK and dV are back on its device. Memory per device stays that of its own shard (and one
travelling shard), whatever N.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import backend as backends
from pallas_kernels import flash_attention, merge_attention
from pallas_kernels.flash_backward import flash_attention_backward
from pallas_kernels.validation import check_segment_ids


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


@dataclass(frozen=True)
class _Ring:
    """The ring of one call: mesh `axis` of `devices` devices, `shard` tokens each."""

    axis: str
    devices: int
    shard: int
    causal: bool
    sm_scale: float
    backend: str
    segments: bool  # whether segment ids travel with the keys

    def bounds(self, hop: int):
        """`(q_offset, kv_length)` of this device's queries against the shard it holds at
        `hop` (shard `me - hop`): a later shard hidden, an earlier one seen whole."""
        if not self.causal:
            return 0, self.shard
        me = jax.lax.axis_index(self.axis)
        owner = (me - hop) % self.devices
        seen = owner <= me
        return jnp.where(seen, (me - owner) * self.shard, 0), jnp.where(seen, self.shard, 0)

    def pass_on(self, *arrays):
        """Each array to the next device of the ring."""
        ring = [(i, (i + 1) % self.devices) for i in range(self.devices)]
        return tuple(jax.lax.ppermute(x, self.axis, ring) for x in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, q_segments):
    """This device's `(out [B, L, Hq, D] float32, lse [B, L, Hq])` over every shard."""
    out = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)
    kv_segments = q_segments
    for hop in range(ring.devices):
        q_offset, kv_length = ring.bounds(hop)
        part, part_lse = flash_attention(
            q, k, v, causal=ring.causal, q_offset=q_offset, kv_length=kv_length,
            segment_ids=(q_segments, kv_segments) if ring.segments else None,
            sm_scale=ring.sm_scale, backend=ring.backend)
        out, lse = merge_attention(jnp.stack([out, part.astype(jnp.float32)]),
                                   jnp.stack([lse, part_lse]))
        if hop < ring.devices - 1:
            k, v = ring.pass_on(k, v)
            if ring.segments:
                (kv_segments,) = ring.pass_on(kv_segments)
    return out, lse


def _ring_forward(ring: _Ring, q, k, v, q_segments):
    out, lse = _ring_attention(ring, q, k, v, q_segments)
    return (out, lse), (q, k, v, q_segments, out, lse)


def _ring_backward(ring: _Ring, saved, cotangents):
    q, k, v, q_segments, out, lse = saved
    d_out, d_lse = cotangents
    choice = backends.resolve(ring.backend)

    def shard_gradients(q, k, v, out, lse, d_out, d_lse, q_segments, kv_segments, q_offset,
                        kv_length):
        return flash_attention_backward(
            q, k, v, out, lse, d_out, d_lse, causal=ring.causal, q_offset=q_offset,
            kv_length=kv_length, sm_scale=ring.sm_scale,
            segment_ids=(q_segments, kv_segments) if ring.segments else None,
            kind=choice.kind, interpret=choice.interpret)

    batched = jax.vmap(shard_gradients, in_axes=(0,) * 9 + (None, None))
    d_q = jnp.zeros(q.shape, jnp.float32)
    d_k, d_v = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    kv_segments = q_segments
    for hop in range(ring.devices):
        q_offset, kv_length = ring.bounds(hop)
        shares = batched(q, k, v, out, lse, d_out, d_lse, q_segments,
                         kv_segments, jnp.asarray(q_offset, jnp.int32),
                         jnp.asarray(kv_length, jnp.int32))
        d_q, d_k, d_v = (total + share.astype(jnp.float32)
                         for total, share in zip((d_q, d_k, d_v), shares))
        if hop < ring.devices - 1:
            k, v = ring.pass_on(k, v)
            if ring.segments:
                (kv_segments,) = ring.pass_on(kv_segments)
        d_k, d_v = ring.pass_on(d_k, d_v)  # N passes in all: each shard's back home
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_ring_attention.defvjp(_ring_forward, _ring_backward)


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
      single-device gradient) by a backward ring that keeps each device's memory to its
      own shard.
    """
    _check_layout(q, k, v)
    axis = _sequence_axis(mesh, q.shape[1])
    backends.resolve(backend)  # an unknown backend is named before anything runs
    checked = check_segment_ids(segment_ids, q, k)  # (the same ids for queries and keys)
    segments = jnp.zeros(q.shape[:2], jnp.int32) if checked is None else checked[0]
    ring = _Ring(axis=axis, devices=mesh.shape[axis], shard=q.shape[1] // mesh.shape[axis],
                 causal=bool(causal),
                 sm_scale=float(q.shape[-1] ** -0.5 if sm_scale is None else sm_scale),
                 backend=backend, segments=segment_ids is not None)

    def local(q, k, v, q_segments):
        out, lse = _ring_attention(ring, q, k, v, q_segments)
        return out.astype(q.dtype), lse

    spec = P(None, axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec),
                         out_specs=(spec, spec), check_vma=False)(
        q, k, v, segments)
