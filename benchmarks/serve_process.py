"""`jattn-serve` in a process of its own, as a user runs it: the benchmarks' clients then
share no interpreter (and no GIL) with the server they measure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ServeProcess:
    """Launches `jattn-serve FLAGS --port 0 --http-port 0` and waits for SERVING.

    Use as a context manager; inside it `grpc_address` ("127.0.0.1:PORT"), `http_url`
    ("http://127.0.0.1:PORT/v1") and `seconds_to_serving` (launch to a SERVING health
    check) are set. Leaving it stops the server with SIGTERM (turns in flight finish,
    the store flushes) and keeps its output in `output`.
    """

    def __init__(self, flags: list[str], *, ready_timeout_s: float = 600.0):
        self.flags = flags
        self.ready_timeout_s = ready_timeout_s
        self.grpc_address: str | None = None
        self.http_url: str | None = None
        self.seconds_to_serving: float | None = None
        self.output: list[str] = []
        self._process: subprocess.Popen | None = None
        self._drain: threading.Thread | None = None

    def wait_compiled(self, timeout_s: float = 600) -> None:
        """Waits until the server logs that its warm-up's background compilation is
        done, so that it competes with no measurement."""
        deadline = time.perf_counter() + timeout_s
        while not any("background compilation done" in line for line in self.output):
            if time.perf_counter() > deadline:
                raise TimeoutError("the server's background compilation did not end")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """The server process's CPU time so far (user + system, all threads), in s."""
        with open(f"/proc/{self._process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "ServeProcess":
        from serve.client import Client

        started = time.perf_counter()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--http-port", "0",
             *self.flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS",
                                                                         "cpu")))
        try:
            for line in self._process.stdout:
                self.output.append(line)
                if "listening on" in line:
                    self.grpc_address = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
                elif "HTTP (OpenAI API) on" in line:
                    self.http_url = line.split(" on ", 1)[1].strip()
                    break
            if self.grpc_address is None or self.http_url is None:
                raise RuntimeError("jattn-serve did not start:\n" + "".join(self.output[-20:]))
            self._drain = threading.Thread(target=self.output.extend,
                                           args=(self._process.stdout,), daemon=True)
            self._drain.start()
            client = Client(self.grpc_address)
            client.wait_ready(timeout=self.ready_timeout_s)
            client.close()
        except BaseException:
            self.__exit__()
            raise
        self.seconds_to_serving = time.perf_counter() - started
        return self

    def __exit__(self, *exc_info) -> None:
        self._process.send_signal(signal.SIGTERM)
        if self._drain is None:
            self.output.append(self._process.communicate(timeout=300)[0])
        else:
            self._process.wait(timeout=300)
            self._drain.join()
