"""Multi-turn chat over a `ModelRunner`, reusing each session's KV across turns.

Between turns a session's full blocks stay in the device pool (the HBM tier) and are
saved in the background to the `AttentionStore` (host, disk). At the next turn each
context block comes from the first tier that has it; if any is missing, the context is
recomputed by replaying the turn log (see `jattn.conversation`), which gives the very
same KV. With no store, every turn replays the log: the same tokens, at full cost.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jattn.conversation import Conversation, Turn, apply_turn, plan_truncation, turn_entry
from jattn.decoding import Continuation, decode_loop
from jattn.generation import Generation
from jattn.model.kv_cache import KVPool, PoolExhausted, blocks_for, bucket, powers_of_two
from jattn.model.runner import ModelRunner
from jattn.sampling import SamplingParams
from jattn.store import AttentionStore, BlockKV


@jax.jit
def _read_blocks(pool: KVPool, ids):
    """Copies pool blocks `ids [n]` out: `k, v [L, n, bs, Hkv, D]`."""
    return jnp.stack([p[ids] for p in pool.k]), jnp.stack([p[ids] for p in pool.v])


@dataclass(frozen=True)
class OneOff:
    """The name of a one-off turn's transient session. Not a string, so no session id
    a client chooses can ever equal it (or reach its KV)."""

    number: int


@dataclass(frozen=True)
class BlockCensus:
    """Where the blocks of the device pool are: `free`, `resident` (a session's context
    kept between turns), `in_flight` (held by a running turn and no session), of
    `total`; `double_counted` blocks are in two of these places at once. Every block
    is in exactly one place when `balanced`."""

    total: int
    free: int
    resident: int
    in_flight: int
    double_counted: int

    @property
    def balanced(self) -> bool:
        return (self.double_counted == 0
                and self.free + self.resident + self.in_flight == self.total)


def _done(value=True) -> concurrent.futures.Future:
    future = concurrent.futures.Future()
    future.set_result(value)
    return future


@dataclass
class ChatTurn(Generation):
    """A `Generation` plus what the turn reused: `cached_tokens` (context tokens whose KV
    was not recomputed), `tiers` (blocks reused per tier), `recomputed_tokens`
    (prefilled: the new tokens plus any history that had to be recomputed), and
    `dropped_tokens` (history truncated out of the window before this turn)."""

    cached_tokens: int = 0
    recomputed_tokens: int = 0
    dropped_tokens: int = 0
    tiers: dict | None = None


@dataclass
class ActiveTurn:
    """A turn between `ChatEngine.begin` and `complete`/`abort`: its session, the new
    message ids, the pool `table` (context blocks, then the turn's), `prefix` tokens of
    reused context, `turn_tokens` to prefill (the history's tail plus the message), of
    which `prefilled` are done, blocks still `arriving` from the store, and the decode
    state."""

    session_id: str
    conversation: Conversation
    new_ids: list[int]
    dropped: list[int]
    kept_count: int
    table: list[int]
    prefix: int
    turn_tokens: list[int]
    arriving: tuple | None
    result: ChatTurn
    continuation: Continuation
    ephemeral: bool = False
    prefilled: int = 0

    @property
    def decode_start(self) -> int:
        """Position of the first sampled token."""
        return self.prefix + len(self.turn_tokens)

    @property
    def next_position(self) -> int:
        """Position at which the last sampled token is fed back."""
        return self.decode_start + self.continuation.steps - 1


class ChatEngine:
    """Sessions, their device-resident blocks, and the turn procedure."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_context: int, eos_ids,
                 store: AttentionStore | None, sink_tokens: int, hbm_bytes: int):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.store = store
        self.sink_blocks = math.ceil(sink_tokens / runner.block_size)
        self.hbm_bytes = hbm_bytes
        self.sessions: dict[str, Conversation] = {}
        self.resident: dict[str, dict[int, int]] = {}  # session -> serial -> pool block
        self.busy: dict[str, ActiveTurn] = {}  # turns between begin and complete/abort
        block_tokens = runner.block_size
        self.block_bytes = runner.config.kv_bytes_per_token(runner.dtype.itemsize) * block_tokens
        device = runner.pool.k[0].devices().pop()
        kind = store.config.memory_kind_for(device) if store else None
        self.host_sharding = (jax.sharding.SingleDeviceSharding(device, memory_kind=kind)
                              if kind else None)

    # ----- sessions --------------------------------------------------------------------

    def conversation(self, session_id: str) -> Conversation:
        if session_id not in self.sessions:
            entries = (self.store.get_record(session_id)
                       if self.store and isinstance(session_id, str) else None)
            self.sessions[session_id] = (
                Conversation.from_entries(entries, self.runner.block_size) if entries
                else Conversation())
        return self.sessions[session_id]

    def block_census(self) -> BlockCensus:
        """Counts where every pool block is; `balanced` unless a block leaked or is
        claimed twice."""
        free = self.runner.allocator.free_ids()
        resident = [b for blocks in self.resident.values() for b in blocks.values()]
        resident_set = set(resident)
        in_flight = {b for turn in self.busy.values() for b in turn.table} - resident_set
        double = (len(resident) - len(resident_set) + len(free & resident_set)
                  + len(free & in_flight))
        return BlockCensus(total=self.runner.allocator.num_blocks, free=len(free),
                           resident=len(resident_set), in_flight=len(in_flight),
                           double_counted=double)

    def end(self, session_id: str) -> None:
        """Forgets a session everywhere."""
        self._release(session_id)
        self.sessions.pop(session_id, None)
        if self.store:
            self.store.drop(session_id)

    def _release(self, session_id: str) -> None:
        blocks = self.resident.pop(session_id, {})
        self.runner.allocator.free(blocks.values())

    def _resident_bytes(self) -> int:
        return sum(len(b) for b in self.resident.values()) * self.block_bytes

    def _allocate(self, count: int, keep: str) -> list[int]:
        """Pool blocks, evicting other sessions' resident blocks when the pool is short."""
        while True:
            try:
                return self.runner.allocator.allocate(count)
            except PoolExhausted:
                victims = [s for s in self.resident
                           if s != keep and s not in self.busy and self.resident[s]]
                if not victims:
                    raise
                order = (self.store.device_eviction_order(victims) if self.store
                         else victims)
                self._release(order[0])

    def _enforce_hbm_budget(self, keep: str) -> None:
        while self._resident_bytes() > self.hbm_bytes:
            victims = [s for s in self.resident if self.resident[s] and s not in self.busy]
            if not victims:
                return  # every resident block belongs to a turn in flight
            order = self.store.device_eviction_order(victims) if self.store else victims
            others = [s for s in order if s != keep]
            self._release((others or order)[0])

    # ----- turns -----------------------------------------------------------------------

    def encode_message(self, conversation: Conversation, message) -> list[int]:
        if not isinstance(message, str):
            return list(message)
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass the message as token ids")
        first = not conversation.tokens
        if first:
            return self.tokenizer.encode_chat([{"role": "user", "content": message}])
        if self.tokenizer.chat_template:
            ids = self.tokenizer.encode_chat([{"role": "user", "content": message}])
            bos = self.tokenizer.token_id(self.tokenizer.bos_token)
            return ids[1:] if ids and ids[0] == bos else ids
        return self.tokenizer.encode("\n" + message, add_special_tokens=False)

    def chat(self, session_id: str, message, params: SamplingParams, *,
             ignore_eos: bool = False) -> ChatTurn:
        """One whole turn: `begin`, every prefill chunk, the decode loop, `complete`."""
        turn = self.begin(session_id, message, params, ignore_eos=ignore_eos,
                          start_time=time.perf_counter())
        try:
            logits = None
            while logits is None:
                logits = self.prefill_chunk(turn)
            for _ in decode_loop(self.runner, logits, turn.table, turn.decode_start,
                                 turn.continuation):
                pass
        except BaseException:
            self.abort(turn)
            raise
        self.complete(turn).result()
        return turn.result

    def begin(self, session_id: str, message, params: SamplingParams, *, ignore_eos: bool,
              start_time: float, ephemeral: bool = False) -> ActiveTurn:
        """Starts a turn: encodes the message, truncates the history if the window needs
        it, finds the context's KV (device, host, disk, or a replay), and allocates the
        turn's blocks. An `ephemeral` turn leaves nothing behind (a one-off generation).
        Raises ValueError for a message that cannot run, changing nothing."""
        conversation = self.conversation(session_id)
        new_ids = self.encode_message(conversation, message)
        if not new_ids:
            raise ValueError("message is empty: give at least one token")
        block_size = self.runner.block_size
        dropped = plan_truncation(conversation, len(new_ids), params.max_tokens,
                                  max_context=self.max_context,
                                  sink_blocks=self.sink_blocks)
        kept = [b for b in conversation.blocks if b[0] not in set(dropped)]
        prefix = len(kept) * block_size
        room = self.max_context - prefix - len(conversation.tail) - len(new_ids)
        if room < 1:
            if not conversation.tokens:
                self.sessions.pop(session_id, None)
            raise ValueError(
                f"message of {len(new_ids)} tokens does not fit the context window of "
                f"{self.max_context} tokens, even after truncating the history")
        budget = min(params.max_tokens, room)
        if self.store and not ephemeral:
            self.store.touch(session_id)

        table, tiers, recomputed, arriving = self._context_blocks(session_id, conversation,
                                                                  kept, dropped)
        turn_tokens = conversation.tail + new_ids
        try:
            table += self._allocate(blocks_for(len(turn_tokens) + budget, block_size),
                                    session_id)
        except BaseException:
            self._release(session_id)
            raise
        result = ChatTurn(text="", token_ids=[], finish_reason="length",
                          prompt_token_ids=new_ids, tiers=tiers,
                          cached_tokens=0 if recomputed else prefix,
                          recomputed_tokens=recomputed + len(turn_tokens),
                          dropped_tokens=len(dropped) * block_size)
        continuation = Continuation(params, budget=budget,
                                    eos=set() if ignore_eos else set(self.eos_ids),
                                    tokenizer=self.tokenizer, result=result,
                                    start_time=start_time)
        turn = ActiveTurn(session_id, conversation, new_ids, dropped, len(kept), table,
                          prefix, turn_tokens, arriving, result, continuation, ephemeral)
        self.busy[session_id] = turn
        return turn

    def prefill_chunk(self, turn: ActiveTurn):
        """Prefills the turn's next chunk (`runner.prefill_chunk` tokens). Returns the
        last token's logits `[V]` once the whole turn is prefilled, else None. The first
        chunk takes blocks arriving from host memory or disk layer by layer."""
        chunk = self.runner.prefill_chunk
        done = turn.prefilled
        tokens = turn.turn_tokens[done:done + chunk]
        if turn.arriving:
            ids, blocks = turn.arriving
            turn.arriving = None
            # As many rows as the block table is wide: one compiled step per table width.
            load = self.store.load_layers(blocks, rows=bucket(len(turn.table), minimum=4),
                                          device=self.runner.load_sharding)
            logits = self.runner.prefill_loading(tokens, turn.prefix, turn.table, ids, load)
        else:
            logits = self.runner.prefill(tokens, turn.prefix + done, turn.table)
        turn.prefilled += len(tokens)
        return logits if turn.prefilled == len(turn.turn_tokens) else None

    def complete(self, turn: ActiveTurn) -> concurrent.futures.Future:
        """Appends the message and the answer to the history and keeps the new KV (or,
        for an ephemeral turn, forgets the session). Returns a future that resolves once
        the turn is as durable as the store makes it (its record on disk, with a disk
        tier): acknowledge the turn to its client then."""
        self.busy.pop(turn.session_id, None)
        if turn.ephemeral:
            self.runner.allocator.free(turn.table)
            self.resident.pop(turn.session_id, None)
            self.sessions.pop(turn.session_id, None)
            return _done()
        conversation = turn.conversation
        history_start = conversation.tail_start
        first_token = len(conversation.tokens)
        conversation.tokens.extend(turn.new_ids)
        user_end = len(conversation.tokens)
        conversation.tokens.extend(turn.result.token_ids)
        record = Turn(dropped=turn.dropped, start=history_start, user_end=user_end,
                      end=len(conversation.tokens), table_blocks=len(turn.table))
        return self._finish_turn(turn.session_id, conversation, record, turn.table,
                                 turn.kept_count, first_token)

    def abort(self, turn: ActiveTurn) -> None:
        """Frees a turn that will not complete; the history stays as it was (its KV is
        found again in the store, or replayed)."""
        self.busy.pop(turn.session_id, None)
        self.runner.allocator.free(turn.table)
        self.resident.pop(turn.session_id, None)
        if turn.ephemeral or not turn.conversation.tokens:
            self.sessions.pop(turn.session_id, None)

    def _finish_turn(self, session_id, conversation, turn, table, kept_count,
                     first_token) -> concurrent.futures.Future:
        block_size = self.runner.block_size
        new_blocks = apply_turn(conversation, turn, block_size)
        new_ids = table[kept_count:kept_count + len(new_blocks)]
        resident = self.resident.setdefault(session_id, {})
        for (serial, _, _), block in zip(new_blocks, new_ids):
            resident[serial] = block
        self.runner.allocator.free(table[kept_count + len(new_blocks):])
        if not self.store:
            self._release(session_id)  # without a store nothing outlives the turn
            return _done()
        self._save(session_id, conversation, [b[0] for b in new_blocks], new_ids)
        self.store.drop_blocks(session_id, turn.dropped)
        durable = self.store.append_record(session_id,
                                           turn_entry(conversation, turn, first_token))
        self._enforce_hbm_budget(keep=session_id)
        return durable

    def warm_up_saves(self) -> int:
        """Compiles the copy out of the pool for every count of blocks a save can hold
        (powers of two up to a full context), so that no turn's save compiles. Returns the
        shapes compiled (none without a store)."""
        if self.store is None:
            return 0
        counts = powers_of_two(1, bucket(blocks_for(self.max_context, self.runner.block_size),
                                          minimum=1))
        for count in counts:
            k, v = _read_blocks(self.runner.pool, np.zeros(count, np.int32))
            if self.host_sharding is not None:
                k, v = jax.device_put((k, v), self.host_sharding)
            jax.block_until_ready((k, v))
        return len(counts)

    def _save(self, session_id, conversation, serials, block_ids) -> None:
        """Starts the device-to-host copy now (the pool is donated by the next step), into
        the store's host memory kind, and lets the store's thread wait for it and file
        the blocks as numpy arrays, under their content keys."""
        if not serials:
            return
        padded = np.full(bucket(len(block_ids), minimum=1), block_ids[-1], np.int32)
        padded[:len(block_ids)] = block_ids  # a few shapes, so a few compilations
        k, v = _read_blocks(self.runner.pool, padded)
        if self.host_sharding is not None:
            k, v = jax.device_put((k, v), self.host_sharding)  # starts the copy out now
        host = {}
        count = len(serials)

        def produce(i):
            # Views of one layer-major `[L, count, ...]` array per turn (padding rows cut
            # off), so that a load copies a layer of the turn's blocks as one piece.
            if "k" not in host:
                host["k"], host["v"] = (np.ascontiguousarray(np.asarray(a)[:, :count])
                                        for a in (k, v))
            return BlockKV(host["k"][:, i], host["v"][:, i])

        for i, serial in enumerate(serials):
            self.store.save(session_id, serial, functools.partial(produce, i),
                            block_key=conversation.keys[serial])

    # ----- context --------------------------------------------------------------------

    def _context_blocks(self, session_id, conversation, kept, dropped):
        """Pool blocks for the KV of `kept` (in order), the tiers it came from, how many
        tokens had to be recomputed (all of them when any block is lost), and the blocks
        still to arrive from host memory or disk: `(pool ids, BlockKVs)` or None."""
        resident = self.resident.setdefault(session_id, {})
        for serial in dropped:
            if serial in resident:
                self.runner.allocator.free([resident.pop(serial)])
        tiers = {"hbm": 0, "host": 0, "disk": 0}
        table, loads = [], []
        for serial, _, _ in kept:
            if serial in resident:
                tiers["hbm"] += 1
                table.append(resident[serial])
                continue
            found = (self.store.get(session_id, serial, block_key=conversation.keys[serial])
                     if self.store else None)
            if found is None:
                return (self._replay(session_id, conversation, kept), {},
                        len(kept) * self.runner.block_size, None)
            block, tier = found
            tiers[tier] += 1
            loads.append((serial, block))
            table.append(None)
        if self.store and tiers["hbm"]:
            self.store.count_device_hits(tiers["hbm"], tiers["hbm"] * self.block_bytes)
        arriving = None
        if loads:
            ids = self._allocate(len(loads), session_id)
            arriving = (ids, [block for _, block in loads])
            fill = iter(ids)
            table = [t if t is not None else next(fill) for t in table]
            for (serial, _), block_id in zip(loads, ids):
                resident[serial] = block_id
        return table, {k: v for k, v in tiers.items() if v}, 0, arriving

    def _replay(self, session_id, conversation, kept) -> list[int]:
        """Recomputes the KV of the context blocks `kept` by replaying the turn log. On
        any error (the pool running out) every block it took is freed again."""
        self._release(session_id)
        block_size = self.runner.block_size
        replayed = Conversation(tokens=conversation.tokens)
        placed: dict[int, int] = {}
        owned: set[int] = set()  # every block taken and not yet freed or handed over

        def take(count):
            ids = self._allocate(count, session_id)
            owned.update(ids)
            return ids

        def give_back(ids):
            ids = list(ids)
            self.runner.allocator.free(ids)
            owned.difference_update(ids)

        try:
            for turn in conversation.turns:
                give_back(placed.pop(serial) for serial in turn.dropped)
                replayed.blocks = [b for b in replayed.blocks if b[0] not in set(turn.dropped)]
                table = [placed[s] for s in replayed.serials()]
                prefix = len(table) * block_size
                table += take(turn.table_blocks - len(table))
                tokens = conversation.tokens[turn.start:turn.user_end]
                self.runner.prefill(tokens, prefix, table)
                position = prefix + len(tokens)
                for step, token in enumerate(conversation.tokens[turn.user_end:turn.end - 1]):
                    self.runner.decode([token], [position + step], [table])
                new_blocks = apply_turn(replayed, turn, block_size)
                kept_count = len(replayed.blocks) - len(new_blocks)
                for (serial, _, _), block in zip(new_blocks, table[kept_count:]):
                    placed[serial] = block
                give_back(table[kept_count + len(new_blocks):])
            wanted = {serial for serial, _, _ in kept}
            give_back(b for s, b in placed.items() if s not in wanted)
        except BaseException:
            self.runner.allocator.free(owned)
            raise
        placed = {s: b for s, b in placed.items() if s in wanted}
        self.resident[session_id] = placed
        if self.store:
            self._save(session_id, conversation, list(placed), list(placed.values()))
        return [placed[serial] for serial, _, _ in kept]
