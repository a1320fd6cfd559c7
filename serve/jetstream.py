"""`jetstream_proto.Orchestrator`: JetStream's wire contract, so its clients and its
benchmark drive jattn unchanged; a thin gRPC adapter over `serve.service.Service`.

Every streamed `DecodeResponse` is a `stream_content` with one sample; the first carries
the first token. Without a `session_id` a request is a one-off generation; with one
(jattn's field 11), its prompt is appended to that conversation as raw text or tokens
and the conversation's KV is reused.
"""

from __future__ import annotations

import grpc

from jattn.engine import InvalidRequest
from serve.metrics import Metrics
from serve.protos import jetstream_pb2, jetstream_pb2_grpc
from serve.service import Service
from serve.turns import caller_of, run_turn, sampling


class OrchestratorServicer(jetstream_pb2_grpc.OrchestratorServicer):
    def __init__(self, service: Service, metrics: Metrics):
        self.service = service
        self.metrics = metrics

    def Decode(self, request, context):
        caller = caller_of(self.service, context)
        if request.num_samples > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"num_samples {request.num_samples}: jattn serves 1 sample")

        def start():
            content = request.WhichOneof("content")
            if content is None:
                raise InvalidRequest("no prompt: set text_content or token_content")
            if content == "text_content":
                kind, value = "text", request.text_content.text
            else:
                kind, value = "tokens", tuple(request.token_content.token_ids)
            return self.service.start_turn(caller, session_id=request.session_id or None,
                                           kind=kind, value=value,
                                           params=sampling(self.service, request))

        for _, tokens in run_turn(self.metrics, "Decode", context, start,
                                  interval_s=self.service.stream_interval_s):
            if tokens is None:
                return
            for token in tokens:  # one response per step, as JetStream's clients expect
                sample = jetstream_pb2.DecodeResponse.StreamContent.Sample(
                    text=token.text, token_ids=[token.id])
                yield jetstream_pb2.DecodeResponse(
                    stream_content=jetstream_pb2.DecodeResponse.StreamContent(samples=[sample]))

    def HealthCheck(self, request, context):
        return jetstream_pb2.HealthCheckResponse(is_live=self.service.is_live())
