"""Bearer-token authentication, and the session namespace each token gives.

With tokens configured, every call but the health service's must carry
`authorization: Bearer <token>` metadata (else UNAUTHENTICATED, for every call, by
`serve.interceptors.TokenCheck`), and a session id is looked up inside its token's
namespace: two clients with different tokens never reach each other's conversations,
even with the same session id. Without tokens, the server is open and there is one namespace.
"""

from __future__ import annotations

import hashlib
import hmac

import grpc


class Tenants:
    """The accepted tokens, each with a namespace derived from its hash. Whether a call
    may run at all is `serve.interceptors.TokenCheck`'s decision, made with `knows`."""

    REFUSAL = "missing or unknown bearer token (metadata 'authorization: Bearer <token>')"

    def __init__(self, tokens):
        self._namespaces = {token: hashlib.sha256(token.encode()).hexdigest()[:16]
                            for token in tokens}

    @property
    def enabled(self) -> bool:
        return bool(self._namespaces)

    def _lookup(self, metadata) -> str | None:
        """The namespace of the bearer token in call `metadata`, or None."""
        header = next((value for key, value in metadata or () if key == "authorization"), "")
        scheme, _, given = str(header).partition(" ")
        if scheme.lower() != "bearer":
            return None
        for token, namespace in self._namespaces.items():
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                return namespace
        return None

    def knows(self, metadata) -> bool:
        """True if call `metadata` carries one of the tokens."""
        return self._lookup(metadata) is not None

    def namespace(self, context: grpc.ServicerContext) -> str:
        """The caller's namespace ("" on an open server); aborts the call with
        UNAUTHENTICATED when the token is missing or wrong."""
        if not self._namespaces:
            return ""
        namespace = self._lookup(context.invocation_metadata())
        if namespace is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, self.REFUSAL)
        return namespace


def scoped(namespace: str, session_id: str) -> str:
    """The engine's name for a client's session."""
    return f"{namespace}/{session_id}" if namespace else session_id


def unscoped(namespace: str, name: str) -> str:
    """The client's name for an engine session of its namespace."""
    return name[len(namespace) + 1:] if namespace else name


MAX_CACHE_SALT_CHARS = 1024


def cache_scope(namespace: str, cache_salt: str = "") -> str:
    """Who may share a turn's KV: the tenant's `namespace`, narrowed by a request's
    `cache_salt`. ValueError for a salt longer than `MAX_CACHE_SALT_CHARS`."""
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt of {len(cache_salt)} characters is longer than "
                         f"{MAX_CACHE_SALT_CHARS}")
    return f"{namespace}\0{cache_salt}" if cache_salt else namespace
