"""Runs an ASGI app (the OpenAI API) with uvicorn on a thread of its own, on a socket
bound up front so that port 0 gives a known free port before the server starts."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class HttpServer:
    """`app` on `host:port` (0: any free port; `port` is the bound one), TLS with a PEM
    certificate chain and key when given."""

    def __init__(self, app, *, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False,
                                ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                                timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]},
                                        name="jattn-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Starts serving; returns once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log)")
            time.sleep(0.01)

    def stop(self) -> None:
        """Finishes the requests in flight (up to 5 s) and closes the port."""
        self._server.should_exit = True
        self._thread.join()
        self._socket.close()
