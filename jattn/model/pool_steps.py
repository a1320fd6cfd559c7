"""How a model's steps run where its KV pool lies: `SingleDeviceSteps` (the pool on one
device) and `MeshSteps` (the pool sharded over a device mesh, DistAttention; the mesh
may span the processes of a group, each process then running the same steps on its own
devices).

Both execute a `StepPlan` the same way (`PoolSteps.execute`): the copies of its saves
start first, then its segments run as one packed step, or its one segment runs layer by
layer while KV arrives for it. They differ in how a packed step runs (`run_segments`),
how blocks are copied out of the pool (`copy_out`), and which shapes a warm-up compiles
(`compile_steps`).

Compilations ahead of a request lower the jitted step functions against the pool's
shapes (`pool_spec`, `jax.ShapeDtypeStruct`s with its sharding) and compile them: nothing
runs and the pool is neither donated nor copied, so they may run on a thread of their own
while steps run (`jattn.model.compile_queue`). `jit(f).lower(...).compile()` fills the
cache that `jit(f)(...)` reads (jax 0.10), so those calls then compile nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from jattn.block_allocator import BlockAllocator
from jattn.distributed import DistributedBlockAllocator
from jattn.distributed.pool_shards import PoolShards
from jattn.model.kv_cache import KVPool, bucket, padded_table, powers_of_two
from jattn.model.llama import LlamaForCausalLM
from jattn.model.step_functions import (
    KV_AXIS,
    ModelDef,
    embed_step,
    layer_step,
    logits_step,
    mesh_decode_step,
    mesh_prefill_step,
    ragged_step,
    read_blocks,
    read_layers,
    write_rows,
)
from jattn.model.step_plan import (
    LOADING_CHUNK,
    Arrival,
    ArrivingRows,
    Segment,
    StepOutput,
    StepPlan,
    with_fed_tokens,
)
from jattn.positions import inverse_frequencies
from jattn.sampling import draw_arguments, draw_tokens
from jattn.store.layer_load import MIN_ROWS, saved_run
from jattn.store.pinned_run import PinnedRun
from jattn.store.tier import BlockKV

def shapes_of(tree):
    """`tree` with each array replaced by its `jax.ShapeDtypeStruct` (with its sharding):
    what a step is lowered against without touching the arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        tree)


SavedBlocks = Callable[[], dict[int, BlockKV]]
"""Waits for copies out of the pool; `{pool block: BlockKV}` of the blocks this process
holds."""


@dataclass(frozen=True)
class StepLimits:
    """The shapes a step is compiled for: at most `prefill_chunk` tokens packed, at most
    `max_seqs` sequences (the block tables' height), block tables `table_width` wide
    (the longest context, in blocks)."""

    prefill_chunk: int
    max_seqs: int
    table_width: int

    def table(self, blocks) -> np.ndarray:
        """A sequence's block table, int32 `[table_width]`."""
        return padded_table(list(blocks), self.table_width)

    def logit_rows(self, tokens: int) -> int:
        """Rows of logits a step of `tokens` packed tokens returns, and the sequences
        its tables have room for: one per token bucketed, at most `max_seqs`."""
        return min(bucket(tokens, minimum=8), self.max_seqs)

    def step_buckets(self) -> list[int]:
        """The packed token counts a step is compiled for."""
        return powers_of_two(8, bucket(self.prefill_chunk, minimum=8))

    def arrival_buckets(self) -> list[int]:
        """The token counts a step with KV arriving is compiled for."""
        return powers_of_two(16, bucket(min(LOADING_CHUNK, self.prefill_chunk)))

    def load_row_buckets(self) -> list[int]:
        """The row counts of the pieces KV arrives in for a step (powers of two from
        `layer_load.MIN_ROWS`, up to the bucket of a whole table)."""
        return powers_of_two(MIN_ROWS, bucket(self.table_width, minimum=MIN_ROWS))


