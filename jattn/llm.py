"""`LLM`: load a model (the embedded one by default) and generate from it.

A thin synchronous facade over the serving engine: `generate`, `stream` and `chat` submit
turns to the same `Engine` (continuous batching, reuse by content) that `jattn-serve`
runs, so the library and the server take one code path."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jattn.defaults import (
    BLOCK_SIZE,
    KV_MEMORY_SHARE,
    MAX_RUNNING,
    PREFILL_CHUNK,
    SINK_TOKENS,
    STEP_TIMEOUT_S,
)
from jattn.distributed.group import GroupLeader, StepChannel, is_leader
from jattn.distributed.group import follow as follow_leader
from jattn.distributed.group_store import (
    Flush,
    GroupStore,
    Hint,
    Place,
    Probe,
    ProcessShard,
    Stage,
    StoreWarmUp,
)
from jattn.engine.encoding import InputEncoder
from jattn.engine.errors import InvalidRequest, PromptTooLong
from jattn.engine.requests import TurnRequest, TurnStream, check_session_id
from jattn.engine.scheduler import Engine, EngineLimits
from jattn.engine.turns import ChatEngine, ChatTurn
from jattn.generation import StreamedToken
from jattn.model.config import ModelConfig
from jattn.model.kv_cache import default_num_blocks
from jattn.model.hub import model_directory
from jattn.model.leader_steps import CompileSaves, CompileSteps
from jattn.model.runner import ModelRunner
from jattn.model.step_plan import StepPlan
from jattn.model.weights import (
    has_safetensors,
    load_safetensors,
    random_model,
    restore_params,
    save_params,
)
from jattn.sampling import SamplingParams
from jattn.store import AttentionStore, BlockSpec, StoreConfig
from jattn.store.config import machine_memory_bytes
from jattn.store.fingerprint import model_fingerprint
from jattn.tokenizer import Tokenizer

EMBEDDED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models",
                              "stories260K")
"""stories260K (MIT, karpathy/tinyllamas), shipped inside the package."""


def _default_dtype():
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def kv_mesh(devices: int):
    """A one-axis ("kv") mesh over the first `devices` devices, or None for one."""
    available = len(jax.devices())
    if isinstance(devices, bool) or not isinstance(devices, int) or \
            not 1 <= devices <= available:
        raise ValueError(f"kv_parallel must be an integer in [1, {available}] (the devices "
                         f"present), got {devices!r}")
    if devices == 1:
        return None
    return jax.make_mesh((devices,), ("kv",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])


def kv_budget_bytes(device, weight_bytes: int) -> int:
    """The most bytes the KV pool takes on `device` by default: `KV_MEMORY_SHARE` of its
    memory left by `weight_bytes` of weights, or an eighth of the machine's memory where
    the platform reports none (CPU). From the device's limit, not its use at the time,
    so that every process of a group, and every LLM of one process, sizes the same."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(KV_MEMORY_SHARE * max(stats["bytes_limit"] - weight_bytes, 0))
    return machine_memory_bytes() // 8


def weight_bytes(model) -> int:
    """Bytes of a model's parameters."""
    return sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model)))


def _check_group(kv_parallel: int) -> None:
    """In a group of processes the mesh must span every device of the group."""
    if kv_parallel != jax.device_count():
        raise ValueError(f"in a group of {jax.process_count()} processes kv_parallel must "
                         f"span all {jax.device_count()} devices, got {kv_parallel}")


def _process_share(store: StoreConfig) -> StoreConfig:
    """This process's own store in a group: the budgets of `store`, its disk files in a
    directory of its own."""
    if store.remote_url:
        raise ValueError("the remote tier does not run in a group of processes (each keeps "
                         "its own devices' blocks in its own host memory and disk): leave "
                         "remote_url unset")
    if not store.disk_path:
        return store
    return dataclasses.replace(store, disk_path=os.path.join(
        store.disk_path, f"process-{jax.process_index()}"))


