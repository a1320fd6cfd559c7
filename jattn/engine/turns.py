"""The turn procedure over a `ModelRunner`, reusing KV by content across turns and
requests.

Every full block of KV a turn computes is published under its content key (see
`jattn.conversation`) to the `KVCacheManager`, which keeps it in the device pool (the
device tier) while the budget allows and has it saved to the store (host, disk) by the
plan of a step. A turn — of a session, or a one-off carrying its whole prompt — reuses
the longest run of its context's leading blocks that some tier holds, whoever computed
them, and prefills the rest. A session's context block missing from every tier is
recomputed by prefill: from the last block present when the context is the history's
leading blocks, from the history following the turn log's truncations when truncation
made it something else. With `NoStore`, nothing outlives a turn but the device tier.

Each model step is a `StepPlan` the engine decides (`plan_step`, `plan_arrival`) and
`run` executes on the runner.
"""

from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass
from typing import Callable

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
from jattn.engine.encoding import InputEncoder
from jattn.engine.errors import InvalidRequest, PromptTooLong
from jattn.engine.kv_cache_manager import BlockCensus, BlockLease, KVCacheManager
from jattn.engine.sessions import Sessions
from jattn.generation import Generation
from jattn.model.kv_cache import blocks_for
from jattn.model.runner import LOADING_CHUNK, ModelRunner
from jattn.model.step_plan import Arrival, Segment, StepOutput, StepPlan
from jattn.sampling import SamplingParams
from jattn.store.kv_store import KVStore, NoStore, resolved
from jattn.store.remote_read import RemoteRead

__all__ = ["ActiveTurn", "BlockCensus", "ChatEngine", "ChatTurn", "OneOff", "RemoteFetch"]


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


@dataclass
class ChatTurn(Generation):
    """A `Generation` plus what the turn reused: `cached_tokens` (context tokens whose KV
    was not recomputed), `tiers` (blocks reused per tier), `recomputed_tokens`
    (prefilled: the new tokens plus any history that had to be recomputed),
    `dropped_tokens` (history truncated out of the window before this turn), and, once
    a session's turn has ended, `durable`: whether its record got where the store keeps
    records (False: a disk tier that failed or went read-only, a record that a store
    shared by replicas did not take; a restarted server may not hold this turn). None
    for a one-off generation, which keeps no record."""

    cached_tokens: int = 0
    recomputed_tokens: int = 0
    dropped_tokens: int = 0
    tiers: dict | None = None
    durable: bool | None = None


@dataclass
class ActiveTurn:
    """A turn between `ChatEngine.begin` and `complete`/`abort`: its session, the new
    message ids, the context blocks `dropped` by truncation, the `lease` on its pool
    blocks (context blocks, then the turn's), `prefix` tokens of reused context,
    `turn_tokens` to prefill (any history recomputed, the history's tail, the message),
    of which `prefilled` are planned, and the decode state: `pending` tokens drawn by
    steps dispatched but not yet taken, the last of them in row `fed_row` of the
    latest step's tokens."""

    session_id: object
    conversation: Conversation
    new_ids: list[int]
    dropped: list[int]
    lease: BlockLease
    prefix: int
    turn_tokens: list[int]
    result: ChatTurn
    continuation: Continuation
    ephemeral: bool = False
    prefilled: int = 0
    pending: int = 0
    fed_row: int = 0

    @property
    def table(self) -> list[int]:
        """The turn's pool blocks, in sequence order."""
        return self.lease.table

    @property
    def loading(self) -> bool:
        """True until the step that takes the blocks arriving from the store has run."""
        return bool(self.lease.arriving)

    @property
    def prefilling(self) -> bool:
        """True while prompt tokens are left to prefill."""
        return self.prefilled < len(self.turn_tokens)

    @property
    def decode_start(self) -> int:
        """Position of the first sampled token."""
        return self.prefix + len(self.turn_tokens)

    @property
    def drawn(self) -> int:
        """Tokens drawn by the steps dispatched so far (taken or pending)."""
        return self.continuation.steps + self.pending

    @property
    def decoding(self) -> bool:
        """True while the turn has a drawn token to feed back and room for the token
        after it: a decode step would help it (unless a pending token ended it)."""
        return self.drawn > 0 and not self.continuation.finished and \
            self.drawn < self.continuation.budget