class PoolSteps:
    """A model split for the jitted steps, its KV pool, and how a `StepPlan` runs over
    them (see the module docstring). A subclass places the model and the pool
    (`pool`, `load_sharding`, `logits_sharding`) and runs the packed steps.

    Attributes:
      pool: the `KVPool`, donated to each step and replaced by its result.
      pool_spec: the pool's shapes, dtypes and shardings (`shapes_of`), which
        compilations ahead of time lower against.
      load_sharding: where KV arriving layer by layer is expected.
      logits_sharding: where a step's logits are returned.
      save_memory_kind: the host memory kind blocks saved by a plan are copied to (e.g.
        "pinned_host"), or None for a plain host copy when they are read.
    """

    mesh = None  # the mesh that layer-by-layer steps attend over (None: one device)

    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, block_size: int,
                 limits: StepLimits, backend: str, save_memory_kind: str | None):
        config = model.config
        self.model_def, self.params = ModelDef.split(model)
        self.layer_def = ModelDef.split(model.layers[0])[0]
        self.layer_params = [ModelDef.split(layer)[1] for layer in model.layers]
        self.inv_freq = jnp.asarray(inverse_frequencies(config.rope, config.head_dim))
        self.dtype = model.embed_tokens.embedding[...].dtype
        self.pool_shape = dict(num_layers=config.num_layers, num_blocks=num_blocks,
                               block_size=block_size, num_kv_heads=config.num_kv_heads,
                               head_dim=config.head_dim, dtype=self.dtype)
        self.limits = limits
        self.vocab_size = config.vocab_size
        self.backend = backend
        self.save_memory_kind = save_memory_kind

    # ----- the pool's blocks ----------------------------------------------------------

    def new_allocator(self):
        """An allocator of the pool's block ids."""
        raise NotImplementedError

    def process_of(self, block: int) -> int:
        """The process whose device holds pool block `block`."""
        raise NotImplementedError

    def devices_of_process(self, process: int) -> list[int]:
        """The allocator's device numbers of process `process`'s devices."""
        raise NotImplementedError

    def write_blocks(self, block_ids: list[int], blocks: dict[int, BlockKV]) -> None:
        """Writes blocks into the pool at once (over a mesh; on one device KV from the
        store arrives layer by layer with a step instead)."""
        raise RuntimeError("blocks are written into the pool at once only over a mesh; "
                           "on one device they arrive layer by layer with a step")

    def compile_writes(self, max_blocks: int) -> int:
        """Compiles `write_blocks` for up to `max_blocks` ids at once."""
        raise RuntimeError("blocks are written into the pool at once only over a mesh")

    def compiled_text(self, blocks_per_device: int) -> dict[str, str]:
        """The compiled programs of a mesh as HLO text (see `MeshSteps.compiled_text`)."""
        raise RuntimeError("only steps over a mesh have collectives to read")

    # ----- a plan ---------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        """Runs a checked plan (`ModelRunner.execute`) on this process's devices."""
        saved = None
        if plan.saves:
            saved = functools.cache(self.copy_out([save.block for save in plan.saves],
                                                  self.save_memory_kind))
        tokens = None
        if plan.arrival is not None:
            logits = self.run_arriving(plan.segments[0], plan.arrival)
        elif plan.segments:
            logits, tokens = self.run_segments(plan)
        else:
            logits = None
        if plan.draws and tokens is None:
            tokens = self.draw(logits, plan.draws)
        return StepOutput(logits, saved, tokens)

    def run_segments(self, plan: StepPlan) -> tuple[jax.Array, jax.Array | None]:
        """One packed step over `plan.segments`: logits `[R, V]` as `StepOutput` has
        them, and the tokens of `plan.draws` if the step drew them (None: `draw` them
        from the logits)."""
        raise NotImplementedError

    def draw(self, logits: jax.Array, draws) -> jax.Array:
        """The tokens of `draws` (see `StepPlan.draws`) from a step's `logits [R, V]`,
        where they lie: `[max_seqs]` int32."""
        return draw_tokens(logits, *draw_arguments(draws, logits.shape[0]),
                           width=self.limits.max_seqs)

    def copy_out(self, block_ids: list[int], memory_kind: str | None) -> SavedBlocks:
        """Starts copying pool blocks `block_ids` out now (the next step donates the
        pool) into host memory of `memory_kind`; returns the function that waits for
        them (`StepOutput.saved`)."""
        raise NotImplementedError

    def run_arriving(self, segment: Segment, arrival: Arrival) -> jax.Array:
        """Runs `segment` one layer per step, each step first writing its layer of the
        blocks arriving (so layer l+1 is still in transit while layer l computes).
        Returns logits `[R, V]` float32: row 0 the segment's last token's, the others
        padding (R is `logit_rows` of the tokens bucketed)."""
        count = len(segment.tokens)
        tokens = np.zeros(bucket(count), np.int32)
        tokens[:count] = segment.tokens
        table = self.limits.table(segment.blocks)
        x = embed_step(self.model_def, self.params, tokens)
        ids = None
        new_k, new_v = list(self.pool.k), list(self.pool.v)
        self.pool = None  # its layers are donated one by one below
        try:
            for layer, params in enumerate(self.layer_params):
                pieces = arrival.source.layer(layer, after=x)
                if ids is None:
                    ids = [self._arriving_ids(piece, arrival.block_ids) for piece in pieces]
                for piece, piece_ids in zip(pieces, ids):
                    new_k[layer], new_v[layer] = write_rows(new_k[layer], new_v[layer],
                                                            piece_ids, piece.k, piece.v)
                x, new_k[layer], new_v[layer] = layer_step(
                    self.layer_def, params, x, new_k[layer], new_v[layer],
                    np.int32(segment.start), np.int32(count), table, self.inv_freq,
                    backend=self.backend, mesh=self.mesh)
        finally:
            self.pool = KVPool(tuple(new_k), tuple(new_v))
        rows = np.zeros(self.limits.logit_rows(len(tokens)), np.int32)
        rows[0] = count - 1
        return logits_step(self.model_def, self.params, x, rows)

    def _arriving_ids(self, piece: ArrivingRows, block_ids: tuple[int, ...]) -> np.ndarray:
        """The pool block of each row of `piece` (past the pool for rows not its own)."""
        ids = np.full(piece.k.shape[0], self.pool_spec.k[0].shape[0], np.int32)
        ids[:len(piece.indices)] = [block_ids[i] for i in piece.indices]
        return ids

    # ----- warm-up --------------------------------------------------------------------

    @property
    def step_tokens(self) -> int:
        """The most tokens a packed step takes without compiling: `prefill_chunk`
        (every packed step compiles at once)."""
        return self.limits.prefill_chunk

    def compile_steps(self) -> int:
        """Compiles every packed step a server can meet, writing nothing. Returns the
        shapes compiled."""
        raise NotImplementedError

    def compile_arrivals(self) -> int:
        """Compiles `run_arriving` for each token count, and the writes of each count of
        rows arriving, ahead of time (see the module docstring: safe from any thread).
        Returns the shapes compiled."""
        table = self.limits.table([])
        pages = self.pool_spec.k[0]
        row_buckets = self.limits.load_row_buckets()
        for rows in row_buckets:
            arriving = jax.ShapeDtypeStruct((rows, *pages.shape[1:]), pages.dtype,
                                            sharding=self.load_sharding)
            write_rows.lower(pages, self.pool_spec.v[0], np.zeros(rows, np.int32),
                             arriving, arriving).compile()
        token_buckets = self.limits.arrival_buckets()
        for tokens in token_buckets:
            x = embed_step.lower(self.model_def, self.params,
                                 np.zeros(tokens, np.int32)).compile().out_info
            out = layer_step.lower(
                self.layer_def, self.layer_params[0], x, pages, self.pool_spec.v[0],
                jnp.int32(0), jnp.int32(0), table, self.inv_freq, backend=self.backend,
                mesh=self.mesh).compile().out_info
            height = self.limits.logit_rows(tokens)
            logits = logits_step.lower(self.model_def, self.params, out[0],
                                       np.zeros(height, np.int32)).compile().out_info
            draw_tokens.lower(logits, *draw_arguments((), height),
                              width=self.limits.max_seqs).compile()
        return len(row_buckets) + len(token_buckets)

    def compile_copies(self, max_blocks: int, memory_kind: str | None) -> int:
        """Compiles `copy_out` into `memory_kind` for every count of blocks up to
        `max_blocks`. Returns the shapes compiled."""
        raise NotImplementedError

    def compile_saves(self, max_blocks: int) -> int:
        """Compiles the copies of up to `max_blocks` blocks a plan's saves make."""
        return self.compile_copies(max_blocks, self.save_memory_kind)


