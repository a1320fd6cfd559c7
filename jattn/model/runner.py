"""Jitted prefill and decode steps of a model over its KV pool.

`ModelRunner` owns the parameters, the pool and the allocator of its blocks. Shapes that
reach jit are bucketed to powers of two (chunk lengths, block-table widths, batch) so a
handful of compilations serve every request. The pool is donated to each step and
updated in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jattn.block_allocator import BlockAllocator
from jattn.dist import DistributedBlockAllocator, prefill_attention
from jattn.dist import paged_attention as dist_paged_attention
from jattn.model.kv_cache import (
    KVPool,
    blocks_for,
    bucket,
    gather_sequence,
    padded_table,
    powers_of_two,
    token_slots,
)
from jattn.model.llama import LlamaForCausalLM
from jattn.positions import inverse_frequencies
from pallas_kernels import flash_attention, paged_attention

KV_AXIS = "kv"  # the mesh axis a KV pool is sharded over


class HashedOnce:
    """A static jit argument whose hash is computed once. jit hashes its static arguments
    on every call, and a flax `GraphDef` hashes by walking the whole module graph (0.33 ms
    a call for the embedded model's, 1.1 ms for Llama-3.2-1B's, on a 2-core x86 host:
    every prefill and decode step paid it); the steps take the model's graph wrapped in
    this and read it as `.value`."""

    __slots__ = ("value", "_hash")

    def __init__(self, value):
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, HashedOnce) and (
            self.value is other.value or self.value == other.value)


def _prefill_attend(table, start, count, inv_freq, backend, mesh):
    """How a prefill chunk's queries meet a layer's pool: the sequence's blocks gathered
    for `flash_attention`, or with a `mesh` attended where they lie (DistAttention)."""

    def attend(layer, q, k_pages, v_pages):
        if mesh is not None:
            return prefill_attention(q, k_pages, v_pages, table, q_offset=start,
                                     kv_length=start + count, mesh=mesh, axis=KV_AXIS,
                                     key_rope_inv_freq=inv_freq)[0]
        return flash_attention(q, gather_sequence(k_pages, table),
                               gather_sequence(v_pages, table), causal=True, q_offset=start,
                               kv_length=start + count, key_rope_inv_freq=inv_freq,
                               backend=backend)[0]

    return attend


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "all_logits", "mesh"),
                   donate_argnames=("pool",))
def _prefill_step(graphdef, state, pool, tokens, start, count, table, *, backend, all_logits,
                  mesh=None):
    """Prefills `count` of the `T` (bucketed) `tokens` at positions `start...`.

    table `[M]` is the sequence's block table. Returns (logits `[T, V]` if `all_logits`
    else `[V]` of the last real token, pool). With a `mesh`, the pool is sharded over
    its "kv" axis and attention runs as DistAttention.
    """
    model = nnx.merge(graphdef.value, state)
    config = model.config
    inv_freq = jnp.asarray(inverse_frequencies(config.rope, config.head_dim))
    index = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    positions = start + index
    slots = token_slots(table, jnp.where(index < count, positions, -1),
                        block_size=pool.block_size, num_blocks=pool.num_blocks)

    attend = _prefill_attend(table, start, count, inv_freq, backend, mesh)
    logits, pool = model(tokens, positions, slots, pool, attend)
    return (logits if all_logits else logits[count - 1]), pool


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "mesh"),
                   donate_argnames=("pool",))
def _decode_step(graphdef, state, pool, tokens, positions, tables, *, backend, mesh=None):
    """One token for each of `B` sequences: tokens, positions `[B]`, tables `[B, M]`.

    A row with position -1 is padding: nothing is written and its logits are unused.
    Returns (logits `[B, V]`, pool).
    """
    model = nnx.merge(graphdef.value, state)
    config = model.config
    inv_freq = jnp.asarray(inverse_frequencies(config.rope, config.head_dim))
    slots = jax.vmap(lambda table, position: token_slots(
        table, position[None], block_size=pool.block_size, num_blocks=pool.num_blocks)[0])(
            tables, positions)

    def attend(layer, q, k_pages, v_pages):
        if mesh is not None:
            return dist_paged_attention(q, k_pages, v_pages, tables, positions + 1, mesh=mesh,
                                        axis=KV_AXIS, key_rope_inv_freq=inv_freq,
                                        backend=backend)[0]
        return paged_attention(q, k_pages, v_pages, tables, positions + 1,
                               key_rope_inv_freq=inv_freq, backend=backend)[0]

    return model(tokens, jnp.maximum(positions, 0), slots, pool, attend)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed_step(graphdef, state, tokens):
    """tokens `[T]` -> hidden states `[T, hidden]`."""
    return nnx.merge(graphdef.value, state).embed(tokens)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _logits_step(graphdef, state, x, count):
    """The last real token's logits `[V]` from hidden states `x [T, hidden]`."""
    return nnx.merge(graphdef.value, state).logits(x[count - 1][None])[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "backend", "mesh"),
                   donate_argnames=("k_pages", "v_pages"))
