"""What every gRPC call passes before its method runs, in one place for every service:
the bearer-token check, and decoding the request (a request that is not a valid message
of its type is INVALID_ARGUMENT, not grpc's INTERNAL).

Open calls: only the standard health service (`grpc.health.v1.Health`), which load
balancers and orchestrators probe without credentials. Every other call (our
services, JetStream's, server reflection) needs a token when tokens are configured.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from serve.auth import Tenants

OPEN_SERVICES = ("grpc.health.v1.Health",)


def _kind(handler: grpc.RpcMethodHandler) -> str:
    """"unary_unary", "unary_stream", "stream_unary" or "stream_stream"."""
    return (("stream" if handler.request_streaming else "unary") + "_"
            + ("stream" if handler.response_streaming else "unary"))


def _rebuilt(handler: grpc.RpcMethodHandler, behavior, request_deserializer):
    """A handler of `handler`'s kind and response serializer, with a new behavior and
    request deserializer."""
    factory = getattr(grpc, f"{_kind(handler)}_rpc_method_handler")
    return factory(behavior, request_deserializer=request_deserializer,
                   response_serializer=handler.response_serializer)


def _service(method: str) -> str:
    """The service of a full method name `/package.Service/Method`."""
    return method.lstrip("/").split("/", 1)[0]


def _method(method: str) -> str:
    """The method of a full method name `/package.Service/Method`."""
    return method.rsplit("/", 1)[-1]


class TokenCheck(grpc.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) a call to any service but the open ones unless it
    carries `authorization: Bearer <one of the tokens>`. Does nothing on an open server.
    Which token it was (the tenant's namespace) the methods learn from `Tenants`. Each
    refusal is counted: `count(method, "UNAUTHENTICATED")`."""

    def __init__(self, tenants: Tenants, count=lambda method, code: None):
        self.tenants = tenants
        self.count = count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (handler is None or not self.tenants.enabled
                or _service(handler_call_details.method) in OPEN_SERVICES
                or self.tenants.knows(handler_call_details.invocation_metadata)):
            return handler

        def refuse(request, context):
            self.count(_method(handler_call_details.method), "UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, Tenants.REFUSAL)

        return _rebuilt(handler, refuse, handler.request_deserializer)


class _Undecodable:
    """Stands for request bytes that are not a valid message: `reason` says why."""

    def __init__(self, reason: str):
        self.reason = reason


class RequestDecoding(grpc.ServerInterceptor):
    """Ends a call whose request bytes do not parse (invalid UTF-8 in a string field, a
    truncated or malformed message) with INVALID_ARGUMENT naming the method, counted:
    `count(method, "INVALID_ARGUMENT")`."""

    def __init__(self, count=lambda method, code: None):
        self.count = count

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError as error:
                return _Undecodable(str(error) or "malformed message")

        def refuse(undecodable: _Undecodable, context):
            self.count(_method(method), "INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request to {method} is not a valid message "
                          f"({undecodable.reason}; string fields must be UTF-8)")

        behavior = getattr(handler, _kind(handler))
        if handler.request_streaming:
            def checked(requests, context):
                def each():
                    for request in requests:
                        if isinstance(request, _Undecodable):
                            refuse(request, context)
                        yield request
                return behavior(each(), context)
        else:
            def checked(request, context):
                if isinstance(request, _Undecodable):
                    refuse(request, context)
                return behavior(request, context)
        return _rebuilt(handler, checked, deserialize)
