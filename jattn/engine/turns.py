"""Turns over a `ModelRunner`, reusing KV by content across turns and requests.

Every full block of KV a turn computes is published under its content key (see
`jattn.conversation`): it stays in the device pool (`DeviceBlocks`, the HBM tier) while
the budget allows and is saved in the background to the `AttentionStore` (host, disk).
A turn — of a session, or a one-off carrying its whole prompt — reuses the longest run of
its context's leading blocks that some tier holds, whoever computed them, and prefills
the rest. A session's context block missing from every tier is recomputed by prefill:
from the last block present when the context is the history's leading blocks, from the
history following the turn log's truncations when truncation made it something else.
With no store, nothing outlives a turn: every turn recomputes its context.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
from dataclasses import dataclass, field

from jattn.conversation import (
    Conversation,
    Turn,
    apply_turn,
    chained_keys,
    context_keys,
    is_history_prefix,
    plan_truncation,
    root_key,
    truncated_key,
    turn_entry,
)
from jattn.decoding import Continuation
from jattn.distributed.group_store import GroupStore
from jattn.engine.encoding import InputEncoder
from jattn.engine.errors import InvalidRequest, PromptTooLong
from jattn.generation import Generation
from jattn.model.kv_cache import blocks_for, bucket
from jattn.model.runner import LOADING_CHUNK, ModelRunner, Segment
from jattn.sampling import SamplingParams
from jattn.store import AttentionStore, BlockKV, StoreConfig
from jattn.store.device import DeviceBlocks
from jattn.store.remote_read import RemoteRead


def own_blocks(table: list, acquired: list[bytes], device: DeviceBlocks) -> list[int]:
    """The pool blocks of `table` that are not the device tier's blocks of the keys
    `acquired` (None entries: blocks not allocated yet)."""
    shared = {device.block_of(key) for key in acquired}
    return [b for b in table if b is not None and b not in shared]


class RemoteFetch(Exception):
    """A turn needs the remote tier first: `future` resolves once what it needs has come
    (the session's record brought up to date, or the first layer of a run of blocks);
    then begin the turn again with the keyword arguments `resume` added."""

    def __init__(self, future: concurrent.futures.Future, resume: dict):
        super().__init__("waiting for the remote tier")
        self.future = future
        self.resume = resume


@dataclass(frozen=True)
class OneOff:
    """The name of a one-off turn's transient session. Not a string, so no session id
    a client chooses can ever equal it (or reach its KV)."""

    number: int


@dataclass(frozen=True)
class BlockCensus:
    """Where the blocks of the device pool are: `free`, `resident` (held by the device
    tier under a content key, referenced or cached), `in_flight` (a running turn's own,
    not yet published), of `total`; `double_counted` blocks are in two of these places at
    once. Every block is in exactly one place when `balanced`."""

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
    reused context, `turn_tokens` to prefill (any history recomputed, the history's tail,
    the message), of which `prefilled` are done, blocks still `arriving` from the store,
    and the decode state. `acquired` are the device tier's keys it references; the other
    table blocks are its own until `complete` publishes them; `loaded` keys came from
    the store (not saved back)."""

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
    acquired: list[bytes]
    loaded: set[bytes]
    ephemeral: bool = False
    prefilled: int = 0

    @property
    def loading(self) -> bool:
        """True until the prefill that takes the blocks arriving from the store has run."""
        return self.arriving is not None

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens are left to prefill."""
        return self.prefilled < len(self.turn_tokens)

    def own_blocks(self, device: DeviceBlocks) -> list[int]:
        """The table's pool blocks that are not the device tier's."""
        return own_blocks(self.table, self.acquired, device)

    @property
    def decode_start(self) -> int:
        """Position of the first sampled token."""
        return self.prefix + len(self.turn_tokens)

    @property
    def next_position(self) -> int:
        """Position at which the last sampled token is fed back."""
        return self.decode_start + self.continuation.steps - 1


class ChatEngine:
    """Sessions, the device tier of published blocks, and the turn procedure."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_context: int, eos_ids,
                 store: AttentionStore | GroupStore | None, sink_tokens: int, hbm_bytes: int,
                 fingerprint: str):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.store = store
        self.fingerprint = fingerprint
        self.sink_blocks = math.ceil(sink_tokens / runner.block_size)
        self.sessions: dict[str, Conversation] = {}
        self.busy: dict[str, ActiveTurn] = {}  # turns between begin and complete/abort
        block_tokens = runner.block_size
        self.block_bytes = runner.config.kv_bytes_per_token(runner.dtype.itemsize) * block_tokens
        self.device = DeviceBlocks(runner.allocator,
                                   capacity_blocks=hbm_bytes // self.block_bytes)
        device = runner.pool.k[0].devices().pop()
        # Where saved blocks go when they leave the device (None: a plain host copy).
        self.host_memory_kind = store.config.memory_kind_for(device) if store else None

    @property
    def group_store(self) -> GroupStore | None:
        """The store in a group of processes, where each process keeps its own devices'
        blocks; None alone."""
        return self.store if isinstance(self.store, GroupStore) else None

    @property
    def hbm_bytes(self) -> int:
        """The device tier's budget for cached blocks, in bytes."""
        return self.device.capacity_blocks * self.block_bytes

    @hbm_bytes.setter
    def hbm_bytes(self, value: int) -> None:
        self.device.capacity_blocks = value // self.block_bytes

    def root_key(self, scope: str = "") -> bytes:
        """The root of the content keys of a conversation in cache `scope`."""
        return root_key(self.fingerprint, self.runner.block_size, scope)

    # ----- sessions --------------------------------------------------------------------

    def conversation(self, session_id, *, scope: str = "",
                     check_remote: bool = True) -> Conversation:
        """The session's conversation: in memory, from the store's record, or new (then
        its blocks' keys are rooted in cache `scope`). `check_remote`: whether the store
        may ask the remote tier (see `AttentionStore.get_record`)."""
        held = self.sessions.get(session_id)
        entries = (self.store.newer_record(session_id, None if held is None else len(held.turns),
                                           check_remote=check_remote)
                   if self.store and isinstance(session_id, str) else None)
        if held is None or entries:
            # New here, or (with a tier shared by replicas) another replica ran turns since.
            self.sessions[session_id] = (
                Conversation.from_entries(entries, self.runner.block_size) if entries
                else Conversation(context_key=self.root_key(scope)))
        return self.sessions[session_id]

    def session_count(self) -> int:
        """Sessions in memory."""
        return len(self.sessions)

    def has_session(self, session_id) -> bool:
        """True if the session is in memory."""
        return session_id in self.sessions

    def is_busy(self, session_id) -> bool:
        """True while a turn of the session runs."""
        return session_id in self.busy

    def known(self, session_id: str) -> bool:
        """True if the session is in memory or recorded in the store."""
        return session_id in self.sessions or bool(
            self.store and self.store.get_record(session_id))

    def end(self, session_id: str) -> None:
        """Forgets a session: its history and record. Its blocks stay cached by content
        (other requests may share them) until evicted."""
        self.sessions.pop(session_id, None)
        if self.store:
            self.store.drop(session_id)

    def describe(self, session_id: str) -> dict:
        """A session's turns, history and context tokens, and how many of its context
        blocks each tier holds now."""
        conversation = self.conversation(session_id)
        keys = context_keys(conversation)
        held = {"hbm": sum(1 for key in keys if key in self.device), "host": 0, "disk": 0,
                "remote": 0}
        for tier in self.store.held(keys) if self.store else ():
            if tier:
                held[tier] += 1
        return {"session_id": session_id, "turns": len(conversation.turns),
                "history_tokens": len(conversation.tokens),
                "context_tokens": conversation.context_length(),
                "dropped_tokens": len(conversation.tokens) - conversation.context_length(),
                "resident_blocks": held, "busy": session_id in self.busy}

    def hint(self, upcoming_session_ids) -> None:
        """The scheduler's next sessions, most imminent first: their context blocks are
        kept longest in every tier, and prefetched from disk."""
        keys = [key for session in upcoming_session_ids if session in self.sessions
                for key in context_keys(self.sessions[session])]
        self.device.hint(keys)
        if self.store:
            self.store.hint(keys)

    def store_stats(self) -> dict:
        """The device pool's blocks (all, free) and the device tier's (held, one per key
        however many sequences share it; referenced by running turns; evicted so far),
        and the store's counters."""
        stats = self.device.stats()
        merged = {"hbm_blocks": stats.held, "hbm_blocks_referenced": stats.referenced,
                  "hbm_evictions": stats.evicted,
                  "pool_blocks": self.runner.allocator.num_blocks,
                  "pool_free_blocks": self.runner.allocator.free_blocks}
        if self.store is not None:
            merged.update(self.store.stats())
        return merged

    @property
    def lookahead(self) -> int:
        """How many upcoming sessions `hint` is worth giving."""
        return self.store.config.lookahead if self.store else StoreConfig.lookahead

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    @property
    def has_tokenizer(self) -> bool:
        return self.tokenizer is not None

    @property
    def max_turns_per_step(self) -> int:
        """The most turns one model step runs."""
        return self.runner.max_seqs

    @property
    def step_tokens(self) -> int:
        """The most tokens one model step packs (decodes and prompt chunks)."""
        return self.runner.prefill_chunk

    def logit_row_counts(self) -> list[int]:
        """The row counts of the logits `step` returns."""
        return sorted({self.runner.logit_rows(t) for t in self.runner.step_buckets()})

    def warm_up(self) -> None:
        """Compiles every step a turn can run (packed steps, loading prefills, saves),
        so that no turn waits for a compilation."""
        self.runner.warm_up(loading=self.store is not None and self.runner.loads_layer_by_layer)
        self.warm_up_saves()

    def close(self) -> None:
        """Flushes the store's saves in flight and stops its thread."""
        if self.store is not None:
            self.store.close()

    def block_census(self) -> BlockCensus:
        """Counts where every pool block is; `balanced` unless a block leaked or is
        claimed twice."""
        free = self.runner.allocator.free_ids()
        held = self.device.held_blocks()
        held_set = set(held)
        in_flight = {b for turn in self.busy.values() for b in turn.table} - held_set
        double = len(held) - len(held_set) + len(free & held_set) + len(free & in_flight)
        return BlockCensus(total=self.runner.allocator.num_blocks, free=len(free),
                           resident=len(held_set), in_flight=len(in_flight),
                           double_counted=double)

    def _allocate(self, count: int) -> list[int]:
        """Pool blocks, evicting cached blocks of the device tier when the pool is short;
        PoolExhausted (taking none) if that is not enough."""
        allocator = self.runner.allocator
        if count > allocator.free_blocks:
            self.device.evict(count - allocator.free_blocks)
        return allocator.allocate(count)

    # ----- turns -----------------------------------------------------------------------

    def encode_message(self, conversation: Conversation, message, kind: str = "message"
                       ) -> list[int]:
        """The token ids that `message`, input of `kind`, appends to `conversation` (see
        `InputEncoder.encode`)."""
        return InputEncoder(self.tokenizer, self.vocab_size).encode(
            message, kind, first_turn=not conversation.tokens)

    def begin(self, session_id, message, params: SamplingParams, *, ignore_eos: bool,
              start_time: float, ephemeral: bool = False, scope: str = "",
              kind: str = "message", max_new_tokens: int | None = None,
              fetch_remote: bool = True, record_fresh: bool = False,
              remote_read: RemoteRead | None = None) -> ActiveTurn:
        """Starts a turn: encodes the message (see `encode_message`), truncates the
        history if the window needs it, finds the longest run of the context's leading
        blocks some tier holds (device, host, disk), recomputes what is missing, and
        allocates the turn's blocks. An `ephemeral` turn (a one-off generation) keeps no
        history, but publishes its blocks like any other. A new conversation's keys are
        rooted in cache `scope`. Raises ValueError for a message that cannot run (more
        than `max_new_tokens` new tokens, or beyond the window), changing nothing.

        The remote tier is never called here. With a store shared by replicas, a named
        session's first attempt raises `RemoteFetch` while its record is brought up to
        date (unless `record_fresh`); a context that continues in the remote tier (with
        `fetch_remote`) raises `RemoteFetch` while the first layer of those blocks comes,
        and the attempt after that takes them from `remote_read`. Each changes nothing."""
        refresh = (self.store.refresh_record(session_id) if self.store and
                   isinstance(session_id, str) and not record_fresh else None)
        if refresh is not None:
            raise RemoteFetch(refresh, {"record_fresh": True})
        new_session = session_id not in self.sessions
        conversation = self.conversation(session_id, scope=scope,
                                         check_remote=not record_fresh)
        try:
            return self._begin(session_id, conversation,
                               self.encode_message(conversation, message, kind), params,
                               ignore_eos=ignore_eos, start_time=start_time,
                               ephemeral=ephemeral, max_new_tokens=max_new_tokens,
                               remote=(fetch_remote, remote_read))
        except BaseException:
            if new_session and not conversation.tokens:
                self.sessions.pop(session_id, None)
            raise

    def _begin(self, session_id, conversation, new_ids, params, *, ignore_eos,
               start_time, ephemeral, max_new_tokens, remote) -> ActiveTurn:
        if not new_ids:
            raise InvalidRequest("message is empty: give at least one token")
        if max_new_tokens is not None and len(new_ids) > max_new_tokens:
            raise PromptTooLong(f"the turn has {len(new_ids)} new tokens, more than the "
                             f"limit of {max_new_tokens}")
        block_size = self.runner.block_size
        dropped = plan_truncation(conversation, len(new_ids), params.max_tokens,
                                  max_context=self.max_context,
                                  sink_blocks=self.sink_blocks)
        kept = [b for b in conversation.blocks if b[0] not in set(dropped)]
        room = (self.max_context - len(kept) * block_size - len(conversation.tail)
                - len(new_ids))
        if room < 1:
            raise PromptTooLong(
                f"message of {len(new_ids)} tokens does not fit the context window of "
                f"{self.max_context} tokens, even after truncating the history")
        budget = min(params.max_tokens, room)
        context = self._context(conversation, kept, dropped, conversation.tail + new_ids,
                                remote)
        try:
            context.table += self._allocate(
                blocks_for(len(context.turn_tokens) + budget, block_size))
        except BaseException:
            self._undo(context)
            raise
        reused = len(context.acquired) + len(context.loaded)
        tiers = {tier: count for tier, count in context.tiers.items() if count}
        result = ChatTurn(text="", token_ids=[], finish_reason="length",
                          prompt_token_ids=new_ids, tiers=tiers,
                          cached_tokens=reused * block_size,
                          recomputed_tokens=len(context.turn_tokens) + context.history_tokens,
                          dropped_tokens=len(dropped) * block_size)
        continuation = Continuation(params, budget=budget,
                                    eos=set() if ignore_eos else set(self.eos_ids),
                                    tokenizer=self.tokenizer, result=result,
                                    start_time=start_time)
        turn = ActiveTurn(session_id, conversation, new_ids, dropped, len(kept),
                          context.table, context.prefix, context.turn_tokens,
                          context.arriving, result, continuation, context.acquired,
                          set(context.loaded), ephemeral)
        self.busy[session_id] = turn
        return turn

    def step(self, decoding: list[ActiveTurn], prefilling: list[tuple[ActiveTurn, int]]):
        """One model step, packed: the last token of each turn of `decoding` (each past
        its prefill) at its next position, and the next `count` prompt tokens of each
        `(turn, count)` of `prefilling` (none `loading`). Returns logits `[R, V]`: row i
        is `decoding[i]`'s, then one row per prefilling turn, its chunk's last token's
        (the turn's first answer token's logits once its prompt is done)."""
        segments = [Segment([t.result.token_ids[-1]], t.next_position, t.table)
                    for t in decoding]
        for turn, count in prefilling:
            done = turn.prefilled
            segments.append(Segment(turn.turn_tokens[done:done + count], turn.prefix + done,
                                    turn.table))
        logits = self.runner.run(segments)
        for turn, count in prefilling:
            turn.prefilled += count
        return logits

    def prefill_loading(self, turn: ActiveTurn):
        """Prefills the first tokens (up to `LOADING_CHUNK`) of a `loading` turn while its
        blocks arrive from host memory or disk layer by layer. Returns the last token's
        logits `[V]` if that was the whole prompt, else None (`step` does the rest)."""
        tokens = turn.turn_tokens[:LOADING_CHUNK]
        ids, blocks = turn.arriving
        turn.arriving = None
        load = self.store.load_layers(blocks, rows=bucket(len(turn.table), minimum=4),
                                      device=self.runner.load_sharding)
        logits = self.runner.prefill_loading(tokens, turn.prefix, turn.table, ids, load)
        turn.prefilled = len(tokens)
        return logits if turn.prefilled == len(turn.turn_tokens) else None

    def complete(self, turn: ActiveTurn) -> concurrent.futures.Future:
        """Appends the message and the answer to the history, publishes every full block
        the turn holds under its key, and (unless the turn is ephemeral) records it.
        Returns a future that resolves once the turn is as durable as the store makes it
        (its record on disk, with a disk tier): acknowledge the turn to its client then."""
        self.busy.pop(turn.session_id, None)
        conversation = turn.conversation
        history_start = conversation.tail_start
        first_token = len(conversation.tokens)
        root = conversation.context_key if not conversation.turns else None
        conversation.tokens.extend(turn.new_ids)
        user_end = len(conversation.tokens)
        conversation.tokens.extend(turn.result.token_ids)
        record = Turn(dropped=turn.dropped, start=history_start, user_end=user_end,
                      end=len(conversation.tokens))
        apply_turn(conversation, record, self.runner.block_size)
        keys = context_keys(conversation)
        self._publish(turn, keys)
        self.runner.allocator.free(turn.table[len(keys):])
        for key in turn.acquired:
            self.device.release(key)
        self.device.trim()
        if turn.ephemeral:
            self.sessions.pop(turn.session_id, None)
        if turn.ephemeral or not self.store:
            return _done()
        return self.store.append_record(turn.session_id,
                                        turn_entry(conversation, record, first_token, root))

    def _publish(self, turn: ActiveTurn, keys: list[bytes]) -> None:
        """Hands the turn's own full blocks (`turn.table[i]` holds the block of
        `keys[i]`) to the device tier, and saves to the store those it did not have."""
        new_keys, new_ids = [], []
        own = set(turn.own_blocks(self.device))
        for key, block in zip(keys, turn.table):
            if block not in own:
                continue
            held, new = self.device.publish(key, block)
            if new and self.store and key not in turn.loaded:
                new_keys.append(key)
                new_ids.append(held)
        stored = self.store.held(new_keys) if new_keys else []
        self._save([key for key, tier in zip(new_keys, stored) if tier is None],
                   [block for block, tier in zip(new_ids, stored) if tier is None])

    def abort(self, turn: ActiveTurn) -> None:
        """Frees a turn that will not complete; the history stays as it was."""
        self.busy.pop(turn.session_id, None)
        self.runner.allocator.free(turn.own_blocks(self.device))
        for key in turn.acquired:
            self.device.release(key)
        if turn.ephemeral or not turn.conversation.tokens:
            self.sessions.pop(turn.session_id, None)

    def warm_up_saves(self) -> int:
        """Compiles the copy out of the pool for every count of blocks a save can hold
        (up to a full context) — in a group of processes, every store step's copies and
        gathers — so that no turn's save or load compiles. Returns the shapes compiled
        (none without a store)."""
        most = blocks_for(self.max_context, self.runner.block_size)
        if self.group_store is not None:
            return self.group_store.warm_up(most)
        if self.store is None:
            return 0
        return self.runner.warm_up_copies(most, self.host_memory_kind)

    def _save(self, keys: list[bytes], block_ids: list[int]) -> None:
        """Starts the copy of pool blocks `block_ids` out of the device now, and lets
        the store's thread wait for it and file each block under its key. The blocks are
        views of one layer-major `[L, n, ...]` array, so that a load copies a layer of
        them as one piece."""
        if not keys:
            return
        if self.group_store is not None:
            self.group_store.save_blocks(keys, block_ids)
            return
        arrays = functools.cache(self.runner.copy_out(block_ids, self.host_memory_kind))

        def produce(i):
            k, v = arrays()
            return BlockKV(k[:, i], v[:, i])

        for i, key in enumerate(keys):
            self.store.save(key, functools.partial(produce, i))

    # ----- context --------------------------------------------------------------------

    def _context(self, conversation, kept, dropped, turn_tokens,
                 remote: tuple[bool, RemoteRead | None] = (False, None)) -> "_Context":
        """The pool blocks of the turn's reused context and what is left to prefill.

        Looks the context's keys up in order — the kept blocks', then those of the
        leading full blocks of `turn_tokens` (chained after the truncation, if any) —
        and stops at the first no tier holds. A missing kept block is recomputed: with
        the rest of the history by prefill if the kept blocks are the history's leading
        blocks, else from the history following the turn log (`_recompute`)."""
        block_size = self.runner.block_size
        context_key = (truncated_key(conversation.context_key, dropped) if dropped
                       else conversation.context_key)
        kept_keys = [conversation.keys[serial] for serial, _, _ in kept]
        ahead = chained_keys(context_key, turn_tokens[:len(turn_tokens) - 1], block_size)
        found = _Context(turn_tokens=turn_tokens)
        try:
            self._reuse(kept_keys + ahead, found, *remote)
            if len(found.table) < len(kept):
                if is_history_prefix(kept, block_size):
                    start = len(found.table) * block_size
                    found.turn_tokens = conversation.tokens[start:conversation.tail_start] \
                        + turn_tokens
                else:
                    self._undo(found)
                    table, history_tokens = self._recompute(conversation, kept)
                    return _Context(turn_tokens=turn_tokens, table=table,
                                    prefix=len(kept) * block_size,
                                    history_tokens=history_tokens)
            else:
                found.turn_tokens = turn_tokens[(len(found.table) - len(kept)) * block_size:]
            found.prefix = len(found.table) * block_size
            self._start_loads(found)
        except BaseException:
            self._undo(found)
            raise
        if self.store and found.tiers["hbm"]:
            self.store.count_device_hits(found.tiers["hbm"], found.tiers["hbm"] * self.block_bytes)
        return found

    def _reuse(self, keys: list[bytes], found: "_Context", fetch_remote: bool,
               remote_read: RemoteRead | None) -> None:
        """Appends to the context the blocks of the leading run of `keys` that some tier
        holds, each from the fastest: the device pool's in place, the local tiers' from
        the store (each stretch of keys the device does not hold in one `get_run`; in a
        group of processes, loaded at once from the processes that hold them), then
        those that `remote_read` brings, if it read the keys that follow. Without such a
        read, and with `fetch_remote`, a run that stops short starts one and raises
        `RemoteFetch`."""
        remote = remote_read.keys if remote_read is not None else []
        start = 0
        while start < len(keys):
            if keys[start] in self.device:
                found.table.append(self.device.acquire(keys[start]))
                found.acquired.append(keys[start])
                found.tiers["hbm"] += 1
                start += 1
                continue
            if remote and keys[start:start + len(remote)] == remote:
                blocks = self.store.remote_run(remote_read, _NoAllocation()).arriving
                self._take(found, keys[start:], [(b, "remote") for b in blocks])
                start += len(blocks)
                remote = []
                continue
            end = start
            while end < len(keys) and keys[end] not in self.device and \
                    not (remote and keys[end] == remote[0]):
                end += 1
            if self.group_store is not None:
                start += self._place(found, keys[start:end])
            else:
                got = self.store.get_run(keys[start:end]) if self.store else []
                self._take(found, keys[start:], got)
                start += len(got)
            if start < end:
                read = self.store.read_remote(keys[start:end]) if fetch_remote and self.store \
                    else None
                if read is not None:
                    raise RemoteFetch(read.ready, {"fetch_remote": False, "remote_read": read})
                return

    @staticmethod
    def _take(found: "_Context", keys: list[bytes], blocks: list[tuple]) -> None:
        """Appends blocks `(BlockKV, tier)` coming from the store, for `keys` in order."""
        for key, (block, tier) in zip(keys, blocks):
            found.tiers[tier] += 1
            found.table.append(None)
            found.loaded.append(key)
            found.loads.append(block)

    def _place(self, found: "_Context", keys: list[bytes]) -> int:
        """In a group of processes: loads the leading run of `keys` that some process
        holds into pool blocks on that process's devices at once, appends them to the
        context, and returns how many."""
        placed = self.group_store.load_run(keys, self._allocate_on, self.runner.allocator.free)
        for key, (block, tier) in zip(keys, placed):
            found.tiers[tier] += 1
            found.table.append(block)
            found.loaded.append(key)
        return len(placed)

    def _allocate_on(self, devices: list[int], count: int) -> list[int]:
        """Pool blocks on the mesh's `devices`, evicting cached blocks of the device tier
        there when those are short; PoolExhausted (taking none) if that is not enough."""
        allocator = self.runner.allocator
        short = count - sum(allocator.free_on(device) for device in devices)
        if short > 0:
            on_devices = set(devices)
            self.device.evict(short, where=lambda block: allocator.device_of(block) in on_devices)
        return allocator.allocate_on(devices, count)

    def _start_loads(self, found: "_Context") -> None:
        """Allocates pool blocks for the blocks coming from the store."""
        if not found.loads:
            return
        ids = self._allocate(len(found.loads))
        fill = iter(ids)
        found.table[:] = [b if b is not None else next(fill) for b in found.table]
        found.arriving = (ids, found.loads)

    def _undo(self, found: "_Context") -> None:
        """Gives back what `_context` took: references and allocated blocks."""
        own = found.own_blocks(self.device)
        for key in found.acquired:
            self.device.release(key)
        self.runner.allocator.free(own)
        found.acquired, found.table = [], []

    def _recompute(self, conversation, kept) -> tuple[list[int], int]:
        """Recomputes the KV of context blocks `kept` (of a truncated conversation) by
        prefill from the history, following the turn log's truncations: the tokens of the
        turns between two truncations are prefilled at once after the blocks then in the
        context, and each truncation drops its blocks, so every kept block attends to what
        it attended to when first computed (its KV equals the lost one's within float
        rounding). Returns the kept blocks' pool blocks and the tokens prefilled. On any
        error (the pool running out) every block it took is freed."""
        block_size = self.runner.block_size
        rebuilt = Conversation(tokens=conversation.tokens, context_key=conversation.context_key)
        placed: dict[int, int] = {}  # serial -> pool block
        prefilled = 0
        owned: set[int] = set()  # every block taken and not yet freed or handed over

        def give_back(ids):
            ids = list(ids)
            self.runner.allocator.free(ids)
            owned.difference_update(ids)

        try:
            for segment in _truncation_segments(conversation.turns):
                dropped = set(segment[0].dropped)
                give_back(placed.pop(serial) for serial in dropped)
                context = [placed[serial] for serial in rebuilt.serials()
                           if serial not in dropped]
                start, end = segment[0].start, segment[-1].computed_end
                fresh = self._allocate(blocks_for(end - start, block_size))
                owned.update(fresh)
                self.runner.prefill(conversation.tokens[start:end],
                                    len(context) * block_size, context + fresh)
                prefilled += end - start
                new_blocks = [block for turn in segment
                              for block in apply_turn(rebuilt, turn, block_size)]
                for (serial, _, _), block in zip(new_blocks, fresh):
                    placed[serial] = block
                give_back(fresh[len(new_blocks):])
            wanted = {serial for serial, _, _ in kept}
            give_back(b for s, b in placed.items() if s not in wanted)
        except BaseException:
            self.runner.allocator.free(owned)
            raise
        return [placed[serial] for serial, _, _ in kept], prefilled


def _truncation_segments(turns: list[Turn]) -> list[list[Turn]]:
    """The turn log cut before every turn that drops blocks."""
    segments: list[list[Turn]] = []
    for turn in turns:
        if turn.dropped or not segments:
            segments.append([])
        segments[-1].append(turn)
    return segments


@dataclass
class _Context:
    """What `ChatEngine._context` finds: the pool `table` of the reused context blocks
    (None while a block from the store has no pool block yet), the device tier's keys it
    `acquired` (they lead the table), the keys `loaded` from the store and their blocks
    (`loads`), the blocks `arriving` `(pool ids, BlockKVs)`, reused blocks per tier, the
    `prefix` tokens reused, the `turn_tokens` left to prefill, and the `history_tokens`
    prefilled to recompute a truncated context."""

    turn_tokens: list[int]
    table: list = field(default_factory=list)
    acquired: list[bytes] = field(default_factory=list)
    loaded: list[bytes] = field(default_factory=list)
    loads: list = field(default_factory=list)
    arriving: tuple | None = None
    tiers: dict = field(default_factory=lambda: {"hbm": 0, "host": 0, "disk": 0,
                                                 "remote": 0})
    prefix: int = 0
    history_tokens: int = 0

    def own_blocks(self, device: DeviceBlocks) -> list[int]:
        """The table's pool blocks that are not the device tier's."""
        return own_blocks(self.table, self.acquired, device)


class _NoAllocation:
    def allocate(self, count):
        return [None] * count