class ChatEngine:
    """Turns of sessions and one-offs over a runner: the turn procedure (`begin`,
    `complete`, `abort`), the steps' plans, the `Sessions`, and the `KVCacheManager` of
    the device pool and `store` (None: `NoStore`). `hbm_bytes`: the device tier's budget
    of cached blocks, in bytes."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_context: int, eos_ids,
                 store: KVStore | None, sink_tokens: int, hbm_bytes: int, fingerprint: str):
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.eos_ids = eos_ids
        self.store = store if store is not None else NoStore()
        self.fingerprint = fingerprint
        self.block_size = runner.block_size
        self.sink_blocks = math.ceil(sink_tokens / self.block_size)
        self.inputs = InputEncoder(tokenizer, runner.config.vocab_size)
        self.sessions = Sessions(self.store, block_size=self.block_size, root_key=self.root_key)
        block_bytes = runner.config.kv_bytes_per_token(runner.dtype.itemsize) * self.block_size
        self.blocks = KVCacheManager(runner.new_allocator(), self.store,
                                     block_bytes=block_bytes,
                                     capacity_blocks=hbm_bytes // block_bytes,
                                     devices_of_process=runner.devices_of_process)
        self._busy: dict = {}  # session -> its turn between begin and complete/abort

    def root_key(self, scope: str = "") -> bytes:
        """The root of the content keys of a conversation in cache `scope`."""
        return root_key(self.fingerprint, self.block_size, scope)

    # ----- sessions --------------------------------------------------------------------

    def conversation(self, session_id, *, scope: str = "",
                     check_remote: bool = True) -> Conversation:
        """The session's conversation (see `Sessions.get`)."""
        return self.sessions.get(session_id, scope=scope, check_remote=check_remote)

    def session_count(self) -> int:
        """Sessions in memory."""
        return len(self.sessions)

    def has_session(self, session_id) -> bool:
        """True if the session is in memory."""
        return session_id in self.sessions

    def is_busy(self, session_id) -> bool:
        """True while a turn of the session runs."""
        return session_id in self._busy

    def known(self, session_id: str, *, check_remote: bool = True) -> bool:
        """True if the session is in memory or recorded in the store (see
        `Sessions.known`)."""
        return self.sessions.known(session_id, check_remote=check_remote)

    def forget(self, session_id: str) -> None:
        """Forgets a session's history in memory; `drop_record` forgets its record. Its
        blocks stay cached by content (other requests may share them) until evicted."""
        self.sessions.forget(session_id)

    def check_record(self, session_id: str) -> None:
        """Brings the session's record up to date with a store shared by replicas (a call
        to Redis, on the caller's thread: not the engine's), raising what the check
        finds (`SessionLost`, `RecordUnavailable`); nothing without one."""
        refresh = self.store.refresh_record(session_id)
        if refresh is not None:
            refresh.result()

    def drop_record(self, session_id: str) -> None:
        """Forgets the session's record in the store (on disk, and in a tier shared by
        replicas: a call to Redis, so not on the engine's thread)."""
        self.sessions.drop_record(session_id)

    def describe(self, session_id: str) -> dict:
        """A session's turns, history and context tokens, and how many of its context
        blocks each tier holds now (its record as `check_record` last brought it)."""
        conversation = self.conversation(session_id, check_remote=False)
        return {"session_id": session_id, "turns": len(conversation.turns),
                "history_tokens": len(conversation.tokens),
                "context_tokens": conversation.context_length(),
                "dropped_tokens": len(conversation.tokens) - conversation.context_length(),
                "resident_blocks": self.blocks.resident(context_keys(conversation)),
                "busy": session_id in self._busy}

    def hint(self, upcoming_keys: list[bytes]) -> None:
        """The block keys the next turns look up first, most imminent first (from
        `session_keys` and `prompt_keys`): every tier keeps them longest, and the store
        reads those below host memory into it in the background."""
        self.blocks.hint(upcoming_keys)

    def session_keys(self, session_ids) -> list[bytes]:
        """The context blocks' keys of the sessions among `session_ids` in memory, in
        order."""
        return [key for conversation in self.sessions.context_of(session_ids)
                for key in context_keys(conversation)]

    def prompt_keys(self, message, kind: str, scope: str = "") -> list[bytes]:
        """The keys that a new conversation (a one-off, or a session's first turn)
        opening with `message`, input of `kind`, in cache `scope` looks up first: those
        of its prompt's full blocks before the last token. [] for input that cannot be
        encoded (its turn reports why when it begins; a hint never fails)."""
        try:
            ids = self.inputs.encode(message, kind, first_turn=True)
        except Exception:
            return []
        return chained_keys(self.root_key(scope), ids[:-1], self.block_size)

    def store_stats(self) -> dict:
        """The device pool's and the device tier's blocks, and the store's counters (see
        `KVCacheManager.stats`)."""
        return self.blocks.stats()

    def block_census(self) -> BlockCensus:
        """Where every pool block is; `balanced` unless a block leaked or is claimed
        twice."""
        return self.blocks.census()

    @property
    def lookahead(self) -> int:
        """How many queued turns `hint` is worth giving."""
        return self.store.lookahead

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    @property
    def max_turns_per_step(self) -> int:
        """The most turns one model step runs."""
        return self.runner.max_seqs

    @property
    def step_tokens(self) -> int:
        """The most tokens one model step packs (decodes and prompt chunks) without
        compiling: smaller while a warm-up compiles the larger steps in the background
        (`ModelRunner.step_tokens`)."""
        return self.runner.step_tokens

    def warm_up(self) -> None:
        """Makes every step a turn can run ready (packed steps, and what the store's
        loads and saves run), so that no turn waits for a compilation. On one device
        only what the first turns need compiles before it returns — the first packed
        step (`ModelRunner.warm_up`) and the saves' copies — and the rest in the
        background (`wait_compiled`); until the store's loads are compiled, a turn takes
        no KV from the store (its context past the device tier is recomputed)."""
        self.runner.warm_up()
        self.store.warm_up(self.runner, blocks_for(self.max_context, self.block_size))

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Waits up to `timeout` seconds (None: as long as it takes) for the background
        compilation of a warm-up; True once nothing is left to compile."""
        return self.runner.wait_compiled(timeout)

    def close(self) -> None:
        """Stops the background compilation (`ModelRunner.stop_compiling`), flushes the
        store's saves in flight and stops its threads."""
        self.runner.stop_compiling()
        self.store.close()

    # ----- turns -----------------------------------------------------------------------

    def encode_message(self, conversation: Conversation, message, kind: str = "message"
                       ) -> list[int]:
        """The token ids that `message`, input of `kind`, appends to `conversation` (see
        `InputEncoder.encode`)."""
        return self.inputs.encode(message, kind, first_turn=not conversation.tokens)

    def begin(self, session_id, message, params: SamplingParams, *, ignore_eos: bool,
              start_time: float, ephemeral: bool = False, scope: str = "",
              kind: str = "message", max_new_tokens: int | None = None,
              fetch_remote: bool = True, record_check: concurrent.futures.Future | None = None,
              remote_read: RemoteRead | None = None) -> ActiveTurn:
        """Starts a turn: encodes the message (see `encode_message`), truncates the
        history if the window needs it, finds the longest run of the context's leading
        blocks some tier holds (device, host, disk), recomputes what is missing, and
        allocates the turn's blocks. An `ephemeral` turn (a one-off generation) keeps no
        history, but publishes its blocks like any other. A new conversation's keys are
        rooted in cache `scope`. Raises InvalidRequest for a message that cannot run
        (more than `max_new_tokens` new tokens, or beyond the window), changing nothing.

        The remote tier is never called here. With a store shared by replicas, a named
        session's first attempt raises `RemoteFetch` while its record is brought up to
        date and checked, and the attempt after that raises what the check found
        (`SessionLost`, `RecordUnavailable`), if anything; a context that continues in
        the remote tier (with `fetch_remote`) raises `RemoteFetch` while the first layer
        of those blocks comes, and the attempt after that takes them from `remote_read`.
        Each changes nothing."""
        if record_check is not None:
            record_check.result()
        elif isinstance(session_id, str):
            refresh = self.store.refresh_record(session_id)
            if refresh is not None:
                raise RemoteFetch(refresh, {"record_check": refresh})
        new_session = session_id not in self.sessions
        conversation = self.conversation(session_id, scope=scope,
                                         check_remote=record_check is None)
        try:
            return self._begin(session_id, conversation,
                               self.encode_message(conversation, message, kind), params,
                               ignore_eos=ignore_eos, start_time=start_time,
                               ephemeral=ephemeral, max_new_tokens=max_new_tokens,
                               remote=(fetch_remote, remote_read))
        except BaseException:
            if new_session and not conversation.tokens:
                self.sessions.forget(session_id)
            raise

    def _begin(self, session_id, conversation, new_ids, params, *, ignore_eos,
               start_time, ephemeral, max_new_tokens, remote) -> ActiveTurn:
        if not new_ids:
            raise InvalidRequest("message is empty: give at least one token")
        if max_new_tokens is not None and len(new_ids) > max_new_tokens:
            raise PromptTooLong(f"the turn has {len(new_ids)} new tokens, more than the "
                                f"limit of {max_new_tokens}")
        dropped = plan_truncation(conversation, len(new_ids), params.max_tokens,
                                  max_context=self.max_context,
                                  sink_blocks=self.sink_blocks)
        kept = [b for b in conversation.blocks if b[0] not in set(dropped)]
        room = (self.max_context - len(kept) * self.block_size - len(conversation.tail)
                - len(new_ids))
        if room < 1:
            raise PromptTooLong(
                f"message of {len(new_ids)} tokens does not fit the context window of "
                f"{self.max_context} tokens, even after truncating the history")
        budget = min(params.max_tokens, room)
        context = self._context(conversation, kept, dropped, conversation.tail + new_ids,
                                *remote)
        try:
            self.blocks.extend(context.lease,
                               blocks_for(len(context.turn_tokens) + budget, self.block_size))
        except BaseException:
            self.blocks.release(context.lease)
            raise
        tiers = {tier: count for tier, count in context.lease.tiers.items() if count}
        result = ChatTurn(text="", token_ids=[], finish_reason="length",
                          prompt_token_ids=new_ids, tiers=tiers,
                          cached_tokens=context.lease.reused_blocks * self.block_size,
                          recomputed_tokens=len(context.turn_tokens) + context.history_tokens,
                          dropped_tokens=len(dropped) * self.block_size)
        continuation = Continuation(params, budget=budget,
                                    eos=set() if ignore_eos else set(self.eos_ids),
                                    tokenizer=self.tokenizer, result=result,
                                    start_time=start_time)
        turn = ActiveTurn(session_id, conversation, new_ids, dropped, context.lease,
                          context.prefix, context.turn_tokens, result, continuation,
                          ephemeral)
        self._busy[session_id] = turn
        return turn

    # ----- steps -----------------------------------------------------------------------

    def plan_step(self, decoding: list[ActiveTurn],
                  prefilling: list[tuple[ActiveTurn, int]], fed_tokens=None) -> StepPlan:
        """The plan of one packed step: the last drawn token of each turn of `decoding`
        (each `decoding`) at its position — read on the device from `fed_tokens` (the
        latest step's `StepOutput.tokens`) while it is pending, else from the host —
        then the next `count` prompt tokens of each `(turn, count)` of `prefilling`
        (none `loading`), which it counts as prefilled. Segment i's next token is drawn
        for a decode and for a prompt's last chunk, and counted pending."""
        segments = []
        for turn in decoding:
            position = turn.decode_start + turn.drawn - 1
            if turn.pending:
                segments.append(Segment((0,), position, tuple(turn.table), fed=turn.fed_row))
            else:
                segments.append(Segment((turn.result.token_ids[-1],), position,
                                        tuple(turn.table)))
        drawing = list(decoding)
        for turn, count in prefilling:
            done = turn.prefilled
            segments.append(Segment(tuple(turn.turn_tokens[done:done + count]),
                                    turn.prefix + done, tuple(turn.table)))
            turn.prefilled += count
            drawing.append(turn if not turn.prefilling else None)
        draws = []
        for row, turn in enumerate(drawing):
            draws.append(None if turn is None else self._draw(turn, row))
        return StepPlan(segments=tuple(segments),
                        sampled=tuple(draw is not None for draw in draws),
                        draws=tuple(draws), fed_tokens=fed_tokens)

    @staticmethod
    def _draw(turn: ActiveTurn, row: int):
        """The turn's next draw, made by the step being planned in `row`."""
        turn.pending += 1
        turn.fed_row = row
        return turn.continuation.draw()

    def plan_arrival(self, turn: ActiveTurn) -> StepPlan:
        """The plan of a `loading` turn's first step: its first tokens (up to
        `LOADING_CHUNK`), run layer by layer while the blocks from the store arrive,
        which it counts as prefilled (the next token drawn, in row 0, if they end the
        prompt)."""
        tokens = turn.turn_tokens[:LOADING_CHUNK]
        arriving = turn.lease.take_arriving()
        source = self.store.load_layers([block for _, block in arriving],
                                        device=self.runner.load_sharding)
        turn.prefilled = len(tokens)
        draw = None if turn.prefilling else self._draw(turn, 0)
        return StepPlan(segments=(Segment(tuple(tokens), turn.prefix, tuple(turn.table)),),
                        sampled=(draw is not None,), draws=(draw,),
                        arrival=Arrival(tuple(block for block, _ in arriving), source))

    def run(self, plan: StepPlan) -> StepOutput:
        """Executes a step's plan on the runner; files the blocks its saves copy out in
        the store."""
        copies = self._queue_saves(plan)
        return self._execute(plan, copies)

    def _queue_saves(self, plan: StepPlan) -> concurrent.futures.Future:
        """Queues the filing of `plan`'s saves in the store before the plan runs (so
        that a store `flush` from now on waits for them), from the copies of its output:
        the future to set to `StepOutput.saved` once it is dispatched."""
        copies = concurrent.futures.Future()
        if plan.saves:
            self.store.save_blocks([save.key for save in plan.saves],
                                   [save.block for save in plan.saves],
                                   lambda: copies.result()())
        return copies

    def _execute(self, plan: StepPlan, copies: concurrent.futures.Future) -> StepOutput:
        """Executes `plan`, handing its copies out to the saves `_queue_saves` queued."""
        try:
            output = self.runner.execute(plan)
        except BaseException as error:
            copies.set_exception(error)
            raise
        copies.set_result(output.saved)
        return output

    def complete(self, turn: ActiveTurn, answered: Callable[[], None] = lambda: None
                 ) -> concurrent.futures.Future:
        """Appends the message and the answer to the history, publishes every full block
        the turn holds under its key, queues the saves of those the store lacks, calls
        `answered()` (the turn is whole: a one-off turn's client need not wait for what
        follows), starts the saves' copies out of the pool, and (unless the turn is
        ephemeral) records it. Returns a future that resolves once the turn is as
        durable as the store makes it (its record on disk, with a disk tier):
        acknowledge the turn to its client then."""
        self._busy.pop(turn.session_id, None)
        conversation = turn.conversation
        history_start = conversation.tail_start
        first_token = len(conversation.tokens)
        root = conversation.context_key if not conversation.turns else None
        conversation.tokens.extend(turn.new_ids)
        user_end = len(conversation.tokens)
        conversation.tokens.extend(turn.result.token_ids)
        record = Turn(dropped=turn.dropped, start=history_start, user_end=user_end,
                      end=len(conversation.tokens))
        apply_turn(conversation, record, self.block_size)
        saving = StepPlan(saves=tuple(self.blocks.publish(turn.lease,
                                                          context_keys(conversation))))
        copies = self._queue_saves(saving)
        if turn.ephemeral:
            self.sessions.forget(turn.session_id)
        answered()
        if saving.saves:
            self._execute(saving, copies)
        if turn.ephemeral:
            return resolved(True)
        return self.store.append_record(turn.session_id,
                                        turn_entry(conversation, record, first_token, root))

    def abort(self, turn: ActiveTurn) -> None:
        """Frees a turn that will not complete; the history stays as it was."""
        self._busy.pop(turn.session_id, None)
        self.blocks.release(turn.lease)
        if turn.ephemeral or not turn.conversation.tokens:
            self.sessions.forget(turn.session_id)

    # ----- context --------------------------------------------------------------------

    def _context(self, conversation, kept, dropped, turn_tokens, fetch_remote: bool,
                 remote_read: RemoteRead | None) -> "_Context":
        """The lease on the turn's reused context blocks and what is left to prefill.

        Matches the context's keys in order — the kept blocks', then those of the
        leading full blocks of `turn_tokens` (chained after the truncation, if any) —
        up to the first no tier holds (the device tier alone while the steps that take
        the store's loads are not compiled yet). A missing kept block is recomputed: with the rest
        of the history by prefill if the kept blocks are the history's leading blocks,
        else from the history following the turn log (`_recompute`)."""
        block_size = self.block_size
        context_key = (truncated_key(conversation.context_key, dropped) if dropped
                       else conversation.context_key)
        kept_keys = [conversation.keys[serial] for serial, _, _ in kept]
        ahead = chained_keys(context_key, turn_tokens[:len(turn_tokens) - 1], block_size)
        lease = self.blocks.match(kept_keys + ahead, remote_read=remote_read,
                                  fetch_remote=fetch_remote,
                                  from_store=self.runner.arrivals_ready)
        if lease.remote is not None:
            self.blocks.release(lease)
            raise RemoteFetch(lease.remote.ready, {"fetch_remote": False,
                                                   "remote_read": lease.remote})
        matched = len(lease.table)
        if matched >= len(kept):
            return _Context(lease, prefix=matched * block_size,
                            turn_tokens=turn_tokens[(matched - len(kept)) * block_size:])
        if is_history_prefix(kept, block_size):
            start = matched * block_size
            return _Context(lease, prefix=start, turn_tokens=(
                conversation.tokens[start:conversation.tail_start] + turn_tokens))
        self.blocks.release(lease)
        lease, history_tokens = self._recompute(conversation, kept)
        return _Context(lease, prefix=len(kept) * block_size, turn_tokens=turn_tokens,
                        history_tokens=history_tokens)

    def _recompute(self, conversation, kept) -> tuple[BlockLease, int]:
        """Recomputes the KV of context blocks `kept` (of a truncated conversation) by
        prefill from the history, following the turn log's truncations: the tokens of the
        turns between two truncations are prefilled at once after the blocks then in the
        context, and each truncation drops its blocks, so every kept block attends to what
        it attended to when first computed (its KV equals the lost one's within float
        rounding). Returns a lease on the kept blocks and the tokens prefilled. On any
        error (the pool running out) every block it took is freed."""
        block_size = self.block_size
        rebuilt = Conversation(tokens=conversation.tokens, context_key=conversation.context_key)
        placed: dict[int, int] = {}  # serial -> pool block
        prefilled = 0
        owned: set[int] = set()  # every block taken and not yet freed or handed over

        def give_back(ids):
            ids = list(ids)
            self.blocks.free(ids)
            owned.difference_update(ids)

        try:
            for segment in _truncation_segments(conversation.turns):
                dropped = set(segment[0].dropped)
                give_back(placed.pop(serial) for serial in dropped)
                context = [placed[serial] for serial in rebuilt.serials()
                           if serial not in dropped]
                start, end = segment[0].start, segment[-1].computed_end
                fresh = self.blocks.allocate(blocks_for(end - start, block_size))
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
            self.blocks.free(owned)
            raise
        return self.blocks.lease_of([placed[serial] for serial, _, _ in kept]), prefilled


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
    """What `ChatEngine._context` finds: the `lease` on the reused context blocks (the
    kept ones first), the `prefix` tokens reused, the `turn_tokens` left to prefill, and
    the `history_tokens` prefilled to recompute a truncated context."""

    lease: BlockLease
    prefix: int
    turn_tokens: list[int]
    history_tokens: int = 0
