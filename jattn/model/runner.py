"""`ModelRunner`: a model, its KV pool, and the execution of step plans over them.

The main step is ragged: one `StepPlan` runs the query tokens of many sequences packed
together — a decode's one token, a chunk of a prompt — so one step prefills several
turns and decodes the batch. The packed token count is bucketed to powers of two; block
tables have one width (the longest context) and one height (`max_seqs`), so a handful of
compilations serve every request. The pool is donated to each step and updated in place.

Where the pool lies decides how a step runs (`jattn.model.pool_steps`): on one device
(`SingleDeviceSteps`) or sharded over a device mesh (`MeshSteps`, DistAttention). When
the mesh spans several processes, the leader's runner is given the group: its steps are
announced to the followers first (`jattn.model.leader_steps.LeaderSteps`), whose runners
execute the same plans.

A warm-up (`warm_up`) on one device compiles before it returns only the packed step
that the first requests need, and the rest in the background (`CompileQueue`): each
step runs on the smallest packed step compiled that holds it, and a step packs at most
`step_tokens` (the largest compiled so far), so a long prompt is cut into smaller chunks
until the larger steps are ready; a store's layer-wise loads are not taken until their
steps are compiled (`arrivals_ready`: the turn recomputes that KV instead). Over a mesh
and in a process group the warm-up compiles everything before it returns.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jattn.defaults import BLOCK_SIZE, MAX_RUNNING, PREFILL_CHUNK
from jattn.model.compile_queue import CompileQueue
from jattn.model.kv_cache import blocks_for, bucket
from jattn.model.leader_steps import LeaderSteps
from jattn.model.llama import LlamaForCausalLM
from jattn.model.pool_steps import MeshSteps, SingleDeviceSteps, StepLimits
from jattn.model.step_plan import (
    LOADING_CHUNK,
    Segment,
    StepOutput,
    StepPlan,
)
from jattn.store.tier import BlockKV


class ModelRunner:
    """A model, its KV pool of `num_blocks` blocks of `block_size` tokens, and its steps.

    Steps run at most `max_seqs` sequences and contexts of at most `max_context` tokens
    (the block tables' height and width); `prefill_chunk` tokens is the most a step
    packs (the largest bucket compiled). With a `mesh` (a "kv" axis) the pool is sharded
    over it; with a `group` (the `GroupLeader` of a process group whose devices the mesh
    spans) each step is announced to the followers first. Blocks a plan saves are copied
    to host memory of `save_memory_kind` (e.g. "pinned_host"; None: a plain host copy).
    """

    def __init__(self, model: LlamaForCausalLM, *, num_blocks: int, max_context: int,
                 block_size: int = BLOCK_SIZE, prefill_chunk: int = PREFILL_CHUNK,
                 max_seqs: int = MAX_RUNNING, backend: str = "auto", mesh=None, group=None,
                 save_memory_kind: str | None = None):
        for name, value in (("prefill_chunk", prefill_chunk), ("max_seqs", max_seqs),
                            ("max_context", max_context)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.config = model.config
        self.block_size = block_size
        self.limits = StepLimits(prefill_chunk, max_seqs,
                                 bucket(blocks_for(max_context, block_size), minimum=4))
        placement = dict(num_blocks=num_blocks, block_size=block_size, limits=self.limits,
                         backend=backend, save_memory_kind=save_memory_kind)
        self._steps = (SingleDeviceSteps(model, **placement) if mesh is None
                       else MeshSteps(model, mesh=mesh, **placement))
        self._executor = self._steps if group is None else LeaderSteps(self._steps, group)
        self._background: CompileQueue | None = None  # on one device, after `warm_up`
        self._arrivals = None  # the background compilation of the arrivals, if queued

    # ----- what the runner holds --------------------------------------------------------

    @property
    def pool(self):
        """The `KVPool`: per layer, keys and values `[num_blocks, block_size, Hkv, D]`."""
        return self._steps.pool

    @pool.setter
    def pool(self, pool) -> None:
        self._steps.pool = pool

    @property
    def params(self) -> tuple:
        """The model's parameters, as the steps take them: a flat tuple of arrays."""
        return self._steps.params

    @property
    def dtype(self):
        """The parameters' and the KV pool's dtype."""
        return self._steps.dtype

    @property
    def backend(self) -> str:
        """The attention backend of the steps (see `pallas_kernels.backend`); set, it
        takes effect at the next step (each backend compiles steps of its own)."""
        return self._steps.backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self._steps.backend = backend

    @property
    def prefill_chunk(self) -> int:
        return self.limits.prefill_chunk

    @property
    def max_seqs(self) -> int:
        return self.limits.max_seqs

    @property
    def table_width(self) -> int:
        return self.limits.table_width

    @property
    def step_tokens(self) -> int:
        """The most tokens a step packs without compiling: while a warm-up compiles
        packed steps in the background, the largest compiled so far; else (and once
        they all are) `prefill_chunk`."""
        return self._steps.step_tokens

    @property
    def arrivals_ready(self) -> bool:
        """False while the steps that take KV arriving layer by layer wait for their
        background compilation (or if it failed): a store's loads must not be taken
        then."""
        arrivals = self._arrivals
        return arrivals is None or (arrivals.done() and not arrivals.cancelled()
                                    and arrivals.exception() is None)

    def step_buckets(self) -> list[int]:
        """The packed token counts a step is compiled for."""
        return self.limits.step_buckets()

    def logit_rows(self, tokens: int) -> int:
        """Rows of logits a step of `tokens` packed tokens returns."""
        return self.limits.logit_rows(tokens)

    @property
    def save_memory_kind(self) -> str | None:
        """The host memory kind a plan's saves are copied to (None: a plain host copy)."""
        return self._steps.save_memory_kind

    @property
    def load_sharding(self):
        """Where KV arriving layer by layer (`Arrival.source`) is expected."""
        return self._steps.load_sharding

    @property
    def logits_sharding(self):
        """Where the steps' logits are returned, and sampled."""
        return self._executor.logits_sharding

    def new_allocator(self):
        """An allocator of this pool's block ids: a `BlockAllocator` on one device, a
        `DistributedBlockAllocator` over the mesh's devices."""
        return self._steps.new_allocator()

    def process_of(self, block: int) -> int:
        """The process whose device holds pool block `block` (0 without a group)."""
        return self._steps.process_of(block)

    def devices_of_process(self, process: int) -> list[int]:
        """The allocator's device numbers (mesh positions) of process `process`'s
        devices."""
        return self._steps.devices_of_process(process)

    # ----- steps ------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        """Runs `plan` (see `StepPlan`): its saves' copies start, then its segments run
        as one packed step, or its one segment layer by layer while `plan.arrival`'s KV
        arrives, and the tokens of its draws are drawn. Nothing waits for the device: a
        plan may read the tokens of the step before (`StepPlan.fed_tokens`) before they
        are computed. Returns the `StepOutput`. A plan the runner cannot run (a segment whose
        blocks do not cover it, more segments or tokens than a step takes, ...) raises
        ValueError and runs nothing."""
        self._check(plan)
        return self._executor.execute(plan)

    def _check(self, plan: StepPlan) -> None:
        segments = plan.segments
        total = sum(len(s.tokens) for s in segments)
        if len(segments) > self.max_seqs or total > bucket(self.prefill_chunk, 8):
            raise ValueError(f"a step takes at most {self.max_seqs} segments of at most "
                             f"{self.prefill_chunk} tokens in all, got {len(segments)} of "
                             f"{total}")
        for name, entries in (("sampled", plan.sampled), ("draws", plan.draws)):
            if entries and len(entries) != len(segments):
                raise ValueError(f"{name} has {len(entries)} entries for {len(segments)} "
                                 "segments")
        for segment in segments:
            if segment.fed is not None and not (
                    plan.fed_tokens is not None and len(segment.tokens) == 1
                    and 0 <= segment.fed < self.max_seqs and plan.arrival is None):
                raise ValueError(f"a fed segment is one token read from row {segment.fed} "
                                 f"of the fed tokens (0 to {self.max_seqs - 1}) of a step "
                                 "without an arrival")
            end = segment.start + len(segment.tokens)
            if not segment.tokens or segment.start < 0:
                raise ValueError(f"a segment needs tokens at a position >= 0, got "
                                 f"{len(segment.tokens)} at {segment.start}")
            if len(segment.blocks) * self.block_size < end or \
                    len(segment.blocks) > self.table_width:
                raise ValueError(f"a segment's {len(segment.blocks)} blocks must cover its "
                                 f"positions up to {end} within the block table's "
                                 f"{self.table_width}")
        if (plan.arrival is not None or plan.all_logits) and len(segments) != 1:
            raise ValueError("a step with an arrival or all logits holds one segment, got "
                             f"{len(segments)}")
        if plan.arrival is not None and (plan.all_logits or total > LOADING_CHUNK):
            raise ValueError(f"a step with an arrival runs 1 to {LOADING_CHUNK} tokens and "
                             f"returns the last one's logits, got {total} tokens")

    def prefill(self, tokens, start: int, blocks: list[int], *, all_logits: bool = False):
        """Writes the KV of `tokens` (at positions `start, start+1, ...`) into `blocks`,
        which must cover every position up to `start + len(tokens)`, in steps of
        `step_tokens` tokens.

        Returns the last token's logits `[V]` float32, or with `all_logits` every token's
        `[len(tokens), V]`.
        """
        tokens = [int(token) for token in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        blocks = tuple(int(block) for block in blocks)
        outputs = []
        chunk = self.step_tokens
        for offset in range(0, len(tokens), chunk):
            piece = tuple(tokens[offset:offset + chunk])
            last = offset + len(piece) == len(tokens)
            logits = self.execute(StepPlan(segments=(Segment(piece, start + offset, blocks),),
                                           sampled=(last,), all_logits=all_logits)).logits
            outputs.append(logits[:len(piece)] if all_logits else logits[0])
        return jnp.concatenate(outputs) if all_logits else outputs[-1]

    def decode(self, tokens, positions, block_lists: list[list[int]]):
        """One step for a batch: token i at `positions[i]` of the sequence whose blocks are
        `block_lists[i]`. Returns logits `[R, V]` float32: row i is sequence i's, rows from
        B on are padding (returned as they are, so that reading a row never compiles a
        slice for a new batch size)."""
        segments = tuple(Segment((int(token),), int(position), tuple(int(b) for b in blocks))
                         for token, position, blocks in zip(tokens, positions, block_lists))
        return self.execute(StepPlan(segments=segments,
                                     sampled=(True,) * len(segments))).logits

    def write_blocks(self, block_ids: list[int], blocks: dict[int, BlockKV]) -> None:
        """Over a mesh: writes into pool blocks `block_ids` those on this process's
        devices, `blocks[id]` (a `BlockKV`); every process of a group runs it with the
        same ids, each giving its own (a step of the group's store)."""
        self._steps.write_blocks(block_ids, blocks)

    # ----- warm-up ----------------------------------------------------------------------

    def warm_up(self) -> int:
        """Makes every packed step ready so that no request pays for a compilation.
        Over a mesh (and in a group) compiles them all now. On one device compiles now
        only the first bucket — the smallest that holds a full batch of decodes
        (`max_seqs` one-token segments) — and then, in the background: the larger
        buckets, ascending (each lets longer prompt chunks through), then the smaller
        (cheaper small steps); `compile_arrivals` queues behind them (`wait_compiled`).
        Writes nothing. Returns the shapes compiled now."""
        if not isinstance(self._steps, SingleDeviceSteps):
            return self.compile_steps()
        buckets = self.limits.step_buckets()
        first = next((size for size in buckets if size >= self.max_seqs), buckets[-1])
        self._steps.compile_bucket(first)
        self._background = CompileQueue()
        for size in [b for b in buckets if b > first] + [b for b in buckets if b < first]:
            self._background.submit(functools.partial(self._steps.compile_bucket, size),
                                    f"the packed step of {size} tokens")
        return 1

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds (None: as long as it takes) for the background
        compilation a warm-up started; True once it is done (or if there is none).
        Raises the error of a compilation that failed."""
        return self._background is None or self._background.wait(timeout)

    def stop_compiling(self) -> None:
        """Cancels what the background compilation has not started, and waits for what
        it is compiling now."""
        if self._background is not None:
            self._background.close()

    def compile_steps(self) -> int:
        """Compiles every packed step. Returns the shapes compiled."""
        return self._executor.compile_steps()

    def compile_arrivals(self) -> int:
        """Compiles each step with KV arriving layer by layer: each token count with
        each count of rows arriving (none in a group). After a warm-up on one device
        they are queued to its background compilation instead (`arrivals_ready` says
        when they are compiled). Returns the shapes compiled now."""
        if self._background is None:
            return self._executor.compile_arrivals()
        self._arrivals = self._background.submit(self._steps.compile_arrivals,
                                                 "the steps with KV arriving")
        return 0

    def compile_saves(self, max_blocks: int) -> int:
        """Compiles the copies out of the pool of every count of blocks up to
        `max_blocks` (powers of two) that a plan's saves make. Returns the shapes
        compiled."""
        return self._executor.compile_saves(max_blocks)

    def compile_writes(self, max_blocks: int) -> int:
        """Compiles `write_blocks` for up to `max_blocks` ids at once, writing nothing.
        Returns the shapes compiled."""
        return self._steps.compile_writes(max_blocks)

    # ----- inspection -------------------------------------------------------------------

    def compiled_text(self, blocks_per_device: int) -> dict[str, str]:
        """Over a mesh: the HLO text of the compiled decode step of one sequence
        ("decode") and of the copies of `blocks_per_device` blocks per device out of and
        into the pool ("read", "write"), to read what their collectives move. Compiles
        on this process alone and runs nothing (in a group, nothing is announced)."""
        return self._steps.compiled_text(blocks_per_device)
