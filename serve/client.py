"""A Python client of `jattn.v1.Conversations` (and the JetStream service), for the
`jattn` command, the tests and the benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from serve.protos import jattn_pb2, jattn_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc


@dataclass
class TurnReply:
    """A whole turn as the client saw it: tokens, text, the server's facts, the
    client-side time to first token (seconds, request sent to first event), and each
    token's `TokenLogprobs` when the request asked for them."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    facts: jattn_pb2.TurnFacts | None = None
    client_ttft_s: float = 0.0
    logprobs: list = field(default_factory=list)


class Client:
    """A channel to a jattn server at `address` ("host:port"); `token` is sent as a
    bearer token; `tls_ca` (PEM bytes) turns TLS on."""

    def __init__(self, address: str, *, token: str | None = None, tls_ca: bytes | None = None,
                 server_name: str | None = None):
        self.address = address
        if tls_ca is not None:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(
                address, grpc.ssl_channel_credentials(root_certificates=tls_ca), options)
        else:
            self.channel = grpc.insecure_channel(address)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.conversations = jattn_pb2_grpc.ConversationsStub(self.channel)
        self.orchestrator = jetstream_pb2_grpc.OrchestratorStub(self.channel)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def chat_events(self, session_id: str, message=None, *, text=None, token_ids=None,
                    timeout: float | None = None, **sampling):
        """The raw `ChatEvent` stream of one turn (a call object: iterate, or cancel). The
        session id also goes as `x-session-id` metadata, for a proxy that routes by it
        (when it is printable ASCII, as metadata must be)."""
        request = jattn_pb2.ChatRequest(session_id=session_id, **sampling)
        if message is not None:
            request.message = message
        elif text is not None:
            request.text = text
        elif token_ids is not None:
            request.token_ids.ids.extend(token_ids)
        routable = session_id and session_id.isascii() and session_id.isprintable()
        routing = [("x-session-id", session_id)] if routable else []
        return self.conversations.Chat(request, metadata=self.metadata + routing,
                                       timeout=timeout)

    def chat(self, session_id: str, message=None, **kwargs) -> TurnReply:
        """One whole turn; raises `grpc.RpcError` with the server's status on failure."""
        reply = TurnReply()
        start = time.perf_counter()
        for event in self.chat_events(session_id, message, **kwargs):
            if event.HasField("facts"):
                reply.facts = event.facts
                reply.client_ttft_s = time.perf_counter() - start
            reply.token_ids.extend(event.token_ids)
            reply.logprobs.extend(event.logprobs)
            reply.text += event.text
            reply.finish_reason = event.finish_reason or reply.finish_reason
        return reply

    def decode(self, *, text=None, token_ids=None, max_tokens=0, session_id="",
               timeout: float | None = None):
        """JetStream's Decode: the streamed `DecodeResponse`s of one request."""
        request = jetstream_pb2.DecodeRequest(max_tokens=max_tokens, session_id=session_id)
        if text is not None:
            request.text_content.text = text
        else:
            request.token_content.token_ids.extend(token_ids)
        return self.orchestrator.Decode(request, metadata=self.metadata, timeout=timeout)

    def end_session(self, session_id: str) -> bool:
        return self.conversations.EndSession(
            jattn_pb2.EndSessionRequest(session_id=session_id), metadata=self.metadata).existed

    def describe(self, session_id: str) -> jattn_pb2.SessionInfo:
        return self.conversations.DescribeSession(
            jattn_pb2.DescribeSessionRequest(session_id=session_id), metadata=self.metadata)

    def stats(self) -> jattn_pb2.ServerStatsResponse:
        return self.conversations.ServerStats(jattn_pb2.ServerStatsRequest(),
                                              metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()
