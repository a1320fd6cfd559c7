"""Jitted steps of a model over its KV pool.

`ModelRunner` owns the parameters, the pool and the allocator of its blocks. Its main
step is ragged: one call runs the query tokens of many sequences packed together — a
decode's one token, a chunk of a prompt — through the model and
`ragged_paged_attention`, so one step prefills several turns and decodes the batch. The
packed token count is bucketed to powers of two; block tables have one width (the
longest context) and one height (`max_seqs`), so a handful of compilations serve every
request. The pool is donated to each step and updated in place.

A pool sharded over a device mesh (DistAttention) runs a step's sequences as one
prefill per prompt chunk and one decode batch instead, through `jattn.distributed`. When the
mesh spans several processes, the leader's runner is given the group
(`jattn.distributed.group.GroupLeader`): each public step is first sent to the followers, whose
runners `replay` it, and its logits come back on the leader's first device.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jattn.block_allocator import BlockAllocator
from jattn.distributed import DistributedBlockAllocator, prefill_attention
from jattn.distributed import paged_attention as dist_paged_attention
from jattn.distributed.pool_shards import PoolShards
from jattn.model.kv_cache import (
    KVPool,
    blocks_for,
    bucket,
    padded_table,
    powers_of_two,
    token_slots,
)
from jattn.model.llama import LlamaForCausalLM
from jattn.positions import inverse_frequencies
from pallas_kernels import paged_attention, ragged_paged_attention

KV_AXIS = "kv"  # the mesh axis a KV pool is sharded over
LOADING_CHUNK = 64
"""Most tokens `prefill_loading` runs layer by layer; a turn's later tokens go to the
ragged steps, batched with other turns."""


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


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a step: `tokens` written at positions `start...` of the
    sequence whose pool blocks are `blocks` (covering every position up to
    `start + len(tokens)`)."""

    tokens: list[int]
    start: int
    blocks: list[int]


