"""A private `redis-server` for tests and benchmarks: a free loopback port, no
persistence, stopped after. Needs the `redis-server` binary (Debian's `redis-server`
package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`redis-server` on `port` (a free one by default), in memory only, evicting least
    recently used keys past `maxmemory` bytes (0: no limit); `DEBUG SLEEP` allowed (a
    test can make it hang)."""

    def __init__(self, port: int | None = None, *, maxmemory: int = 0):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install "
                               "redis-server; .ci/run installs it)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                         "--save", "", "--appendonly", "no", "--maxmemory", str(maxmemory),
                         "--maxmemory-policy", "allkeys-lru", "--enable-debug-command", "local"]
        self.process = None
        self.start()

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)
