"""The shipped nginx configuration in front of two replicas sharing Redis: a session's
turns stay on one replica, and when it dies they move to the other with the tokens of
one server that lived throughout."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import openai
import pytest

from jattn import LLM
from redis_service import RedisServer, free_port
from test_replicas import MESSAGES, launch

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "nginx", "jattn.conf")


def nginx(tmp_path, replicas) -> tuple[subprocess.Popen, int]:
    """nginx with the shipped configuration, its replica addresses and ports replaced by
    the test's; returns the process and its HTTP port."""
    binary = shutil.which("nginx")
    assert binary, "nginx is not installed (.ci/run installs it)"
    http_port, grpc_port = free_port(), free_port()
    config = open(CONFIG).read()
    for placeholder, client in zip(("10.0.0.11", "10.0.0.12"), replicas):
        config = config.replace(f"{placeholder}:8000", f"127.0.0.1:{client.http_port}")
        config = config.replace(f"{placeholder}:50051",
                                f"127.0.0.1:{client.address.rsplit(':', 1)[1]}")
    config = config.replace("listen 8000;", f"listen 127.0.0.1:{http_port};")
    config = config.replace("listen 50051 http2;", f"listen 127.0.0.1:{grpc_port} http2;")
    (tmp_path / "jattn.conf").write_text(config)
    user = "user root;\n" if os.getuid() == 0 else ""
    temp = " ".join(f"{kind}_temp_path {tmp_path}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"{user}daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; {temp} include {tmp_path}/jattn.conf; }}\n")
    log = open(tmp_path / "nginx.out", "w")
    process = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                               stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", http_port), 0.1):
                return process, http_port
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nginx did not start: " + (tmp_path / "nginx.out").read_text())


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def test_nginx_keeps_a_session_on_one_replica_and_fails_over(redis_server, tmp_path):
    reference = LLM()
    want = [reference.chat("s", m, max_tokens=16).text for m in MESSAGES[:3]]
    replicas = [launch(redis_server.url) for _ in range(2)]
    proxy, port = nginx(tmp_path, [client for _, client in replicas])
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                        max_retries=0)

    def turn(message):
        return api.chat.completions.create(
            model="stories260K", messages=[{"role": "user", "content": message}],
            max_tokens=16, extra_headers={"X-Session-ID": "s"}).choices[0].message.content

    try:
        got = [turn(MESSAGES[0]), turn(MESSAGES[1])]
        served = [client.stats().requests for _, client in replicas]
        assert sorted(served) == [0, 2], served  # both turns on the same replica
        process, _ = replicas[served.index(2)]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        got.append(turn(MESSAGES[2]))  # nginx moves the session to the other replica
        assert got == want
    finally:
        proxy.send_signal(signal.SIGQUIT)
        proxy.wait(timeout=30)
        for process, _ in replicas:
            if process.poll() is None:
                process.kill()