def _prefill_attend(table, start, count, inv_freq, backend, mesh):
    """How one sequence's prefill chunk meets a layer's pool (table `[M]`): as a ragged
    batch of one sequence, or with a `mesh` attended where the blocks lie
    (DistAttention)."""

    def attend(layer, q, k_pages, v_pages):
        if mesh is not None:
            return prefill_attention(q, k_pages, v_pages, table, q_offset=start,
                                     kv_length=start + count, mesh=mesh, axis=KV_AXIS,
                                     key_rope_inv_freq=inv_freq)[0]
        return ragged_paged_attention(
            q, k_pages, v_pages, table[None], jnp.stack([0, count]).astype(jnp.int32),
            (start + count)[None].astype(jnp.int32), key_rope_inv_freq=inv_freq,
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


@functools.partial(jax.jit, static_argnames=("graphdef", "backend"),
                   donate_argnames=("pool",))
def _ragged_step(graphdef, state, pool, tokens, positions, sequences, query_starts,
                 kv_lengths, tables, logit_rows, *, backend):
    """The query tokens of up to `S` sequences packed together, through the model.

    tokens, positions, sequences `[T]` (each token's position and sequence; position -1
    for padding: nothing written); query_starts `[S + 1]`, kv_lengths `[S]`, tables
    `[S, M]` as `ragged_paged_attention` takes them; logit_rows `[R]`: the tokens whose
    logits are wanted. Returns (logits `[R, V]` float32, pool).
    """
    model = nnx.merge(graphdef.value, state)
    config = model.config
    inv_freq = jnp.asarray(inverse_frequencies(config.rope, config.head_dim))
    slots = jax.vmap(lambda sequence, position: token_slots(
        tables[sequence], position[None], block_size=pool.block_size,
        num_blocks=pool.num_blocks)[0])(sequences, positions)

    def attend(layer, q, k_pages, v_pages):
        return ragged_paged_attention(q, k_pages, v_pages, tables, query_starts, kv_lengths,
                                      key_rope_inv_freq=inv_freq, backend=backend)[0]

    return model(tokens, jnp.maximum(positions, 0), slots, pool, attend, rows=logit_rows)


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


def _blocks_of(pool: KVPool, ids):
    """Pool blocks `ids [n]`: `k, v [L, n, bs, Hkv, D]`."""
    return jnp.stack([p[ids] for p in pool.k]), jnp.stack([p[ids] for p in pool.v])


_read_blocks = jax.jit(_blocks_of)


class ModelRunner:
    """A model, its KV pool of `num_blocks` blocks of `block_size` tokens, and its steps.

    Steps run at most `max_seqs` sequences and contexts of at most `max_context` tokens
    (the block tables' height and width); `prefill_chunk` tokens is the most a step packs
    (the largest bucket compiled)."""

    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, max_context: int,
                 block_size: int = 16, prefill_chunk: int = 512, max_seqs: int = 32,
                 backend: str = "auto", mesh=None, group=None):
        for name, value in (("prefill_chunk", prefill_chunk), ("max_seqs", max_seqs),
                            ("max_context", max_context)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.config = model.config
        self.mesh = mesh
        self.group = group
        graphdef, self.state = nnx.split(model)
        self.graphdef = HashedOnce(graphdef)
        self.layer_graphdef = HashedOnce(nnx.split(model.layers[0])[0])
        self.layer_states = [nnx.split(layer)[1] for layer in model.layers]
        self.inv_freq = jnp.asarray(inverse_frequencies(self.config.rope, self.config.head_dim))
        self.dtype = model.embed_tokens.embedding[...].dtype
        pool_shape = dict(num_layers=self.config.num_layers, num_blocks=num_blocks,
                          block_size=block_size, num_kv_heads=self.config.num_kv_heads,
                          head_dim=self.config.head_dim, dtype=self.dtype)
        self.allocator = BlockAllocator(num_blocks)
        if mesh is not None:
            devices = mesh.shape[KV_AXIS]
            if num_blocks % devices:
                raise ValueError(f"num_blocks ({num_blocks}) must split evenly over the "
                                 f"{devices} devices of the KV mesh")
            replicated = NamedSharding(mesh, PartitionSpec())
            # From host copies: a mesh over several processes takes only host values.
            self.state, self.layer_states = jax.device_put(
                jax.tree.map(np.asarray, (self.state, self.layer_states)), replicated)
            # Each device materialises only its own blocks.
            self.pool = KVPool.create(**pool_shape,
                                      sharding=NamedSharding(mesh, PartitionSpec(KV_AXIS)))
            self.allocator = DistributedBlockAllocator(devices, num_blocks // devices)
            self.load_sharding = replicated
            self._read_blocks = jax.jit(_blocks_of, out_shardings=(replicated, replicated))
            self.shards = PoolShards(mesh, num_blocks, KV_AXIS)
        else:
            self.pool = KVPool.create(**pool_shape)
            self._read_blocks = _read_blocks
            # Committed to one device from the start: a layer-wise load hands the steps
            # committed arrays, and jit keys its cache on committedness, so an uncommitted
            # pool would be compiled again for every shape at the first load.
            self.load_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            self.state, self.layer_states, self.pool = jax.device_put(
                (self.state, self.layer_states, self.pool), self.load_sharding)
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.max_seqs = max_seqs
        self.table_width = bucket(blocks_for(max_context, block_size), minimum=4)
        self.backend = backend

    def _table(self, blocks: list[int]):
        return padded_table(blocks, self.table_width)

    def step_buckets(self) -> list[int]:
        """The packed token counts a step is compiled for."""
        return powers_of_two(8, bucket(self.prefill_chunk, minimum=8))

    def logit_rows(self, tokens: int) -> int:
        """Rows of logits a step of `tokens` packed tokens returns, and the sequences
        its tables have room for: one per token bucketed, at most `max_seqs`."""
        return min(bucket(tokens, minimum=8), self.max_seqs)

    def run(self, segments: list[Segment]):
        """One step over `segments` (at most `max_seqs`, together at most
        `prefill_chunk` tokens): writes their KV and returns logits `[R, V]` float32 of
        each segment's last token, row i for segment i; rows from len(segments) on are
        padding (R is `logit_rows`, so that reading a row never compiles a slice)."""
        total = sum(len(s.tokens) for s in segments)
        if not segments or len(segments) > self.max_seqs or total > bucket(self.prefill_chunk, 8):
            raise ValueError(f"a step takes 1 to {self.max_seqs} segments of at most "
                             f"{self.prefill_chunk} tokens in all, got {len(segments)} of "
                             f"{total}")
        with self._announce("run", segments=[[_ints(s.tokens), int(s.start), _ints(s.blocks)]
                                             for s in segments]):
            return self._finish(self._run(segments))

    def replay(self, op: str, args: dict) -> None:
        """Runs a step the group's leader announced (`op` and its JSON arguments), its
        results dropped: a follower's share of the step."""
        if op == "run":
            self._run([Segment(tokens, start, blocks) for tokens, start, blocks
                       in args["segments"]])
        elif op == "prefill":
            self._prefill(args["tokens"], args["start"], args["blocks"],
                          all_logits=args["all_logits"])
        elif op == "decode":
            self._decode(args["tokens"], args["positions"], args["block_lists"])
        elif op == "warm_up":
            self._warm_up(loading=args["loading"])
        else:
            raise ValueError(f"the group's leader sent an unknown step {op!r}")

    def _announce(self, op: str, **args):
        """A context around a public step: with a group, sends it to the followers
        first and times it until `_finish`; alone, nothing."""
        if self.group is None:
            return contextlib.nullcontext()
        return self.group.step(op, args)

    def _finish(self, logits):
        """With a group: waits for the step (inside the group's timing) and gives its
        logits on this process's first device, where sampling runs without the
        followers. Alone: the logits as they are."""
        if self.group is None:
            return logits
        return jax.block_until_ready(logits).addressable_data(0)

    def _check_alone(self, step: str) -> None:
        """Layer-by-layer loads and copies in and out of the whole pool do not run in a
        group of processes (its followers would not join them): the group's store moves
        each process's own blocks at once (`read_own_blocks`, `write_own_blocks`)."""
        if self.group is not None:
            raise RuntimeError(f"{step} does not run in a group of processes")

    @property
    def logits_sharding(self):
        """Where the steps' logits are returned, and sampled."""
        if self.group is not None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return self.load_sharding

    def _run(self, segments: list[Segment]):
        if self.mesh is not None:
            return self._run_over_mesh(segments)
        total = sum(len(s.tokens) for s in segments)
        size = bucket(total, minimum=8)
        height = self.logit_rows(total)  # sequences: at most one per token, max_seqs
        tokens = np.zeros(size, np.int32)
        positions = np.full(size, -1, np.int32)
        sequences = np.zeros(size, np.int32)
        starts = np.full(height + 1, total, np.int32)
        kv_lengths = np.zeros(height, np.int32)
        tables = np.zeros((height, self.table_width), np.int32)
        rows = np.zeros(height, np.int32)
        offset = 0
        for i, segment in enumerate(segments):
            count = len(segment.tokens)
            end = offset + count
            tokens[offset:end] = segment.tokens
            positions[offset:end] = np.arange(segment.start, segment.start + count)
            sequences[offset:end] = i
            starts[i] = offset
            kv_lengths[i] = segment.start + count
            tables[i, :len(segment.blocks)] = segment.blocks
            rows[i] = end - 1
            offset = end
        logits, self.pool = _ragged_step(
            self.graphdef, self.state, self.pool, tokens, positions, sequences, starts,
            kv_lengths, tables, rows, backend=self.backend)
        return logits

    def _run_over_mesh(self, segments: list[Segment]):
        """`run` on a sharded pool: each prompt chunk prefilled alone, the one-token
        segments decoded as one batch; the rows stacked in the segments' order."""
        decodes = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
        rows: dict[int, jax.Array] = {}
        if decodes:
            logits = self._decode([segments[i].tokens[0] for i in decodes],
                                 [segments[i].start for i in decodes],
                                 [segments[i].blocks for i in decodes])
            rows.update((i, logits[n]) for n, i in enumerate(decodes))
        for i, segment in enumerate(segments):
            if i not in rows:
                rows[i] = self._prefill(segment.tokens, segment.start, segment.blocks)
        padding = [jnp.zeros_like(rows[0])] * (self.logit_rows(len(segments)) - len(segments))
        return jnp.stack([rows[i] for i in range(len(segments))] + padding)

    def prefill(self, tokens, start: int, blocks: list[int], *, all_logits: bool = False):
        """Writes the KV of `tokens` (at positions `start, start+1, ...`) into `blocks`,
        which must cover every position up to `start + len(tokens)`, in steps of
        `prefill_chunk` tokens.

        Returns the last token's logits `[V]` float32, or with `all_logits` every token's
        `[len(tokens), V]`.
        """
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        with self._announce("prefill", tokens=_ints(tokens), start=int(start),
                            blocks=_ints(blocks), all_logits=all_logits):
            return self._finish(self._prefill(tokens, start, blocks, all_logits=all_logits))

    def _prefill(self, tokens, start: int, blocks: list[int], *, all_logits: bool = False):
        tokens = np.asarray(tokens, np.int32)
        table = self._table(blocks)
        outputs = []
        for offset in range(0, len(tokens), self.prefill_chunk):
            piece = tokens[offset:offset + self.prefill_chunk]
            if self.mesh is None and not all_logits:
                outputs.append(self._run([Segment(piece, start + offset, blocks)])[0])
                continue
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
        `AttentionStore.load_layers`. R is one of `load_row_buckets`.
        Runs one layer per step, each writing its layer's arrivals before attending, so
        layer l+1 is still in transit while layer l computes. At most `LOADING_CHUNK`
        tokens (callers prefill the rest with `run`). Returns the last token's logits
        `[V]` float32.
        """
        self._check_alone("prefill_loading")
        first = np.asarray(tokens, np.int32)
        if not 1 <= len(first) <= LOADING_CHUNK:
            raise ValueError(f"prefill_loading takes 1 to {LOADING_CHUNK} tokens, "
                             f"got {len(first)}")
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
        return _logits_step(self.graphdef, self.state, x, jnp.int32(len(first)))

    def load_row_buckets(self) -> list[int]:
        """The row counts a load for `prefill_loading` is padded to (`bucket(n, 4)` for n
        blocks)."""
        return powers_of_two(4, self.table_width)

    def warm_up(self, *, loading: bool = False) -> int:
        """Compiles every step a server can meet — each packed token count (on a mesh,
        each prefill chunk length and decode batch) and, with `loading`, each chunk length
        of `prefill_loading` with each count of rows arriving — so no request pays for a
        compilation. Writes nothing. Returns the shapes compiled."""
        with self._announce("warm_up", loading=loading):
            return self._warm_up(loading=loading)  # it waits for the compiled steps

    def _warm_up(self, *, loading: bool = False) -> int:
        if self.mesh is None:
            shapes = [("ragged", t, 0) for t in self.step_buckets()]
        else:
            shapes = [("prefill", t, 0) for t in powers_of_two(16, bucket(self.prefill_chunk))]
            shapes += [("decode", b, 0) for b in powers_of_two(1, bucket(self.max_seqs, 1))]
        if loading:
            shapes += [("loading", t, rows) for rows in self.load_row_buckets()
                       for t in powers_of_two(16, bucket(min(LOADING_CHUNK, self.prefill_chunk)))]
        table = padded_table([], self.table_width)
        for kind, size, rows in tqdm(shapes, desc="compiling", unit="shape"):
            if kind == "loading":
                self._warm_up_loading(size, rows, table)
            elif kind == "ragged":
                height = self.logit_rows(size)
                _, self.pool = _ragged_step(
                    self.graphdef, self.state, self.pool, np.zeros(size, np.int32),
                    np.full(size, -1, np.int32), np.zeros(size, np.int32),
                    np.zeros(height + 1, np.int32), np.zeros(height, np.int32),
                    np.zeros((height, self.table_width), np.int32),
                    np.zeros(height, np.int32), backend=self.backend)
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

    def _warm_up_loading(self, tokens: int, rows: int, table) -> None:
        """Runs `prefill_loading`'s steps once for a chunk of `tokens`, loading `rows`
        rows of zeros to ids past the pool (dropped)."""
        pages = self.pool.k[0]
        arrivals = jax.device_put(jnp.zeros((rows, *pages.shape[1:]), pages.dtype),
                                  self.load_sharding)  # where a load delivers them
        ids = np.full(rows, pages.shape[0], np.int32)
        x = _embed_step(self.graphdef, self.state, np.zeros(tokens, np.int32))
        new_k, new_v = list(self.pool.k), list(self.pool.v)
        x, new_k[0], new_v[0] = _layer_step(
            self.layer_graphdef, self.layer_states[0], x, new_k[0], new_v[0], ids, arrivals,
            arrivals, jnp.int32(0), jnp.int32(0), table, self.inv_freq, backend=self.backend,
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
        self._check_alone("copy_out")
        count = len(block_ids)
        padded = np.full(bucket(count, minimum=1), block_ids[-1], np.int32)
        padded[:count] = block_ids  # a few shapes, so a few compilations
        k, v = self._read_blocks(self.pool, padded)
        sharding = self.host_sharding(memory_kind)
        if sharding is not None:
            k, v = jax.device_put((k, v), sharding)  # the copy starts now

        def arrays():
            return tuple(np.ascontiguousarray(np.asarray(a)[:, :count]) for a in (k, v))

        return arrays

    def warm_up_copies(self, max_blocks: int, memory_kind: str | None = None) -> int:
        """Compiles `copy_out` for every count of blocks up to `max_blocks` (powers of
        two). Returns the shapes compiled."""
        self._check_alone("warm_up_copies")
        counts = powers_of_two(1, bucket(max_blocks, minimum=1))
        sharding = self.host_sharding(memory_kind)
        for count in counts:
            k, v = jax.block_until_ready(self._read_blocks(self.pool, np.zeros(count, np.int32)))
            if sharding is not None:
                jax.block_until_ready(jax.device_put((k, v), sharding))
        return len(counts)

    @property
    def loads_layer_by_layer(self) -> bool:
        """Whether blocks from the store arrive through `prefill_loading`; in a group
        each process writes its own at once (`write_own_blocks`)."""
        return self.group is None

    def read_own_blocks(self, block_ids: list[int]):
        """Over a mesh: starts copying pool blocks `block_ids` out of the devices that
        hold them, each on its own (no collective; in a group every process runs it, as
        a step of the group's store). Returns a function that waits and gives this
        process's blocks among them, `{id: BlockKV}`."""
        return self.shards.read(self.pool, block_ids)

    def write_own_blocks(self, block_ids: list[int], blocks: dict) -> None:
        """Over a mesh: writes into pool blocks `block_ids` those on this process's
        devices, `blocks[id]` (a `BlockKV`); every process of a group runs it with the
        same ids, each giving its own."""
        self.pool = self.shards.write(self.pool, block_ids, blocks)

    def warm_up_own_blocks(self, max_blocks: int) -> int:
        """Compiles `read_own_blocks` and `write_own_blocks` for up to `max_blocks` ids
        at once, writing nothing. Returns the shapes compiled."""
        self.pool, shapes = self.shards.warm_up(self.pool, max_blocks)
        return shapes

    def decode(self, tokens, positions, block_lists: list[list[int]]):
        """One step for a batch: token i at `positions[i]` of the sequence whose blocks are
        `block_lists[i]`. Returns logits `[R, V]` float32: row i is sequence i's, rows from
        B on are padding (returned as they are, so that reading a row never compiles a
        slice for a new batch size)."""
        with self._announce("decode", tokens=_ints(tokens), positions=_ints(positions),
                            block_lists=[_ints(b) for b in block_lists]):
            return self._finish(self._decode(tokens, positions, block_lists))

    def _decode(self, tokens, positions, block_lists: list[list[int]]):
        if self.mesh is None:
            return self._run([Segment([token], position, blocks) for token, position, blocks
                             in zip(tokens, positions, block_lists)])
        batch = len(tokens)
        rows = bucket(batch, minimum=1)
        tables = np.stack([self._table(b) for b in block_lists] +
                          [self._table([])] * (rows - batch))
        padded_tokens = np.zeros(rows, np.int32)
        padded_tokens[:batch] = tokens
        padded_positions = np.full(rows, -1, np.int32)
        padded_positions[:batch] = positions
        logits, self.pool = _decode_step(
            self.graphdef, self.state, self.pool, padded_tokens, padded_positions, tables,
            backend=self.backend, mesh=self.mesh)
        return logits


def _ints(values) -> list[int]:
    """Python ints of `values` (a list or an integer array), as a step's message holds
    them."""
    return [int(v) for v in values]