class SingleDeviceSteps(PoolSteps):
    """The pool and the model on one device; a packed step is one ragged step
    (`ragged_step`), whatever mix of decodes and prompt chunks it holds."""

    def __init__(self, model: LlamaForCausalLM, **kwargs):
        super().__init__(model, **kwargs)
        # Committed to one device from the start: a layer-wise load hands the steps
        # committed arrays, and jit keys its cache on committedness, so an uncommitted
        # pool would be compiled again for every shape at the first load.
        self.device = jax.devices()[0]
        self.load_sharding = self.logits_sharding = jax.sharding.SingleDeviceSharding(
            self.device)
        self.params, self.layer_params, self.pool = jax.device_put(
            (self.params, self.layer_params, KVPool.create(**self.pool_shape)),
            self.load_sharding)
        self.pool_spec = shapes_of(self.pool)
        # What a step without fed tokens reads for them.
        self.no_tokens = jax.device_put(np.zeros(self.limits.max_seqs, np.int32),
                                        self.load_sharding)
        # The packed steps compiled ahead, by (backend, tokens, logit rows); and per
        # backend their token counts, ascending (replaced whole: read from any thread).
        self._compiled: dict[tuple[str, int, int], jax.stages.Compiled] = {}
        self._ready: dict[str, tuple[int, ...]] = {}

    def new_allocator(self) -> BlockAllocator:
        """One allocator of the whole pool."""
        return BlockAllocator(self.pool_shape["num_blocks"])

    def process_of(self, block: int) -> int:
        return 0

    def devices_of_process(self, process: int) -> list[int]:
        return [0]

    def run_segments(self, plan: StepPlan) -> tuple[jax.Array, jax.Array | None]:
        """The segments' tokens packed into one `[T]` row (T bucketed), one block table
        per segment, `fed` tokens read on the device from `plan.fed_tokens`; logits of
        each segment's last token, or with `all_logits` of every token of the one
        segment; the tokens of `plan.draws`, drawn in the same step."""
        segments = plan.segments
        total = sum(len(s.tokens) for s in segments)
        size = self._size_for(total)
        height = self.limits.logit_rows(size)  # sequences: at most one per token
        tokens = np.zeros(size, np.int32)
        positions = np.full(size, -1, np.int32)
        sequences = np.zeros(size, np.int32)
        starts = np.full(height + 1, total, np.int32)
        kv_lengths = np.zeros(height, np.int32)
        tables = np.zeros((height, self.limits.table_width), np.int32)
        rows = np.zeros(height, np.int32)
        fed_rows = np.full(size, -1, np.int32)
        offset = 0
        for i, segment in enumerate(segments):
            count = len(segment.tokens)
            end = offset + count
            tokens[offset:end] = segment.tokens
            if segment.fed is not None:
                fed_rows[offset] = segment.fed
            positions[offset:end] = np.arange(segment.start, segment.start + count)
            sequences[offset:end] = i
            starts[i] = offset
            kv_lengths[i] = segment.start + count
            tables[i, :len(segment.blocks)] = segment.blocks
            rows[i] = end - 1
            offset = end
        if plan.all_logits:
            rows = np.arange(size, dtype=np.int32)
        fed = self.no_tokens if plan.fed_tokens is None else plan.fed_tokens
        step = self._compiled.get((self.backend, size, len(rows))) or functools.partial(
            ragged_step, self.model_def, backend=self.backend)
        logits, drawn, self.pool = step(
            self.params, self.pool, tokens, positions, sequences, starts, kv_lengths, tables,
            rows, fed, fed_rows, draw_arguments(plan.draws, len(rows)))
        return logits, (drawn if plan.draws else None)

    def _size_for(self, tokens: int) -> int:
        """The packed token count a step of `tokens` runs as: the smallest compiled that
        holds them, else their bucket (compiled when first run)."""
        ready = [size for size in self._ready.get(self.backend, ()) if size >= tokens]
        return ready[0] if ready else bucket(tokens, minimum=8)

    def _host_sharding(self, memory_kind: str | None):
        if memory_kind is None:
            return None
        return jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)

    def copy_out(self, block_ids: list[int], memory_kind: str | None) -> SavedBlocks:
        """The blocks copied out as one run: into `memory_kind` (e.g. "pinned_host"), a
        `PinnedRun` of per-layer arrays; with None, views of one 64-byte aligned,
        layer-major `[L, n, bs, Hkv, D]` numpy array each for keys and values (n =
        len(block_ids); `saved_run`). Either way a load moves a layer of them to the
        device as one piece, as it is."""
        count = len(block_ids)
        padded = np.full(bucket(count, minimum=1), block_ids[-1], np.int32)
        padded[:count] = block_ids  # a few shapes, so a few compilations
        sharding = self._host_sharding(memory_kind)
        if sharding is not None:
            layers = jax.device_put(read_layers(self.pool, padded), sharding)  # starts now

            def pinned() -> dict[int, BlockKV]:
                run = PinnedRun(*jax.block_until_ready(layers), count)
                return dict(zip(block_ids, run.blocks()))

            return pinned
        k, v = read_blocks(self.pool, padded)

        def blocks() -> dict[int, BlockKV]:
            keys, values = (saved_run(np.asarray(a)[:, :count]) for a in (k, v))
            return {block: BlockKV(keys[:, i], values[:, i])
                    for i, block in enumerate(block_ids)}

        return blocks

    @property
    def step_tokens(self) -> int:
        """The most tokens a packed step takes without compiling: the largest packed
        step compiled so far, at most `prefill_chunk` (`prefill_chunk` while none is:
        no warm-up, steps compile when first run)."""
        ready = self._ready.get(self.backend)
        return min(ready[-1], self.limits.prefill_chunk) if ready else self.limits.prefill_chunk

    def compile_steps(self) -> int:
        buckets = self.limits.step_buckets()
        for size in tqdm(buckets, desc="compiling", unit="shape"):
            self.compile_bucket(size)
        return len(buckets)

    def compile_bucket(self, size: int) -> None:
        """Compiles the packed step of `size` tokens ahead of time (see the module
        docstring: safe from any thread); steps of up to `size` tokens may run on it
        from then on (`step_tokens`)."""
        height, backend = self.limits.logit_rows(size), self.backend
        self._compiled[backend, size, height] = ragged_step.lower(
            self.model_def, self.params, self.pool_spec, np.zeros(size, np.int32),
            np.full(size, -1, np.int32), np.zeros(size, np.int32),
            np.zeros(height + 1, np.int32), np.zeros(height, np.int32),
            np.zeros((height, self.limits.table_width), np.int32), np.zeros(height, np.int32),
            self.no_tokens, np.full(size, -1, np.int32), draw_arguments((), height),
            backend=backend).compile()
        self._ready = {**self._ready, backend: tuple(sorted(
            {*self._ready.get(backend, ()), size}))}

    def compile_copies(self, max_blocks: int, memory_kind: str | None) -> int:
        counts = powers_of_two(1, bucket(max_blocks, minimum=1))
        sharding = self._host_sharding(memory_kind)
        for count in counts:
            ids = np.zeros(count, np.int32)
            if sharding is None:
                jax.block_until_ready(read_blocks(self.pool, ids))
            else:
                jax.block_until_ready(jax.device_put(read_layers(self.pool, ids), sharding))
        return len(counts)