def _layer_step(graphdef, state, x, k_pages, v_pages, load_ids, load_k, load_v, tokens_start,
                count, table, inv_freq, *, backend, mesh=None):
    """One decoder layer of a prefill chunk, after writing the blocks that arrived for it.

    x `[T, hidden]`; k_pages, v_pages: this layer's pool; load_k, load_v
    `[R, block_size, Hkv, D]` go to pool blocks `load_ids [R]` (ids past the pool: padding,
    dropped). The chunk's `count` real tokens sit at positions `tokens_start...` of the
    sequence whose block table is `table [M]`. Returns (x, k_pages, v_pages).
    """
    layer = nnx.merge(graphdef.value, state)
    k_pages = k_pages.at[load_ids].set(load_k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[load_ids].set(load_v.astype(v_pages.dtype), mode="drop")
    block_size, num_blocks = k_pages.shape[1], k_pages.shape[0]
    index = jnp.arange(x.shape[0], dtype=jnp.int32)
    positions = tokens_start + index
    slots = token_slots(table, jnp.where(index < count, positions, -1),
                        block_size=block_size, num_blocks=num_blocks)

    attend = _prefill_attend(table, tokens_start, count, inv_freq, backend, mesh)
    return layer(x, positions, slots, 0, k_pages, v_pages, attend)


@jax.jit
def _read_blocks(pool: KVPool, ids):
    """Copies pool blocks `ids [n]` out: `k, v [L, n, bs, Hkv, D]`."""
    return jnp.stack([p[ids] for p in pool.k]), jnp.stack([p[ids] for p in pool.v])


class ModelRunner:
    """A model, its KV pool of `num_blocks` blocks of `block_size` tokens, and its steps."""

    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int = 16,
                 prefill_chunk: int = 512, backend: str = "auto", mesh=None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.config = model.config
        self.mesh = mesh
        graphdef, self.state = nnx.split(model)
        self.graphdef = HashedOnce(graphdef)
        self.layer_graphdef = HashedOnce(nnx.split(model.layers[0])[0])
        self.layer_states = [nnx.split(layer)[1] for layer in model.layers]
        self.inv_freq = jnp.asarray(inverse_frequencies(self.config.rope, self.config.head_dim))
        self.dtype = model.embed_tokens.embedding[...].dtype
        self.pool = KVPool.create(num_layers=self.config.num_layers, num_blocks=num_blocks,
                                  block_size=block_size, num_kv_heads=self.config.num_kv_heads,
                                  head_dim=self.config.head_dim, dtype=self.dtype)
        self.allocator = BlockAllocator(num_blocks)
        if mesh is not None:
            devices = mesh.shape[KV_AXIS]
            if num_blocks % devices:
                raise ValueError(f"num_blocks ({num_blocks}) must split evenly over the "
                                 f"{devices} devices of the KV mesh")
            replicated = NamedSharding(mesh, PartitionSpec())
            self.state = jax.device_put(self.state, replicated)
            self.layer_states = jax.device_put(self.layer_states, replicated)
            self.pool = jax.device_put(self.pool, NamedSharding(mesh, PartitionSpec(KV_AXIS)))
            self.allocator = DistributedBlockAllocator(devices, num_blocks // devices)
            self.load_sharding = replicated
        else:
            # Committed to one device from the start: a layer-wise load hands the steps
            # committed arrays, and jit keys its cache on committedness, so an uncommitted
            # pool would be compiled again for every shape at the first load.
            self.load_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            self.state, self.layer_states, self.pool = jax.device_put(
                (self.state, self.layer_states, self.pool), self.load_sharding)
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.backend = backend

    def _table(self, blocks: list[int]):
        return padded_table(blocks, bucket(len(blocks), minimum=4))

    def prefill(self, tokens, start: int, blocks: list[int], *, chunk: int | None = None,
                all_logits: bool = False):
        """Writes the KV of `tokens` (at positions `start, start+1, ...`) into `blocks`,
        which must cover every position up to `start + len(tokens)`, in chunks.

        Returns the last token's logits `[V]` float32, or with `all_logits` every token's
        `[len(tokens), V]`.
        """
        tokens = np.asarray(tokens, np.int32)
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        chunk = chunk or self.prefill_chunk
        table = self._table(blocks)
        outputs = []
        for offset in range(0, len(tokens), chunk):
            piece = tokens[offset:offset + chunk]
            padded = np.zeros(bucket(len(piece)), np.int32)
            padded[:len(piece)] = piece
            logits, self.pool = _prefill_step(
                self.graphdef, self.state, self.pool, padded,
                jnp.int32(start + offset), jnp.int32(len(piece)), table,
                backend=self.backend, all_logits=all_logits, mesh=self.mesh)
            outputs.append(logits[:len(piece)] if all_logits else logits)
        return jnp.concatenate(outputs) if all_logits else outputs[-1]

    def prefill_loading(self, tokens, start: int, blocks: list[int], load_ids: list[int],
                        load) -> jax.Array:
        """`prefill`, while the KV of pool blocks `load_ids` arrives layer by layer.

        `load.layer(l, after=x)` gives layer l's `(k, v)` `[R, block_size, Hkv, D]`
        (R >= len(load_ids), extra rows ignored) placed by `load_sharding`, e.g. an
        `AttentionStore.load_layers`.
        The first chunk runs one layer per step, each writing its layer's arrivals before
        attending, so layer l+1 is still in transit while layer l computes; the rest runs
        as `prefill`. Returns the last token's logits `[V]` float32.
        """
        tokens = np.asarray(tokens, np.int32)
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        first = tokens[:self.prefill_chunk]
        padded = np.zeros(bucket(len(first)), np.int32)
        padded[:len(first)] = first
        table = self._table(blocks)
        x = _embed_step(self.graphdef, self.state, padded)
        ids = None
        new_k, new_v = list(self.pool.k), list(self.pool.v)
        self.pool = None  # its layers are donated one by one below
        try:
            for layer, state in enumerate(self.layer_states):
                k, v = load.layer(layer, after=x)
                if ids is None:
                    ids = np.full(k.shape[0], new_k[0].shape[0], np.int32)
                    ids[:len(load_ids)] = load_ids
                x, new_k[layer], new_v[layer] = _layer_step(
                    self.layer_graphdef, state, x, new_k[layer], new_v[layer], ids, k, v,
                    jnp.int32(start), jnp.int32(len(first)), table, self.inv_freq,
                    backend=self.backend, mesh=self.mesh)
        finally:
            self.pool = KVPool(tuple(new_k), tuple(new_v))
        if len(tokens) > len(first):
            return self.prefill(tokens[len(first):], start + len(first), blocks)
        return _logits_step(self.graphdef, self.state, x, jnp.int32(len(first)))

    def warm_up(self, *, max_context: int, max_batch: int, loading: bool = False) -> int:
        """Compiles every prefill and decode shape a server can meet (chunk lengths and
        batch sizes by power of two, block-table widths up to `max_context` tokens) and,
        with `loading`, every shape of `prefill_loading`, so no request pays for a
        compilation. Writes nothing. Returns the shapes compiled."""
        widths = powers_of_two(4, bucket(blocks_for(max_context, self.block_size), minimum=4))
        chunks = powers_of_two(16, bucket(min(self.prefill_chunk, max_context)))
        shapes = [("prefill", t, w) for w in widths for t in chunks]
        shapes += [("decode", b, w) for w in widths for b in powers_of_two(1, bucket(max_batch, 1))]
        if loading:
            shapes += [("loading", t, w) for w in widths for t in chunks]
        for kind, size, width in tqdm(shapes, desc="compiling", unit="shape"):
            table = padded_table([], width)
            if kind == "loading":
                self._warm_up_loading(size, table)
            elif kind == "prefill":
                _, self.pool = _prefill_step(
                    self.graphdef, self.state, self.pool, np.zeros(size, np.int32),
                    jnp.int32(0), jnp.int32(0), table, backend=self.backend, all_logits=False,
                    mesh=self.mesh)
            else:
                _, self.pool = _decode_step(
                    self.graphdef, self.state, self.pool, np.zeros(size, np.int32),
                    np.full(size, -1, np.int32), np.stack([table] * size),
                    backend=self.backend, mesh=self.mesh)
        jax.block_until_ready(self.pool)
        return len(shapes)

    def _warm_up_loading(self, tokens: int, table) -> None:
        """Runs `prefill_loading`'s steps once for a chunk of `tokens` and a table of its
        width, loading `width` rows of zeros to ids past the pool (dropped)."""
        width = table.shape[0]
        pages = self.pool.k[0]
        rows = jax.device_put(jnp.zeros((width, *pages.shape[1:]), pages.dtype),
                              self.load_sharding)  # where a load delivers them
        ids = np.full(width, pages.shape[0], np.int32)
        x = _embed_step(self.graphdef, self.state, np.zeros(tokens, np.int32))
        new_k, new_v = list(self.pool.k), list(self.pool.v)
        x, new_k[0], new_v[0] = _layer_step(
            self.layer_graphdef, self.layer_states[0], x, new_k[0], new_v[0], ids, rows, rows,
            jnp.int32(0), jnp.int32(0), table, self.inv_freq, backend=self.backend,
            mesh=self.mesh)
        self.pool = KVPool(tuple(new_k), tuple(new_v))
        _logits_step(self.graphdef, self.state, x, jnp.int32(1))

    def host_sharding(self, memory_kind: str | None):
        """Where `copy_out` puts blocks for host `memory_kind` (e.g. "pinned_host"), or
        None for a plain copy when they are read."""
        if memory_kind is None:
            return None
        return jax.sharding.SingleDeviceSharding(self.pool.k[0].devices().pop(),
                                                 memory_kind=memory_kind)

    def copy_out(self, block_ids: list[int], memory_kind: str | None = None):
        """Starts copying pool blocks `block_ids` out now (the next step donates the
        pool), into host memory of `memory_kind` (None: a plain copy when read). Returns
        a function that waits for the copy and gives `(k, v)` numpy arrays
        `[L, n, block_size, Hkv, D]`, n = len(block_ids)."""
        count = len(block_ids)
        padded = np.full(bucket(count, minimum=1), block_ids[-1], np.int32)
        padded[:count] = block_ids  # a few shapes, so a few compilations
        k, v = _read_blocks(self.pool, padded)
        sharding = self.host_sharding(memory_kind)
        if sharding is not None:
            k, v = jax.device_put((k, v), sharding)  # the copy starts now

        def arrays():
            return tuple(np.ascontiguousarray(np.asarray(a)[:, :count]) for a in (k, v))

        return arrays

    def warm_up_copies(self, max_blocks: int, memory_kind: str | None = None) -> int:
        """Compiles `copy_out` for every count of blocks up to `max_blocks` (powers of
        two). Returns the shapes compiled."""
        counts = powers_of_two(1, bucket(max_blocks, minimum=1))
        sharding = self.host_sharding(memory_kind)
        for count in counts:
            k, v = _read_blocks(self.pool, np.zeros(count, np.int32))
            if sharding is not None:
                k, v = jax.device_put((k, v), sharding)
            jax.block_until_ready((k, v))
        return len(counts)

    def decode(self, tokens, positions, block_lists: list[list[int]]):
        """One step for a batch: token i at `positions[i]` of the sequence whose blocks are
        `block_lists[i]`. Returns logits `[R, V]` float32, R = B rounded up to a power of
        two: row i is sequence i's, rows from B on are padding (returned as they are, so
        that reading a row never compiles a slice for a new batch size)."""
        batch = len(tokens)
        width = bucket(max(len(b) for b in block_lists), minimum=4)
        rows = bucket(batch, minimum=1)
        tables = np.stack([padded_table(b, width) for b in block_lists] +
                          [padded_table([], width)] * (rows - batch))
        padded_tokens = np.zeros(rows, np.int32)
        padded_tokens[:batch] = tokens
        padded_positions = np.full(rows, -1, np.int32)
        padded_positions[:batch] = positions
        logits, self.pool = _decode_step(
            self.graphdef, self.state, self.pool, padded_tokens, padded_positions, tables,
            backend=self.backend, mesh=self.mesh)
        return logits
