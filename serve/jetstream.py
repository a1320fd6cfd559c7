"""`jetstream_proto.Orchestrator`: JetStream's wire contract, so its clients and its
benchmark drive jattn unchanged.

Every streamed `DecodeResponse` is a `stream_content` with one sample; the first carries
the first token. Without a `session_id` a request is a one-off generation; with one
(jattn's field 11), its prompt is appended to that conversation as raw text or tokens
and the conversation's KV is reused.
"""

from __future__ import annotations

import grpc

from jattn.engine import Engine, TurnRequest
from serve.auth import Tenants, scoped
from serve.protos import jetstream_pb2, jetstream_pb2_grpc
from serve.metrics import Metrics
from serve.turns import run_turn, sampling


class OrchestratorServicer(jetstream_pb2_grpc.OrchestratorServicer):
    def __init__(self, engine: Engine, tenants: Tenants, *, default_max_tokens: int,
                 metrics: Metrics):
        self.engine = engine
        self.metrics = metrics
        self.tenants = tenants
        self.default_max_tokens = default_max_tokens

    def Decode(self, request, context):
        namespace = self.tenants.namespace(context)
        if request.num_samples > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_samples {request.num_samples}: jattn serves 1 sample")
        session = scoped(namespace, request.session_id) if request.session_id else None

        def build():
            content = request.WhichOneof("content")
            if content is None:
                raise ValueError("no prompt: set text_content or token_content")
            if content == "text_content":
                kind, value = "text", request.text_content.text
            else:
                kind, value = "tokens", tuple(request.token_content.token_ids)
            return TurnRequest(session, kind, value,
                               sampling(request, default_max_tokens=self.default_max_tokens),
                               cache_scope=namespace)

        for _, token in run_turn(self.engine, self.metrics, "Decode", context, build):
            if token is None:
                return
            sample = jetstream_pb2.DecodeResponse.StreamContent.Sample(
                text=token.text, token_ids=[token.id])
            yield jetstream_pb2.DecodeResponse(
                stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=[sample]))

    def HealthCheck(self, request, context):
        return jetstream_pb2.HealthCheckResponse(is_live=self.engine.is_live())
