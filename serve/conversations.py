"""`jattn.v1.Conversations`: multi-turn chat whose KV the server keeps between turns."""

from __future__ import annotations

import time

import grpc

from jattn.engine import Engine, SessionNotFound, TurnRequest
from serve.auth import Tenants, cache_scope, scoped
from serve.errors import abort
from serve.protos import jattn_pb2, jattn_pb2_grpc
from serve.metrics import Metrics
from serve.turns import run_turn, sampling


def facts(result) -> jattn_pb2.TurnFacts:
    return jattn_pb2.TurnFacts(
        ttft_s=result.ttft_s, cached_tokens=result.cached_tokens,
        recomputed_tokens=result.recomputed_tokens, tier_blocks=result.tiers or {},
        input_tokens=len(result.prompt_token_ids), dropped_tokens=result.dropped_tokens)


class ConversationsServicer(jattn_pb2_grpc.ConversationsServicer):
    def __init__(self, engine: Engine, tenants: Tenants, *, default_max_tokens: int,
                 metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self.tenants = tenants
        self.default_max_tokens = default_max_tokens
        self.started = time.time()

    def _session(self, request, context) -> str:
        namespace = self.tenants.namespace(context)
        if not request.session_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id is empty")
        return scoped(namespace, request.session_id)

    def Chat(self, request, context):
        namespace = self.tenants.namespace(context)
        session = self._session(request, context) if request.session_id else None
        kind = request.WhichOneof("input")

        def build():
            if kind is None:
                raise ValueError("no input: set one of message, text, token_ids")
            value = (tuple(request.token_ids.ids) if kind == "token_ids"
                     else getattr(request, kind))
            return TurnRequest(session, "tokens" if kind == "token_ids" else kind, value,
                               sampling(request, default_max_tokens=self.default_max_tokens),
                               request.ignore_eos,
                               cache_scope=cache_scope(namespace, request.cache_salt))

        first = True
        for stream, token in run_turn(self.engine, self.metrics, "Chat", context, build):
            if token is not None:
                event = jattn_pb2.ChatEvent(token_ids=[token.id], text=token.text)
            elif stream.result is None:  # cancelled while it waited in the queue
                event = jattn_pb2.ChatEvent(finish_reason="cancelled")
                first = False
            else:
                event = jattn_pb2.ChatEvent(finish_reason=stream.result.finish_reason)
            if first:
                event.facts.CopyFrom(facts(stream.result))
                first = False
            yield event

    def EndSession(self, request, context):
        session = self._session(request, context)
        try:
            self.engine.end_session(session)
        except SessionNotFound:
            return jattn_pb2.EndSessionResponse(existed=False)
        except Exception as error:
            abort(context, error)
        return jattn_pb2.EndSessionResponse(existed=True)

    def DescribeSession(self, request, context):
        session = self._session(request, context)
        try:
            info = self.engine.describe(session)
        except Exception as error:
            abort(context, error)
        return jattn_pb2.SessionInfo(
            session_id=request.session_id, turns=info["turns"],
            context_tokens=info["context_tokens"], history_tokens=info["history_tokens"],
            dropped_tokens=info["dropped_tokens"],
            resident_blocks_by_tier=info["resident_blocks"])

    def ServerStats(self, request, context):
        stats = self.engine.stats()
        store = {k: float(v) for k, v in stats.get("store", {}).items()}
        return jattn_pb2.ServerStatsResponse(
            requests=stats.get("requests", 0), active_sessions=stats["sessions"],
            queued=stats["queued"], running=stats["running"], store=store,
            uptime_s=time.time() - self.started,
            generated_tokens=stats.get("tokens_generated", 0),
            prefilled_tokens=stats.get("tokens_prefilled", 0))
