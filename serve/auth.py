"""Bearer-token authentication, and the session namespace each token gives.

With tokens configured, every call must carry `authorization: Bearer <token>` metadata
(else UNAUTHENTICATED), and a session id is looked up inside its token's namespace: two
clients with different tokens never reach each other's conversations, even with the
same session id. Without tokens, the server is open and there is one namespace.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc


class Tenants:
    """The accepted tokens, each with a namespace derived from its hash."""

    def __init__(self, tokens):
        self._namespaces = {token: hashlib.sha256(token.encode()).hexdigest()[:16]
                            for token in tokens}

    @property
    def enabled(self) -> bool:
        return bool(self._namespaces)

    def namespace(self, context: grpc.ServicerContext) -> str:
        """The caller's namespace ("" on an open server); aborts the call with
        UNAUTHENTICATED when the token is missing or wrong."""
        if not self._namespaces:
            return ""
        header = dict(context.invocation_metadata()).get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer":
            for token, namespace in self._namespaces.items():
                if hmac.compare_digest(token.encode(), given.strip().encode()):
                    return namespace
        context.abort(grpc.StatusCode.UNAUTHENTICATED,
                      "missing or unknown bearer token (metadata 'authorization: Bearer <token>')")


def scoped(namespace: str, session_id: str) -> str:
    """The engine's name for a client's session."""
    return f"{namespace}/{session_id}" if namespace else session_id


def unscoped(namespace: str, name: str) -> str:
    """The client's name for an engine session of its namespace."""
    return name[len(namespace) + 1:] if namespace else name
