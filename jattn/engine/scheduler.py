"""The serving engine: a bounded queue of turns, run with continuous batching.

One thread owns the model. Each step it admits waiting turns while the batch has room
(a turn whose session already has one in flight waits its turn; a turn that does not
fit the block pool waits for blocks), then runs one packed model step: the next token of
every turn past its prefill, and prompt chunks of up to `max_prefill_seqs` turns still
prefilling, oldest first, filling the step's token budget — so many turns that arrive
together prefill together, and a long prompt is spread over many steps and never stalls
the batch. Steps overlap the host's work: each step is dispatched before the tokens of
the step before it reach the host (the next tokens stay on the device as its inputs), so
the device runs step N+1 while the host delivers step N's tokens; a turn that ended at
step N costs one wasted row in step N+1. A turn whose context arrives from host memory
or disk first runs its opening tokens layer by layer, alone, while the blocks come. A
turn reuses its session's KV through the `ChatEngine` and the AttentionStore; the
queue's next sessions go to `AttentionStore.hint`, which prefetches them from disk and
keeps them from eviction. Tokens reach each `TurnStream` as they are taken; a cancelled
turn frees its blocks at the next step.

No request can stop the engine: an error while running one turn fails that turn (its
blocks freed), an error in a step shared by several turns fails those turns, and the
loop goes on. Should the thread itself ever end unexpectedly, every waiting and running
turn and every pending call fails with `EngineStopped`, later calls fail at once with
it, `is_live()` turns False and `on_failure` is told (the server's health goes
NOT_SERVING).
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from jattn.conversation import Conversation
from jattn.engine.turns import ActiveTurn, BlockCensus, ChatEngine, OneOff, RemoteFetch
from jattn.store.remote_read import RemoteBlockLost
from jattn.block_allocator import PoolExhausted
from jattn.generation import TokenLogprob
from jattn.model.step_plan import StepOutput
from jattn.sampling import token_logprobs
from jattn.defaults import MAX_RUNNING
from jattn.engine.errors import (
    EngineStopped,
    InvalidRequest,
    PromptTooLong,
    QueueFull,
    RecordUnavailable,
    SessionLost,
    SessionNotFound,
    TooManySessions,
)
from jattn.engine.session_table import SessionTable
from jattn.engine.requests import (
    INPUT_KINDS,
    TurnRequest,
    TurnStream,
    check_session_id,
    check_stop_strings,
    check_token_ids,
    check_unicode,
    message_texts,
    require_tokenizer,
)

log = logging.getLogger("jattn.engine")

EXPIRY_POLL_S = 0.05  # the engine's idle wait between looks for expired sessions
RECENT_TURNS = 1000  # the turns whose time to first token `stats` summarises


@dataclass(frozen=True)
class EngineLimits:
    """Limits of an engine: `max_queue` turns waiting, `max_running` turns in the batch,
    `max_prefill_seqs` turns prefilled in one step, `max_prompt_tokens` new tokens per
    turn, `max_tokens` per answer, `max_sessions` conversations known at once, of which
    `max_sessions_per_tenant` of one tenant's; a session idle for `session_idle_s`
    seconds is ended (0: never)."""

    max_queue: int = 256
    max_running: int = MAX_RUNNING
    max_prefill_seqs: int = MAX_RUNNING
    max_prompt_tokens: int = 8192
    max_tokens: int = 2048
    max_sessions: int = 100_000
    max_sessions_per_tenant: int = 100_000
    session_idle_s: float = 0.0

    def __post_init__(self):
        for name, value in vars(self).items():
            if name == "session_idle_s":
                if isinstance(value, bool) or not isinstance(value, (int, float)) \
                        or not value >= 0:
                    raise ValueError(f"{name} must be a number >= 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass
class _InFlight:
    """A model step dispatched and not yet taken: its output, for each token it draws,
    the turn's stream, the turn, and the token's row, and for the rows whose turns
    asked for log-probabilities, `token_logprobs` of them (on the device), in order."""

    output: StepOutput
    drawn: list[tuple[TurnStream, ActiveTurn, int]]
    logprob_rows: list[int] = field(default_factory=list)
    logprobs: tuple | None = None

    def token_logprobs(self) -> dict[int, TokenLogprob]:
        """Row -> the `TokenLogprob` of its drawn token (waiting for the step), with as
        many alternatives as its turn asked for."""
        if self.logprobs is None:
            return {}
        drawn, ids, top = (np.asarray(a) for a in self.logprobs)
        wanted = {row: turn.continuation.params.logprobs for _, turn, row in self.drawn}
        return {row: TokenLogprob(float(drawn[i]), tuple(zip(
                    ids[i, :wanted[row]].tolist(), top[i, :wanted[row]].tolist())))
                for i, row in enumerate(self.logprob_rows)}


class Engine:
    """Runs the turns of many conversations over one `ChatEngine` at once, on a thread
    of its own that owns the model from now on (`LLM.start_engine` makes one; the
    library and the server both run their turns here). `warm_up` makes every shape ready
    (the first before it returns, the rest in the background: `ChatEngine.warm_up`), so
    no request waits for a compilation. `on_failure(error)` is called (on the
    engine's thread) if that thread ever stops unexpectedly. `overlap` False takes each
    step's tokens before the next step is planned (the device waits for the host)."""

    def __init__(self, chats: ChatEngine, limits: EngineLimits = EngineLimits(), *,
                 warm_up: bool = False, on_failure=None, overlap: bool = True):
        if limits.max_running > chats.max_turns_per_step:
            raise ValueError(f"max_running ({limits.max_running}) is more than the "
                             f"{chats.max_turns_per_step} turns a model step runs")
        if warm_up:
            chats.warm_up()
        self.chats = chats
        self.overlap = overlap
        self._in_flight: _InFlight | None = None
        self._loaded: _InFlight | None = None  # this step's loading step, until taken
        self.limits = limits
        self._condition = threading.Condition()
        self._waiting: collections.deque[TurnStream] = collections.deque()
        self._cancelled: list[TurnStream] = []
        self._calls: list[tuple] = []
        self._active: dict[TurnStream, ActiveTurn] = {}
        # Waiting turns that tried to begin before: what they wait for (the remote tier's
        # answer), when they first tried (their TTFT counts from then), and the keyword
        # arguments of their next attempt.
        self._fetching: dict[TurnStream, tuple[concurrent.futures.Future, float, dict]] = {}
        self._accepting = True
        self._cancel_all = False
        self._hinted: list[bytes] = []  # the upcoming block keys last passed to the store
        self._queued_before_admission: set[TurnStream] = set()  # see `_hint`
        # New conversations' prompt keys, computed once per waiting turn.
        self._prompt_keys: weakref.WeakKeyDictionary[TurnStream, list[bytes]] = \
            weakref.WeakKeyDictionary()
        self._stopped = False
        self._failure: BaseException | None = None
        self._on_failure = on_failure
        self._one_off = itertools.count()
        self._sessions = SessionTable(per_tenant=limits.max_sessions_per_tenant,
                                      idle_s=limits.session_idle_s)
        # Ends expired sessions' records (a call to Redis or the disk: not on this thread).
        self._expiry = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jattn-expire")
        self._next_expiry_check = 0.0
        self.counters = collections.Counter()
        self._recent_ttfts: collections.deque[float] = collections.deque(maxlen=RECENT_TURNS)
        self._thread = threading.Thread(target=self._run, name="jattn-engine", daemon=True)
        self._thread.start()

    # ----- the clients' side ---------------------------------------------------------------

    def submit(self, request: TurnRequest) -> TurnStream:
        """Queues a turn. Raises InvalidRequest for a request that can never run (naming
        what is wrong), QueueFull, or EngineStopped; the stream fails with
        TooManySessions if the turn would open a session past the limit when it begins."""
        self._validate(request)
        stream = TurnStream(request, self._cancel)
        with self._condition:
            if not self._accepting:
                raise self._stopped_error()
            if len(self._waiting) >= self.limits.max_queue:
                self.counters["rejected_queue_full"] += 1
                raise QueueFull(f"the queue holds {self.limits.max_queue} turns already")
            self._waiting.append(stream)
            self.counters["requests"] += 1
            self._condition.notify()
        return stream

    def _validate(self, request: TurnRequest) -> None:
        """Raises InvalidRequest, naming what is wrong, for a request that can never
        run."""
        if request.session_id is not None:
            check_session_id(request.session_id)
        check_stop_strings(request.params.stop)
        if request.kind not in INPUT_KINDS:
            raise InvalidRequest(f"input kind must be one of {INPUT_KINDS}, got "
                                 f"{request.kind!r}")
        if request.kind == "tokens":
            ids = request.value
            check_token_ids(ids, self.chats.vocab_size)
            if not ids:
                raise InvalidRequest("tokens is empty")
            if len(ids) > self.limits.max_prompt_tokens:
                raise PromptTooLong(f"{len(ids)} tokens is more than the limit of "
                                    f"{self.limits.max_prompt_tokens} per turn")
        else:
            texts = (message_texts(request.value) if request.kind == "messages"
                     else [request.value])
            if not all(isinstance(text, str) for text in texts):
                raise InvalidRequest(f"{request.kind} must be a string")
            for i, text in enumerate(texts):
                check_unicode(text, f"messages[{i}] content" if request.kind == "messages"
                              else request.kind)
            require_tokenizer(self.chats.tokenizer)
            size = sum(len(text) for text in texts)  # characters bound tokens from above
            if size > 8 * self.limits.max_prompt_tokens:
                raise PromptTooLong(f"{request.kind} of {size} characters is longer than the "
                                    f"limit of {self.limits.max_prompt_tokens} tokens allows")
            if not any(text.strip() for text in texts):
                raise InvalidRequest(f"{request.kind} is empty")
        if request.params.max_tokens > self.limits.max_tokens:
            raise InvalidRequest(f"max_tokens {request.params.max_tokens} is more than the "
                                 f"limit of {self.limits.max_tokens}")

    def _cancel(self, stream: TurnStream) -> None:
        with self._condition:
            if stream in self._waiting:
                self._waiting.remove(stream)
                self._fetching.pop(stream, None)
                self.counters["cancelled"] += 1
                stream.close()
            else:
                self._cancelled.append(stream)
            self._condition.notify()

    def _call(self, function, *args):
        """Runs `function(*args)` on the engine's thread (which owns the model) and
        returns its result or raises its error."""
        done = threading.Event()
        outcome = {}
        with self._condition:
            if self._stopped:
                raise self._stopped_error()
            self._calls.append((function, args, done, outcome))
            self._condition.notify()
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _stopped_error(self) -> EngineStopped:
        if self._failure is not None:
            return EngineStopped(f"the engine has stopped after an internal error "
                                 f"({type(self._failure).__name__})")
        return EngineStopped("the engine is shutting down")

    def end_session(self, session_id: str) -> None:
        """Forgets a session everywhere (a lost one too); SessionNotFound if it is
        unknown; InvalidRequest if a turn of it is in flight. A store shared by replicas
        is called on the caller's thread, never the engine's."""
        check_session_id(session_id)
        try:
            self.chats.check_record(session_id)
            lost = False
        except SessionLost:
            lost = True  # known, though perhaps not here: ending it is what it needs
        self._call(self._end_session, session_id, lost)
        self.chats.drop_record(session_id)

    def describe(self, session_id: str) -> dict:
        """A session's turns, history and context tokens, and where its blocks are;
        SessionLost / RecordUnavailable as a turn of it would get them."""
        check_session_id(session_id)
        self.chats.check_record(session_id)
        return self._call(self._describe, session_id)

    def conversation(self, session_id) -> Conversation | None:
        """A copy of a session's conversation (history, context blocks and their keys,
        turn log), or None if the session is unknown."""
        if isinstance(session_id, str):
            self.chats.check_record(session_id)
        return self._call(self._conversation, session_id)

    def hint(self, upcoming_session_ids) -> None:
        """Sessions whose turns come next, most imminent first: their context blocks are
        kept longest in every tier and prefetched (see `ChatEngine.hint`)."""
        self._call(lambda ids: self.chats.hint(self.chats.session_keys(ids)),
                   list(upcoming_session_ids))

    def block_census(self) -> BlockCensus:
        """Where every block of the device pool is now (free, resident, in flight)."""
        return self._call(self.chats.block_census)

    def is_live(self) -> bool:
        """True while the engine's thread runs and accepts turns."""
        return self._accepting and self._thread.is_alive() and self._failure is None

    def token_text(self, token_id: int) -> str:
        """One token's text, decoded alone by the model's tokenizer (InvalidRequest
        without one)."""
        require_tokenizer(self.chats.tokenizer)
        return self.chats.tokenizer.decode([token_id])

    def stats(self) -> dict:
        """Requests, queue and batch sizes, sessions, the median and 99th percentile
        time to first token (seconds) of the last `RECENT_TURNS` turns completed
        (`ttft_turns` of them; 0.0 before any), and the store's counters."""
        with self._condition:
            stats = dict(self.counters, queued=len(self._waiting), running=len(self._active),
                         sessions=self.chats.session_count())
            ttfts = np.array(self._recent_ttfts)
        stats.update(ttft_turns=len(ttfts),
                     ttft_p50_s=float(np.quantile(ttfts, 0.5)) if len(ttfts) else 0.0,
                     ttft_p99_s=float(np.quantile(ttfts, 0.99)) if len(ttfts) else 0.0)
        stats["store"] = self.chats.store_stats()
        return stats

    def shutdown(self, *, grace: float | None = None) -> None:
        """Stops accepting turns; those queued and running get `grace` seconds to finish
        (None: as long as they need), then are cancelled; flushes the store. Returns
        when the engine's thread has ended."""
        with self._condition:
            self._accepting = False
            self._condition.notify()
        self._thread.join(grace)
        if self._thread.is_alive():
            with self._condition:
                self._cancel_all = True
                self._condition.notify()
            self._thread.join()
        self.chats.close()

    # ----- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as error:
            self._fail_engine(error)
        finally:
            self._expiry.shutdown(wait=True)  # records of expired sessions: dropped

    def _step(self) -> bool:
        """One step: pending calls, cancellations, admission, hints, a loading turn's
        first step, one packed model step dispatched, the one before it taken. False
        once the engine has stopped."""
        with self._condition:
            while not (self._admissible() or self._active or self._calls or self._cancelled
                       or self._in_flight or not self._accepting or self._expiry_due()):
                until = self._sessions.next_expiry(time.monotonic())
                self._condition.wait(None if until is None else max(until, EXPIRY_POLL_S))
            if not self._accepting and not (self._waiting or self._active or self._calls
                                            or self._in_flight):
                self._stopped = True
                return False
            calls, self._calls = self._calls, []
            cancelled, self._cancelled = self._cancelled, []
            if self._cancel_all:
                while self._waiting:
                    self._waiting.popleft().close()
                cancelled += list(self._active)
        for stream in cancelled:  # first, so that a call sees their blocks freed
            self._stop_turn(stream)
        if self._expiry_due():
            self._expire_idle()
        for function, args, done, outcome in calls:
            try:
                outcome["value"] = function(*args)
            except Exception as error:  # handed to the caller
                outcome["error"] = error
            done.set()
        for phase in (self._admit, self._hint, self._loading_step, self._model_step):
            try:
                phase()
            except Exception as error:
                log.exception("engine %s failed: failing the turns it held", phase.__name__)
                for stream in list(self._active):
                    self._fail_turn(stream, error)
        return True

    def _expiry_due(self) -> bool:
        until = self._sessions.next_expiry(time.monotonic())
        return until is not None and until <= 0 and time.monotonic() >= self._next_expiry_check

    def _expire_idle(self) -> None:
        """Ends the sessions idle for `session_idle_s` (no turn of theirs waiting or
        running): forgotten here, their records dropped on the expiry thread."""
        now = time.monotonic()
        self._next_expiry_check = now + EXPIRY_POLL_S
        with self._condition:
            in_use = {stream.request.session_id for stream in self._waiting}
        in_use |= {turn.session_id for turn in self._active.values()}
        for session in self._sessions.expired(now, in_use):
            self.chats.forget(session)
            self._expiry.submit(self._drop_expired, session)

    def _drop_expired(self, session: str) -> None:
        """On the expiry thread: drops an expired session's record, then counts it."""
        self.chats.drop_record(session)
        with self._condition:
            self.counters["expired_sessions"] += 1

    def _admissible(self) -> bool:
        """Under the condition: whether a waiting turn is not held up by its fetch."""
        return any(stream not in self._fetching or self._fetching[stream][0].done()
                   for stream in self._waiting)

    def _fail_engine(self, error: BaseException) -> None:
        """The thread is ending unexpectedly: fail everything it held or would have run."""
        log.critical("the engine's thread stopped: %r; failing every turn and call",
                     error, exc_info=error)
        with self._condition:
            self._failure = error
            self._accepting = False
            self._stopped = True
            streams = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
            calls, self._calls = self._calls, []
        stopped = self._stopped_error()
        for stream in streams:
            stream.fail(stopped)
        for _, _, done, outcome in calls:
            outcome["error"] = stopped
            done.set()
        if self._on_failure is not None:
            self._on_failure(error)

    def _next_admissible(self) -> TurnStream | None:
        """Under the condition: the first waiting turn that can begin now: not held up by
        its fetch, and of a session with no turn running or ahead of it in the queue."""
        held: set[str] = set()
        for stream in self._waiting:
            session = stream.request.session_id
            fetching = stream in self._fetching and not self._fetching[stream][0].done()
            if session is not None and (session in held or self.chats.is_busy(session)):
                continue
            if fetching:
                if session is not None:
                    held.add(session)
                continue
            return stream
        return None

    def _admit(self) -> None:
        with self._condition:
            self._queued_before_admission = set(self._waiting)
        while len(self._active) < self.limits.max_running:
            with self._condition:
                stream = self._next_admissible()
                if stream is None:
                    return
                self._waiting.remove(stream)
                fetched = self._fetching.pop(stream, None)
            _, started, resume = fetched or (None, time.perf_counter(), {})
            try:
                turn = self._begin(stream.request, started, resume)
            except RemoteFetch as pending:
                with self._condition:
                    self._waiting.appendleft(stream)
                    self._fetching[stream] = (pending.future, started,
                                              {**resume, **pending.resume})
                pending.future.add_done_callback(self._wake)
                continue
            except PoolExhausted as error:
                if self._active:  # blocks come back as running turns end
                    with self._condition:
                        self._waiting.appendleft(stream)
                        if fetched:  # already fetched: not again
                            self._fetching[stream] = fetched
                    return
                stream.fail(PromptTooLong(f"the turn does not fit the KV block pool: {error}"))
                continue
            except InvalidRequest as error:
                self.counters["invalid"] += 1
                stream.fail(error)
                continue
            except TooManySessions as error:
                self.counters["rejected_too_many_sessions"] += 1
                stream.fail(error)
                continue
            except (SessionLost, RecordUnavailable) as error:
                self.counters["refused_session_record"] += 1
                stream.fail(error)
                continue
            except Exception as error:
                log.exception("a turn failed to start")
                self.counters["failed"] += 1
                stream.fail(error)
                continue
            except BaseException:  # the thread ends: back in the queue, the turn fails with it
                with self._condition:
                    self._waiting.appendleft(stream)
                raise
            self._active[stream] = turn
            stream.start(turn.result)

    def _wake(self, _future) -> None:
        with self._condition:
            self._condition.notify()

    def _begin(self, request: TurnRequest, started: float, resume: dict) -> ActiveTurn:
        """Begins the turn of `request` (received at `started`); `resume`: the keyword
        arguments that its earlier attempts' `RemoteFetch`es asked for. TooManySessions
        if it would open a session past `max_sessions`."""
        session = request.session_id
        ephemeral = session is None
        if ephemeral:
            session = OneOff(next(self._one_off))
        elif not self.chats.has_session(session):
            if self.chats.session_count() >= self.limits.max_sessions:
                raise TooManySessions(f"{self.limits.max_sessions} sessions are open")
            self._sessions.admit(session, request.tenant, self.chats.has_session)
        turn = self.chats.begin(session, request.value if request.kind != "tokens"
                                else list(request.value), request.params,
                                ignore_eos=request.ignore_eos, start_time=started,
                                ephemeral=ephemeral, scope=request.cache_scope,
                                kind=request.kind,
                                max_new_tokens=self.limits.max_prompt_tokens, **resume)
        if not ephemeral:
            self._sessions.touch(session, request.tenant)
        return turn

    def _hint(self) -> None:
        """Hints the store with the blocks the first `lookahead` turns left waiting by
        this step's admission look up first, so that what they reuse is read from disk
        or Redis into host memory while they wait: a known session's context, or a new
        conversation's prompt (computed once per turn). A turn that arrived after the
        admission began (the next step may admit it) or whose remote fetch is under way
        is left out: its own load reads its blocks."""
        with self._condition:
            upcoming = list(itertools.islice(
                (stream for stream in self._waiting if stream in self._queued_before_admission
                 and stream not in self._fetching), self.chats.lookahead))
        keys = []
        for stream in upcoming:
            request = stream.request
            if self.chats.has_session(request.session_id):
                keys += self.chats.session_keys([request.session_id])
            else:
                if stream not in self._prompt_keys:
                    self._prompt_keys[stream] = self.chats.prompt_keys(
                        request.value, request.kind, request.cache_scope)
                keys += self._prompt_keys[stream]
        if keys != self._hinted:
            self._hinted = keys
            self.chats.hint(keys)

    def _loading_step(self) -> None:
        """The opening tokens of the oldest turn whose blocks arrive from the store, run
        layer by layer while they come. Its first token is taken once the packed step
        after it is dispatched (which the turn sits out: a packed step feeds only on
        the tokens of the packed step before it), so the device goes on to that step
        while the host waits."""
        stream = next((s for s, t in self._active.items() if t.loading), None)
        if stream is None:
            return
        turn = self._active[stream]
        try:
            plan = self.chats.plan_arrival(turn)
            output = self.chats.run(plan)
        except RemoteBlockLost as lost:
            log.warning("restarting a turn without the remote tier: %s", lost)
            self._restart(stream, {"fetch_remote": False})
            return
        except Exception as error:
            log.exception("a loading step failed")
            self._fail_turn(stream, error)
            return
        if plan.sampled[0]:
            self._loaded = _InFlight(output, [(stream, turn, 0)])

    def _restart(self, stream: TurnStream, resume: dict) -> None:
        """Frees a turn that has produced nothing yet and queues it to begin again, first,
        with `resume` (its arrival time kept)."""
        turn = self._active.pop(stream)
        self._free(turn)
        self.counters["restarted"] += 1
        ready = concurrent.futures.Future()
        ready.set_result(None)
        with self._condition:
            self._waiting.appendleft(stream)
            self._fetching[stream] = (ready, turn.continuation.start_time, resume)

    def _model_step(self) -> None:
        """Dispatches one packed step, then takes the steps dispatched before it (the
        previous packed step, then this step's loading step), or, without `overlap`,
        this one too."""
        previous, self._in_flight = self._in_flight, None
        loaded, self._loaded = self._loaded, None
        try:
            self._in_flight = self._dispatch(previous, loaded)
        finally:
            for step in (previous, loaded):
                if step is not None:
                    self._take(step)
        if not self.overlap and self._in_flight is not None:
            current, self._in_flight = self._in_flight, None
            self._take(current)

    def _dispatch(self, previous: _InFlight | None,
                  loaded: _InFlight | None) -> _InFlight | None:
        """Plans and dispatches one packed step: the next token of every decoding turn
        (fed from `previous`'s tokens on the device while pending), and prompt chunks
        of the oldest prefilling turns (at most `max_prefill_seqs`) within the token
        budget; not the turn whose token `loaded` (a loading step) has yet to give.
        None if no turn has work."""
        awaited = {stream for stream, _, _ in loaded.drawn} if loaded else set()
        decoding = [(s, t) for s, t in self._active.items()
                    if t.decoding and s not in awaited]
        budget = self.chats.step_tokens - len(decoding)
        prefilling = []
        for stream, turn in self._active.items():
            if budget < 1 or len(prefilling) >= self.limits.max_prefill_seqs:
                break
            if turn.prefilling and not turn.loading:
                count = min(len(turn.turn_tokens) - turn.prefilled, budget)
                prefilling.append((stream, turn, count))
                budget -= count
        if not decoding and not prefilling:
            return None
        members = decoding + [(s, t) for s, t, _ in prefilling]
        self.counters["model_steps"] += 1
        if prefilling:
            self.counters["prefill_steps"] += 1
            self.counters["prefill_chunks"] += len(prefilling)
        plan = self.chats.plan_step([t for _, t in decoding],
                                    [(t, count) for _, t, count in prefilling],
                                    fed_tokens=previous.output.tokens if previous else None)
        try:
            output = self.chats.run(plan)
        except Exception as error:
            log.exception("a model step of %d turns failed", len(members))
            for stream, _ in members:
                self._fail_turn(stream, error)
            return None
        drawn = [(stream, turn, row) for row, ((stream, turn), sampled)
                 in enumerate(zip(members, plan.sampled)) if sampled]
        step = _InFlight(output, drawn)
        step.logprob_rows = [row for _, turn, row in drawn
                             if turn.continuation.params.logprobs is not None]
        if step.logprob_rows:  # (rows padded to one length: one compilation per step shape)
            rows = np.zeros(self.limits.max_running, np.int32)
            rows[:len(step.logprob_rows)] = step.logprob_rows
            step.logprobs = token_logprobs(output.logits, rows, output.tokens)
        return step

    def _take(self, step: _InFlight) -> None:
        """Reads a step's tokens to the host (waiting for it) and delivers each to its
        turn, unless the turn has ended since the step was planned."""
        try:
            tokens = np.asarray(step.output.tokens)
            logprobs = step.token_logprobs()
        except Exception as error:
            log.exception("a model step of %d turns failed", len(step.drawn))
            for stream, turn, _ in step.drawn:
                if self._active.get(stream) is turn:
                    self._fail_turn(stream, error)
            return
        for stream, turn, row in step.drawn:
            turn.pending -= 1
            if self._active.get(stream) is not turn or turn.continuation.finished:
                continue
            try:
                self._deliver(stream, turn, int(tokens[row]), logprobs.get(row))
            except Exception as error:
                log.exception("delivering a token failed")
                self._fail_turn(stream, error)

    def _deliver(self, stream: TurnStream, turn: ActiveTurn, token: int,
                 logprob: TokenLogprob | None = None) -> None:
        streamed = turn.continuation.take(token, logprob)
        if streamed is not None:
            stream.push(streamed)
            self.counters["tokens_generated"] += 1
        if turn.continuation.finished:
            if not turn.ephemeral:
                self._sessions.touch(turn.session_id, stream.request.tenant)
            durable = self.chats.complete(turn, lambda: self._completed(stream, turn))
            if not turn.ephemeral:  # its stream ends (the acknowledgement) once durable
                durable.add_done_callback(
                    lambda done: self._acknowledge(stream, turn, done))

    def _completed(self, stream: TurnStream, turn: ActiveTurn) -> None:
        """A turn is whole (its blocks published, their saves queued): counted, and a
        one-off turn's stream ended (nothing of it need be durable)."""
        del self._active[stream]
        self.counters["completed"] += 1
        with self._condition:  # (`stats` reads it)
            self._recent_ttfts.append(turn.result.ttft_s)
        self.counters["tokens_reused"] += turn.result.cached_tokens
        self.counters["tokens_prefilled"] += turn.result.recomputed_tokens
        if turn.ephemeral:
            stream.close()

    def _acknowledge(self, stream: TurnStream, turn: ActiveTurn,
                     durable: concurrent.futures.Future) -> None:
        """Ends a session turn's stream once its record is as durable as the store
        makes it, saying on its result whether it got there (on the store's thread)."""
        turn.result.durable = durable.exception() is None and bool(durable.result())
        if not turn.result.durable:
            with self._condition:
                self.counters["not_durable_turns"] += 1
        stream.close()

    def _stop_turn(self, stream: TurnStream) -> None:
        turn = self._active.pop(stream, None)
        if turn is None:
            return
        turn.continuation.finish("cancelled")
        self.counters["cancelled"] += 1
        stream.close()
        self._free(turn)

    def _free(self, turn: ActiveTurn) -> None:
        """Frees the blocks of a turn that will not complete (a failure to do so is
        logged: the block census then shows the leak)."""
        try:
            self.chats.abort(turn)
        except Exception:
            log.exception("freeing the blocks of a turn failed")

    def _fail_turn(self, stream: TurnStream, error: Exception) -> None:
        turn = self._active.pop(stream, None)
        self.counters["failed"] += 1
        stream.fail(error)
        if turn is not None:
            self._free(turn)

    def _end_session(self, session_id: str, lost: bool) -> None:
        if self.chats.is_busy(session_id):
            raise InvalidRequest(f"session {session_id!r} has a turn in flight")
        if not lost and not self.chats.known(session_id, check_remote=False):
            raise SessionNotFound(session_id)
        self.chats.forget(session_id)
        self._sessions.close(session_id)

    def _conversation(self, session_id) -> Conversation | None:
        if not self.chats.known(session_id, check_remote=False):
            return None
        return copy.deepcopy(self.chats.conversation(session_id, check_remote=False))

    def _describe(self, session_id: str) -> dict:
        if not self.chats.known(session_id, check_remote=False):
            raise SessionNotFound(session_id)
        return self.chats.describe(session_id)
