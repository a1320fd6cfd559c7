"""`jattn.v1.Conversations`: multi-turn chat whose KV the server keeps between turns; a
thin gRPC adapter over `serve.service.Service`."""

from __future__ import annotations

import time

import grpc

from jattn.engine import InvalidRequest, SessionNotFound
from serve.errors import abort
from serve.metrics import Metrics
from serve.protos import jattn_pb2, jattn_pb2_grpc
from serve.service import Service, TurnFacts
from serve.turns import caller_of, run_turn, sampling


def facts(result) -> jattn_pb2.TurnFacts:
    turn = TurnFacts.of(result)
    return jattn_pb2.TurnFacts(
        ttft_s=turn.ttft_s, cached_tokens=turn.cached_tokens,
        recomputed_tokens=turn.recomputed_tokens, tier_blocks=turn.tier_blocks,
        input_tokens=turn.input_tokens, dropped_tokens=turn.dropped_tokens)


class ConversationsServicer(jattn_pb2_grpc.ConversationsServicer):
    def __init__(self, service: Service, metrics: Metrics):
        self.service = service
        self.metrics = metrics
        self.started = time.time()

    def _session(self, request, context) -> str:
        if not request.session_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        return request.session_id

    def Chat(self, request, context):
        caller = caller_of(self.service, context)
        kind = request.WhichOneof("input")

        def start():
            if kind is None:
                raise InvalidRequest("no input: set one of message, text, token_ids")
            value = (tuple(request.token_ids.ids) if kind == "token_ids"
                     else getattr(request, kind))
            return self.service.start_turn(
                caller, session_id=request.session_id or None,
                kind="tokens" if kind == "token_ids" else kind, value=value,
                params=sampling(self.service, request), ignore_eos=request.ignore_eos,
                cache_salt=request.cache_salt)

        first = True
        for stream, tokens in run_turn(self.metrics, "Chat", context, start,
                                       interval_s=self.service.stream_interval_s):
            if tokens is not None:
                event = jattn_pb2.ChatEvent(token_ids=[token.id for token in tokens],
                                            text="".join(token.text for token in tokens),
                                            logprobs=[_logprobs(token) for token in tokens
                                                      if token.logprob is not None])
            elif stream.result is None:  # cancelled while it waited in the queue
                event = jattn_pb2.ChatEvent(finish_reason="cancelled")
                first = False
            else:
                event = jattn_pb2.ChatEvent(finish_reason=stream.result.finish_reason,
                                            not_durable=stream.result.durable is False)
            if first:
                event.facts.CopyFrom(facts(stream.result))
                first = False
            yield event

    def EndSession(self, request, context):
        caller = caller_of(self.service, context)
        session = self._session(request, context)
        try:
            self.service.end_session(caller, session)
        except SessionNotFound:
            return jattn_pb2.EndSessionResponse(existed=False)
        except Exception as error:
            abort(context, error)
        return jattn_pb2.EndSessionResponse(existed=True)

    def DescribeSession(self, request, context):
        caller = caller_of(self.service, context)
        session = self._session(request, context)
        try:
            info = self.service.describe(caller, session)
        except Exception as error:
            abort(context, error)
        return jattn_pb2.SessionInfo(
            session_id=request.session_id, turns=info["turns"],
            context_tokens=info["context_tokens"], history_tokens=info["history_tokens"],
            dropped_tokens=info["dropped_tokens"],
            resident_blocks_by_tier=info["resident_blocks"])

    def ServerStats(self, request, context):
        stats = self.service.stats()
        store = {k: float(v) for k, v in stats.get("store", {}).items()}
        return jattn_pb2.ServerStatsResponse(
            requests=stats.get("requests", 0), active_sessions=stats["sessions"],
            queued=stats["queued"], running=stats["running"], store=store,
            uptime_s=time.time() - self.started,
            generated_tokens=stats.get("tokens_generated", 0),
            prefilled_tokens=stats.get("tokens_prefilled", 0),
            reused_tokens=stats.get("tokens_reused", 0), ttft_p50_s=stats["ttft_p50_s"],
            ttft_p99_s=stats["ttft_p99_s"], ttft_turns=stats["ttft_turns"])


def _logprobs(token) -> jattn_pb2.TokenLogprobs:
    """A `StreamedToken`'s log-probabilities as the API carries them."""
    return jattn_pb2.TokenLogprobs(logprob=token.logprob.logprob,
                                   top_token_ids=[other for other, _ in token.logprob.top],
                                   top_logprobs=[value for _, value in token.logprob.top])