class MeshSteps(PoolSteps):
    """The pool sharded over the "kv" axis of `mesh` (each device holding
    `num_blocks / devices` blocks, each process its own devices'), the model replicated;
    a packed step runs each prompt chunk as a prefill of its own and the one-token
    segments as one decode batch, attending where the blocks lie (DistAttention).
    Blocks are copied out and written in by the devices holding them (`PoolShards`)."""

    def __init__(self, model: LlamaForCausalLM, *, mesh, **kwargs):
        super().__init__(model, **kwargs)
        num_blocks, devices = self.pool_shape["num_blocks"], mesh.shape[KV_AXIS]
        if num_blocks % devices:
            raise ValueError(f"num_blocks ({num_blocks}) must split evenly over the "
                             f"{devices} devices of the KV mesh")
        self.mesh = mesh
        replicated = NamedSharding(mesh, PartitionSpec())
        self.load_sharding = self.logits_sharding = replicated
        # From host copies: a mesh over several processes takes only host values.
        self.params, self.layer_params = jax.device_put(
            jax.tree.map(np.asarray, (self.params, self.layer_params)), replicated)
        # Each device materialises only its own blocks.
        self.pool = KVPool.create(**self.pool_shape,
                                  sharding=NamedSharding(mesh, PartitionSpec(KV_AXIS)))
        self.pool_spec = shapes_of(self.pool)
        self.shards = PoolShards(mesh, num_blocks, KV_AXIS)

    def new_allocator(self) -> DistributedBlockAllocator:
        """An allocator over the mesh's devices, in mesh order."""
        return DistributedBlockAllocator(len(self.shards.devices), self.shards.blocks_per_device)

    def process_of(self, block: int) -> int:
        return self.shards.process_of(block)

    def devices_of_process(self, process: int) -> list[int]:
        return self.shards.positions_of(process)

    def run_segments(self, plan: StepPlan) -> tuple[jax.Array, None]:
        """Reads `fed` tokens to the host first (the decode and prefill steps take
        tokens from it), then runs the segments; the tokens of `plan.draws` are drawn
        from the logits after."""
        return self._run_segments(with_fed_tokens(plan).segments, plan.all_logits), None

    def _run_segments(self, segments: tuple[Segment, ...], all_logits: bool) -> jax.Array:
        if all_logits:
            return self._prefill(segments[0], all_logits=True)
        decodes = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
        height = self.limits.logit_rows(sum(len(s.tokens) for s in segments))
        if len(decodes) == len(segments):  # a decode batch alone: its rows as they are
            logits = self._decode(list(segments))
            return jnp.pad(logits, ((0, max(height - logits.shape[0], 0)), (0, 0)))[:height]
        rows: dict[int, jax.Array] = {}
        if decodes:
            logits = self._decode([segments[i] for i in decodes])
            rows.update((i, logits[n]) for n, i in enumerate(decodes))
        for i, segment in enumerate(segments):
            if i not in rows:
                rows[i] = self._prefill(segment, all_logits=False)
        padding = [jnp.zeros_like(rows[0])] * (height - len(segments))
        return jnp.stack([rows[i] for i in range(len(segments))] + padding)

    def _prefill(self, segment: Segment, *, all_logits: bool) -> jax.Array:
        """One prompt chunk alone: logits `[T, V]` of its tokens bucketed if
        `all_logits`, else `[V]` of its last."""
        count = len(segment.tokens)
        tokens = np.zeros(bucket(count), np.int32)
        tokens[:count] = segment.tokens
        logits, self.pool = mesh_prefill_step(
            self.model_def, self.params, self.pool, tokens, jnp.int32(segment.start),
            jnp.int32(count), self.limits.table(segment.blocks), backend=self.backend,
            all_logits=all_logits, mesh=self.mesh)
        return logits

    def _decode(self, segments: list[Segment]) -> jax.Array:
        """One-token segments as one decode batch (padded to a power of two): logits
        `[B, V]`, row i segment i's."""
        rows = bucket(len(segments), minimum=1)
        tables = np.stack([self.limits.table(s.blocks) for s in segments] +
                          [self.limits.table([])] * (rows - len(segments)))
        tokens = np.zeros(rows, np.int32)
        positions = np.full(rows, -1, np.int32)
        for i, segment in enumerate(segments):
            tokens[i], positions[i] = segment.tokens[0], segment.start
        logits, self.pool = mesh_decode_step(
            self.model_def, self.params, self.pool, tokens, positions, tables,
            backend=self.backend, mesh=self.mesh)
        return logits

    def copy_out(self, block_ids: list[int], memory_kind: str | None) -> SavedBlocks:
        """Each device copies out the blocks it holds (no collective); the blocks of a
        device are views of one layer-major array (see `PoolShards.read`)."""
        return self.shards.read(self.pool, block_ids, memory_kind)

    def write_blocks(self, block_ids: list[int], blocks: dict[int, BlockKV]) -> None:
        """Writes into pool blocks `block_ids` those on this process's devices,
        `blocks[id]`; every process of a group runs it with the same ids, each giving
        its own."""
        self.pool = self.shards.write(self.pool, block_ids, blocks)

    def compile_writes(self, max_blocks: int) -> int:
        """Compiles `write_blocks` for up to `max_blocks` ids at once, writing nothing.
        Returns the shapes compiled."""
        self.pool, shapes = self.shards.compile_writes(self.pool, max_blocks)
        return shapes

    def compiled_text(self, blocks_per_device: int) -> dict[str, str]:
        """The programs whose collectives could cross devices, compiled (nothing runs)
        and as HLO text, to read what they move: "decode", the decode step of one
        sequence (every layer); "read" and "write", the copies of `blocks_per_device`
        blocks per device out of and into the pool (`PoolShards.compiled_text`)."""
        decode = mesh_decode_step.lower(
            self.model_def, self.params, self.pool, np.zeros(1, np.int32),
            np.full(1, -1, np.int32), self.limits.table([])[None], backend=self.backend,
            mesh=self.mesh).compile().as_text()
        read, write = self.shards.compiled_text(self.pool, blocks_per_device)
        return {"decode": decode, "read": read, "write": write}

    def compile_steps(self) -> int:
        limits = self.limits
        shapes = [("prefill", t) for t in powers_of_two(16, bucket(limits.prefill_chunk))]
        shapes += [("decode", b) for b in powers_of_two(1, bucket(limits.max_seqs, 1))]
        table = limits.table([])
        for kind, size in tqdm(shapes, desc="compiling", unit="shape"):
            if kind == "prefill":
                _, self.pool = mesh_prefill_step(
                    self.model_def, self.params, self.pool, np.zeros(size, np.int32),
                    jnp.int32(0), jnp.int32(0), table, backend=self.backend,
                    all_logits=False, mesh=self.mesh)
            else:
                _, self.pool = mesh_decode_step(
                    self.model_def, self.params, self.pool, np.zeros(size, np.int32),
                    np.full(size, -1, np.int32), np.stack([table] * size),
                    backend=self.backend, mesh=self.mesh)
        self.compile_draws(self.logits_sharding)
        jax.block_until_ready(self.pool)
        return len(shapes)

    def compile_draws(self, sharding) -> None:
        """Compiles `draw` from the logits of every packed step, lying on `sharding`."""
        for rows in sorted({self.limits.logit_rows(t) for t in self.limits.step_buckets()}):
            self.draw(jax.device_put(jnp.zeros((rows, self.vocab_size), jnp.float32),
                                     sharding), ())

    def compile_copies(self, max_blocks: int, memory_kind: str | None) -> int:
        return self.shards.compile_reads(self.pool, max_blocks, memory_kind)
