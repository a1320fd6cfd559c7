"""Bearer-token authentication, and the session namespace each token gives, for both
transports.

With tokens configured, every call but the health checks must carry
`authorization: Bearer <token>` (gRPC metadata, or the HTTP header; else
UNAUTHENTICATED / 401, for every call, by `serve.interceptors.TokenCheck` and the HTTP
API's dependency), and a session id is looked up inside its token's namespace: two
clients with different tokens never reach each other's conversations, even with the same
session id, nor share KV. Without tokens, the server is open and there is one namespace.
"""

from __future__ import annotations

import hashlib
import hmac

from jattn.engine import InvalidRequest
from jattn.engine.requests import check_unicode


class Tenants:
    """The accepted tokens, each with a namespace derived from its hash. Whether a call
    may run at all is `serve.interceptors.TokenCheck`'s decision, made with `knows`."""

    REFUSAL = "missing or unknown bearer token ('authorization: Bearer <token>')"

    def __init__(self, tokens):
        self._namespaces = {token: hashlib.sha256(token.encode()).hexdigest()[:16]
                            for token in tokens}

    @property
    def enabled(self) -> bool:
        return bool(self._namespaces)

    def namespace_of(self, authorization: str | None) -> str | None:
        """The namespace of the token an `authorization` header value
        ("Bearer <token>", from gRPC metadata or an HTTP header) carries: "" on an open
        server, None if tokens are configured and it carries none of them."""
        if not self._namespaces:
            return ""
        scheme, _, given = str(authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        for token, namespace in self._namespaces.items():
            if hmac.compare_digest(token.encode(), given.strip().encode()):
                return namespace
        return None

    def knows(self, metadata) -> bool:
        """True if gRPC call `metadata` may run (a known token, or an open server)."""
        return self.namespace_of(authorization_of(metadata)) is not None


def authorization_of(metadata) -> str:
    """The `authorization` value of gRPC call metadata ("" if absent)."""
    return next((value for key, value in metadata or () if key == "authorization"), "")


def scoped(namespace: str, session_id: str) -> str:
    """The engine's name for a client's session."""
    return f"{namespace}/{session_id}" if namespace else session_id


MAX_CACHE_SALT_CHARS = 1024


def cache_scope(namespace: str, cache_salt: str = "") -> str:
    """Who may share a turn's KV: the tenant's `namespace`, narrowed by a request's
    `cache_salt`. InvalidRequest for a salt longer than `MAX_CACHE_SALT_CHARS`."""
    if len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise InvalidRequest(f"cache_salt of {len(cache_salt)} characters is longer than "
                             f"{MAX_CACHE_SALT_CHARS}")
    check_unicode(cache_salt, "cache_salt")
    return f"{namespace}\0{cache_salt}" if cache_salt else namespace
