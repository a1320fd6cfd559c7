"""The jitted steps of a model over its paged KV pool: pure functions of the model's
graph and parameters, the pool (donated, so updated in place) and a step's inputs.

Shapes are kept few so that a handful of compilations serve every request: token counts
are bucketed to powers of two and block tables have one width (the longest context).
Steps taking a `mesh` attend a pool sharded over its `KV_AXIS` as DistAttention
(`jattn.distributed`): only the partial outputs cross devices, never the KV.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.distributed import paged_attention as mesh_paged_attention
from jattn.distributed import prefill_attention as mesh_prefill_attention
from jattn.model.kv_cache import KVPool, token_slots
from jattn.positions import inverse_frequencies
from jattn.sampling import sample_rows
from pallas_kernels import ragged_paged_attention

KV_AXIS = "kv"
"""The mesh axis a KV pool is sharded over."""


class ModelDef:
    """A module's graph and its parameters' tree structure: the static argument of the
    jitted steps, which take the parameters as a flat tuple of arrays (`params`) and
    rebuild the module inside (`merge`).

    jit hashes its static arguments on every call, and a flax `GraphDef` hashes by
    walking the whole module graph (0.33 ms a call for the embedded model's, 1.1 ms for
    Llama-3.2-1B's, on a 2-core x86 host), so the hash is computed once. And jit
    flattens a tuple of arrays in C++ but a flax `State` in Python, one callback per
    parameter (0.3 ms a call for the embedded model's 47)."""

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef = graphdef
        self.treedef = treedef
        self._hash = hash((graphdef, treedef))

    @classmethod
    def split(cls, module) -> tuple["ModelDef", tuple]:
        """`(model_def, params)` of a flax module."""
        graphdef, state = nnx.split(module)
        leaves, treedef = jax.tree.flatten(state)
        return cls(graphdef, treedef), tuple(leaves)

    def merge(self, params):
        """The module, from `params` as `split` gave them (arrays or tracers)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, params))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelDef) and (
            self is other or (self.graphdef, self.treedef) == (other.graphdef, other.treedef))


def _rope_frequencies(model) -> jax.Array:
    return jnp.asarray(inverse_frequencies(model.config.rope, model.config.head_dim))


def _chunk_attend(table, start, count, inv_freq, backend, mesh):
    """How one sequence's prompt chunk of `count` tokens at positions `start...` meets a
    layer's pool (its block table `[M]`): as a ragged batch of one sequence, or with a
    `mesh` attended where the blocks lie."""

    def attend(layer, q, k_pages, v_pages):
        if mesh is not None:
            return mesh_prefill_attention(q, k_pages, v_pages, table, q_offset=start,
                                          kv_length=start + count, mesh=mesh, axis=KV_AXIS,
                                          key_rope_inv_freq=inv_freq)[0]
        return ragged_paged_attention(
            q, k_pages, v_pages, table[None], jnp.stack([0, count]).astype(jnp.int32),
            (start + count)[None].astype(jnp.int32), key_rope_inv_freq=inv_freq,
            backend=backend)[0]

    return attend


@functools.partial(jax.jit, static_argnames=("model_def", "backend"),
                   donate_argnames=("pool",))
def ragged_step(model_def, params, pool: KVPool, tokens, positions, sequences, query_starts,
                kv_lengths, tables, logit_rows, fed_tokens, fed_rows, draws, *, backend):
    """The query tokens of up to `S` sequences packed together, through the model, and
    the next token of each sequence drawn from its logits.

    tokens, positions, sequences `[T]` (each token's position and sequence; position -1
    for padding: nothing written); query_starts `[S + 1]`, kv_lengths `[S]`, tables
    `[S, M]` as `ragged_paged_attention` takes them; logit_rows `[R]`: the tokens whose
    logits are wanted. fed_tokens `[W]` int32: the previous step's drawn tokens;
    fed_rows `[T]`: token t is `fed_tokens[fed_rows[t]]` where that is >= 0 (it stays on
    the device), else `tokens[t]`. draws: the `[R]` arrays `sample_rows` takes (see
    `jattn.sampling.draw_arguments`). Returns (logits `[R, V]` float32, the tokens drawn
    from them padded to `[W]` int32, pool).
    """
    model = model_def.merge(params)
    inv_freq = _rope_frequencies(model)
    tokens = jnp.where(fed_rows >= 0, fed_tokens[jnp.maximum(fed_rows, 0)], tokens)
    slots = jax.vmap(lambda sequence, position: token_slots(
        tables[sequence], position[None], block_size=pool.block_size,
        num_blocks=pool.num_blocks)[0])(sequences, positions)

    def attend(layer, q, k_pages, v_pages):
        return ragged_paged_attention(q, k_pages, v_pages, tables, query_starts, kv_lengths,
                                      key_rope_inv_freq=inv_freq, backend=backend)[0]

    logits, pool = model(tokens, jnp.maximum(positions, 0), slots, pool, attend,
                         rows=logit_rows)
    drawn = sample_rows(logits, *draws)[:fed_tokens.shape[0]]
    return logits, jnp.pad(drawn, (0, fed_tokens.shape[0] - drawn.shape[0])), pool


@functools.partial(jax.jit, static_argnames=("model_def", "backend", "all_logits", "mesh"),
                   donate_argnames=("pool",))
def mesh_prefill_step(model_def, params, pool: KVPool, tokens, start, count, table, *, backend,
                      all_logits, mesh):
    """Prefills `count` of the `T` (bucketed) `tokens` at positions `start...` of the
    sequence whose block table is `table [M]`, over a pool sharded on `mesh`. Returns
    (logits `[T, V]` if `all_logits` else `[V]` of the last real token, pool)."""
    model = model_def.merge(params)
    index = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    positions = start + index
    slots = token_slots(table, jnp.where(index < count, positions, -1),
                        block_size=pool.block_size, num_blocks=pool.num_blocks)
    attend = _chunk_attend(table, start, count, _rope_frequencies(model), backend, mesh)
    logits, pool = model(tokens, positions, slots, pool, attend)
    return (logits if all_logits else logits[count - 1]), pool


@functools.partial(jax.jit, static_argnames=("model_def", "backend", "mesh"),
                   donate_argnames=("pool",))
def mesh_decode_step(model_def, params, pool: KVPool, tokens, positions, tables, *, backend,
                     mesh):
    """One token for each of `B` sequences over a pool sharded on `mesh`: tokens,
    positions `[B]`, tables `[B, M]`. A row with position -1 is padding: nothing is
    written and its logits are unused. Returns (logits `[B, V]`, pool)."""
    model = model_def.merge(params)
    inv_freq = _rope_frequencies(model)
    slots = jax.vmap(lambda table, position: token_slots(
        table, position[None], block_size=pool.block_size, num_blocks=pool.num_blocks)[0])(
            tables, positions)

    def attend(layer, q, k_pages, v_pages):
        return mesh_paged_attention(q, k_pages, v_pages, tables, positions + 1, mesh=mesh,
                                    axis=KV_AXIS, key_rope_inv_freq=inv_freq,
                                    backend=backend)[0]

    return model(tokens, jnp.maximum(positions, 0), slots, pool, attend)


@functools.partial(jax.jit, static_argnames=("model_def",))
def embed_step(model_def, params, tokens):
    """tokens `[T]` -> hidden states `[T, hidden]`."""
    return model_def.merge(params).embed(tokens)


@functools.partial(jax.jit, static_argnames=("model_def",))
def logits_step(model_def, params, x, rows):
    """The logits `[R, V]` float32 of rows `rows [R]` of hidden states `x [T, hidden]`."""
    return model_def.merge(params).logits(x[rows])


@functools.partial(jax.jit, donate_argnames=("k_pages", "v_pages"))
def write_rows(k_pages, v_pages, ids, k, v):
    """This layer's pool with rows `k, v [R, block_size, Hkv, D]` written to pool blocks
    `ids [R]` (ids past the pool: rows not to write, dropped)."""
    return (k_pages.at[ids].set(k.astype(k_pages.dtype), mode="drop"),
            v_pages.at[ids].set(v.astype(v_pages.dtype), mode="drop"))


@functools.partial(jax.jit, static_argnames=("model_def", "backend", "mesh"),
                   donate_argnames=("k_pages", "v_pages"))
def layer_step(model_def, params, x, k_pages, v_pages, tokens_start, count, table, inv_freq,
               *, backend, mesh=None):
    """One decoder layer of a prompt chunk.

    x `[T, hidden]`; k_pages, v_pages: this layer's pool. The chunk's `count` real
    tokens sit at positions `tokens_start...` of the sequence whose block table is
    `table [M]`. Returns (x, k_pages, v_pages).
    """
    layer = model_def.merge(params)
    block_size, num_blocks = k_pages.shape[1], k_pages.shape[0]
    index = jnp.arange(x.shape[0], dtype=jnp.int32)
    positions = tokens_start + index
    slots = token_slots(table, jnp.where(index < count, positions, -1),
                        block_size=block_size, num_blocks=num_blocks)
    attend = _chunk_attend(table, tokens_start, count, inv_freq, backend, mesh)
    return layer(x, positions, slots, 0, k_pages, v_pages, attend)


@jax.jit
def read_layers(pool: KVPool, ids):
    """Pool blocks `ids [n]` of a pool on one device, layer by layer: `(k, v)`, each a
    tuple of L `[n, bs, Hkv, D]` arrays."""
    return tuple(p[ids] for p in pool.k), tuple(p[ids] for p in pool.v)


@jax.jit
def read_blocks(pool: KVPool, ids):
    """Pool blocks `ids [n]` of a pool on one device: `k, v [L, n, bs, Hkv, D]`."""
    return jnp.stack([p[ids] for p in pool.k]), jnp.stack([p[ids] for p in pool.v])