class LLM:
    """A Llama-family model ready to generate.

    Args:
      model: None for the embedded stories260K, a Hugging Face checkpoint directory
        (`config.json`, `*.safetensors`, optionally `tokenizer.json`), or a Hub id
        (`org/name`) read from, or first downloaded into, the Hugging Face cache
        (`jattn.model.hub`).
      revision: the branch, tag or commit of a Hub id (None: its default branch).
      dtype: parameter and KV dtype; default float32 on CPU, bfloat16 on accelerators.
      random_weights: build the config's shape with random weights (a directory with
        only `config.json` loads only this way).
      seed: seed of the random weights.
      block_size: tokens per KV block.
      max_context: longest sequence (prompt + new tokens); default the model's window.
      num_blocks: KV pool size in blocks; default room for `max_running` sequences of
        `max_context` tokens, within `KV_MEMORY_SHARE` of the device's memory left by the
        weights (an eighth of the machine's on CPU) and at least one such sequence.
      prefill_chunk: the most tokens one model step packs: prompt chunks of several
        turns and the decode batch's tokens together.
      max_running: the most turns one model step runs (and the engine's batch).
      backend: attention backend (see `pallas_kernels.backend`).
      params_cache: a directory for the converted parameters (orbax): restored from if
        present, written after loading safetensors otherwise.
      store: a `StoreConfig` to keep each chat session's KV across turns (the default
        sizes one from the machine), or None to recompute the history every turn. Its
        `hbm_bytes` None gives the device tier a share of the pool (`device_budget`).
      kv_parallel: spread the KV pool over this many devices (DistAttention): each
        holds `num_blocks / kv_parallel` blocks, a sequence's blocks may lie on any of
        them, and attention merges the devices' partials exactly. 1: one device. In a
        group of processes (`jattn.distributed.group.initialize`), every device of the group:
        each process builds the LLM with the same arguments; process 0 then generates
        while the others `follow`. Each process keeps the blocks of its own devices in
        its own host memory and disk, under the store's budgets (on disk under
        `<disk_path>/process-<i>`), as process 0 decides (`jattn.distributed.group_store`);
        process 0 keeps the sessions' records. The remote tier does not run in a group.
      step_timeout_s: in a group, the longest a step may take before the leader
        gives the group up: `on_group_failure(message)` (by default: log and exit),
        called too when a step fails (a process of the group died).
    """

    def __init__(self, model: str | None = None, *, revision: str | None = None, dtype=None,
                 random_weights: bool = False,
                 seed: int = 0, block_size: int = BLOCK_SIZE, max_context: int | None = None,
                 num_blocks: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 max_running: int = MAX_RUNNING,
                 backend: str = "auto", params_cache: str | None = None,
                 store: StoreConfig | None | str = "auto", kv_parallel: int = 1,
                 step_timeout_s: float = STEP_TIMEOUT_S, on_group_failure=None):
        path = EMBEDDED_MODEL if model is None else model_directory(os.fspath(model), revision)
        self.model_path = path
        self.config = ModelConfig.from_dir(path)
        self.dtype = jnp.dtype(dtype or _default_dtype())
        self.tokenizer = Tokenizer.from_dir(path)
        self.input_encoder = InputEncoder(self.tokenizer, self.config.vocab_size)
        self.max_context = max_context or self.config.max_position_embeddings
        if not 1 <= self.max_context <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_context must be in [1, {self.config.max_position_embeddings}] for this "
                f"model, got {self.max_context}")
        self.in_group = jax.process_count() > 1
        group = None
        if self.in_group:
            _check_group(kv_parallel)
            if is_leader():
                group = GroupLeader(StepChannel(), step_timeout_s, on_group_failure)
        if store == "auto":
            store = StoreConfig.sized_for_machine(block_size=block_size)
        if store is not None and store.block_size != block_size:
            raise ValueError(f"store.block_size ({store.block_size}) must equal block_size "
                             f"({block_size})")
        model = self._build(path, random_weights, seed, params_cache)
        num_blocks = num_blocks or default_num_blocks(
            sequences=max_running, max_context=self.max_context, block_size=block_size,
            block_bytes=self._block_bytes(block_size),
            budget_bytes=kv_budget_bytes(jax.local_devices()[0], weight_bytes(model))
            * kv_parallel)
        self.runner = ModelRunner(
            model, num_blocks=-(-num_blocks // kv_parallel) * kv_parallel, block_size=block_size,
            max_context=self.max_context, prefill_chunk=prefill_chunk, max_seqs=max_running,
            backend=backend, mesh=kv_mesh(kv_parallel), group=group,
            save_memory_kind=store.memory_kind_for(jax.local_devices()[0]) if store else None)
        self._group = group
        fingerprint = model_fingerprint(self.config, self.runner.params, self.dtype)
        spec = BlockSpec(self.config.num_layers,
                         (block_size, self.config.num_kv_heads, self.config.head_dim),
                         self.dtype.name)
        self.store = self._shard = None
        if store is not None and self.in_group:
            self._shard = ProcessShard(self.runner, AttentionStore(
                _process_share(store), fingerprint=fingerprint, spec=spec))
            self.store = GroupStore(self._shard, group) if is_leader() else self._shard.store
        elif store is not None:
            self.store = AttentionStore(store, fingerprint=fingerprint, spec=spec)
        self._engine: Engine | None = None
        if store is None:
            sink_tokens, hbm_bytes = SINK_TOKENS, 0
        else:
            sink_tokens, hbm_bytes = (store.sink_tokens,
                                      store.device_budget(self.runner.pool.nbytes()))
        self.chats = ChatEngine(
            self.runner, self.tokenizer, max_context=self.max_context,
            eos_ids=self.config.eos_token_ids, store=self.store, sink_tokens=sink_tokens,
            hbm_bytes=hbm_bytes, fingerprint=fingerprint)

    def _block_bytes(self, block_size: int) -> int:
        """Bytes of one KV block (keys and values of every layer)."""
        config = self.config
        return (2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim
                * self.dtype.itemsize)

    def _build(self, path, random_weights, seed, params_cache):
        if random_weights:
            return random_model(self.config, dtype=self.dtype, seed=seed)
        if params_cache and os.path.isdir(params_cache):
            return restore_params(params_cache, self.config, dtype=self.dtype)
        if not has_safetensors(path):
            raise FileNotFoundError(
                f"no weights in {path!r} (model.safetensors or model.safetensors.index.json); "
                "pass random_weights=True to run this shape with random weights")
        model = load_safetensors(path, self.config, dtype=self.dtype)
        if params_cache:
            save_params(model, params_cache)
        return model

    def encode_prompt(self, prompt) -> list[int]:
        """Token ids of a prompt: a string (needs a tokenizer) or a list of token ids;
        InvalidRequest (PromptTooLong) naming what is wrong."""
        ids = self.input_encoder.encode(prompt, "text" if isinstance(prompt, str) else "tokens",
                                        first_turn=True)
        if not ids:
            raise InvalidRequest("prompt is empty: give at least one token")
        if len(ids) >= self.max_context:
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens; the context holds {self.max_context}, "
                "leaving no room for a new token")
        return ids

    def start_engine(self, limits: EngineLimits | None = None, *, warm_up: bool = False,
                     on_failure=None) -> Engine:
        """Starts the engine that runs this model's turns, with continuous batching, and
        returns it (the server uses it directly). Only once: `generate`, `chat` and
        `stream` start one with the model's limits if none runs yet."""
        if self._engine is not None:
            raise RuntimeError("this LLM's engine is already running")
        if self.in_group and not is_leader():
            raise RuntimeError(f"process {jax.process_index()} of the group follows process "
                               "0's steps: call follow() here, generate on process 0")
        self._engine = Engine(self.chats, limits or EngineLimits(
            max_running=self.chats.max_turns_per_step, max_prompt_tokens=self.max_context,
            max_tokens=self.max_context),
            warm_up=warm_up, on_failure=on_failure)
        return self._engine

    @property
    def engine(self) -> Engine:
        """The engine running this model's turns (started on first use)."""
        return self._engine or self.start_engine()

    def chat(self, session_id: str, message, *, max_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop=None, ignore_eos: bool = False,
             logprobs: int | None = None) -> ChatTurn:
        """Appends `message` (text through the chat template, or token ids) to session
        `session_id`, generates the answer, and appends it.

        The session's earlier KV is reused from the store where it is held and
        recomputed where it is not; either way the tokens are the same. The result has
        `.cached_tokens`, `.recomputed_tokens`, `.tiers` and `.ttft_s`, and with
        `logprobs` k, `.logprobs`: each token's log-probability and its k most likely
        alternatives (`TokenLogprob`).
        """
        check_session_id(session_id)
        if isinstance(message, str):
            kind, value = "message", message
        else:
            kind, value = "tokens", tuple(message)
        return self._finish(self._submit(session_id, kind, value, max_tokens, temperature,
                                         top_p, top_k, seed, stop, ignore_eos, logprobs))

    def hint(self, upcoming_session_ids) -> None:
        """A scheduler's queue, next first: those sessions' context blocks are kept
        longest in every tier and prefetched from disk into host memory."""
        self.engine.hint(upcoming_session_ids)

    def end_session(self, session_id: str) -> None:
        """Forgets a chat session in every tier; SessionNotFound if it is unknown."""
        self.engine.end_session(session_id)

    def close(self, *, grace: float | None = None) -> None:
        """Lets the turns in flight finish (for `grace` seconds, None: as long as they
        need), stops the engine's thread, flushes the store's saves; in a group, then
        ends the followers' `follow`."""
        if self._engine is not None:
            self._engine.shutdown(grace=grace)
        else:
            self.chats.close()
        if self._group is not None:
            self._group.stop()
            self._group = None

    def follow(self) -> None:
        """On a process other than 0 of a group: runs the leader's steps on this
        process's share of the pool and of the store until the leader's LLM closes."""
        if not self.in_group or is_leader():
            raise RuntimeError("follow() runs on processes 1.. of a group; process 0 "
                               "generates")
        runner, shard = self.runner, self._shard

        def execute(plan: StepPlan) -> None:
            output = runner.execute(plan)
            if plan.saves:  # the blocks of this process's devices, into its own store
                shard.file(plan.saves, output.saved)

        steps = {StepPlan: execute,
                 CompileSteps: lambda _: runner.compile_steps(),
                 CompileSaves: lambda step: runner.compile_saves(step.max_blocks)}
        if shard is not None:
            steps |= {Probe: lambda step: shard.probe(list(step.keys)),
                      Stage: lambda step: shard.stage(list(step.keys)),
                      Place: lambda step: shard.place(list(step.block_ids)),
                      Hint: lambda step: shard.hint(list(step.keys)),
                      Flush: lambda _: shard.flush(),
                      StoreWarmUp: lambda step: shard.warm_up(step.max_blocks)}
        try:
            follow_leader(steps, StepChannel())
        finally:
            if self.store is not None:
                self.store.close()  # this process's own saves reach its disk

    def stream(self, prompt, *, max_tokens: int = 64, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None,
               ignore_eos: bool = False) -> Iterator[StreamedToken]:
        """Yields each new token as it is produced (arguments as `generate`); returns
        the `ChatTurn`. Closing the iterator early cancels the generation."""
        stream = self._submit(None, "tokens", tuple(self.encode_prompt(prompt)), max_tokens,
                              temperature, top_p, top_k, seed, stop, ignore_eos)
        finished = False
        try:
            yield from stream
            finished = True
        finally:
            if not finished:
                stream.cancel()
        return stream.result

    def generate(self, prompt, *, max_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop=None,
                 ignore_eos: bool = False, logprobs: int | None = None) -> ChatTurn:
        """Generates up to `max_tokens` new tokens after `prompt` (a string or token ids).

        `temperature=0` is greedy. Generation stops at an end-of-sequence token (unless
        `ignore_eos`), at a stop string (cut from the text), or at `max_tokens`. The
        prompt's leading blocks are reused from any tier that holds them (whoever
        computed them: `.cached_tokens` says how many tokens), and its blocks and the
        answer's are published for later requests. With `logprobs` k, `.logprobs` holds
        each new token's log-probability under the model's own distribution (before
        temperature, top-k and top-p) and its k most likely alternatives.
        """
        return self._finish(self._submit(None, "tokens", tuple(self.encode_prompt(prompt)),
                                         max_tokens, temperature, top_p, top_k, seed, stop,
                                         ignore_eos, logprobs))

    def _submit(self, session_id, kind, value, max_tokens, temperature, top_p, top_k, seed,
                stop, ignore_eos, logprobs=None) -> TurnStream:
        params = SamplingParams(max_tokens, temperature, top_p, top_k, seed, tuple(stop or ()),
                                logprobs)
        return self.engine.submit(TurnRequest(session_id, kind, value, params,
                                              ignore_eos=ignore_eos))

    @staticmethod
    def _finish(stream: TurnStream) -> ChatTurn:
        """Waits for a submitted turn to end; its `ChatTurn`, or its error raised."""
        for _ in stream:
            pass
        return stream.result
