"""The shipped nginx configuration in front of two replicas sharing Redis: a session's
turns stay on one replica, over HTTP and over gRPC, and when it dies they move to the
other with the tokens of one server that lived throughout."""

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
from jattn.bench.redis_server import RedisServer, free_port
from serve.client import Client
from test_replicas import MESSAGES, launch

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "configs", "nginx", "jattn.conf")


def nginx(tmp_path, replicas) -> tuple[subprocess.Popen, int, int]:
    """nginx with the shipped configuration, its replica addresses and ports replaced by
    the test's; returns the process and its HTTP and gRPC ports."""
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
                return process, http_port, grpc_port
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nginx did not start: " + (tmp_path / "nginx.out").read_text())


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


def test_nginx_keeps_a_session_on_one_replica_and_fails_over(redis_server, tmp_path):
    """Session "s" over HTTP and a gRPC session that nginx routes to the same replica each
    run two turns there; that replica is killed; their third turns run on the other."""
    reference = LLM()
    want = [reference.chat("s", m, max_tokens=16).text for m in MESSAGES[:3]]
    replicas = [launch(redis_server.url) for _ in range(2)]
    proxy, port, grpc_port = nginx(tmp_path, [client for _, client in replicas])
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                        max_retries=0)
    through_proxy = Client(f"127.0.0.1:{grpc_port}")

    def turn(message):
        return api.chat.completions.create(
            model="stories260K", messages=[{"role": "user", "content": message}],
            max_tokens=16, extra_headers={"X-Session-ID": "s"}).choices[0].message.content

    def served():
        return [client.stats().requests for _, client in replicas]

    try:
        got = [turn(MESSAGES[0]), turn(MESSAGES[1])]
        assert sorted(served()) == [0, 2], served()  # both turns on the same replica
        holder = served().index(2)
        through_proxy.wait_ready(timeout=30)
        for candidate in (f"g{n}" for n in range(32)):  # a gRPC session on that replica
            before = served()
            first = through_proxy.chat(candidate, MESSAGES[0], max_tokens=16).text
            if served()[holder] > before[holder]:
                break
        other = served()[1 - holder]
        grpc_got = [first, through_proxy.chat(candidate, MESSAGES[1], max_tokens=16).text]
        assert served()[1 - holder] == other, served()  # it stayed there
        process = replicas[holder][0]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        got.append(turn(MESSAGES[2]))  # nginx moves the session to the other replica
        grpc_got.append(through_proxy.chat(candidate, MESSAGES[2], max_tokens=16).text)
        assert got == want and grpc_got == want
        assert replicas[1 - holder][1].stats().requests == other + 2
    finally:
        through_proxy.close()
        proxy.send_signal(signal.SIGQUIT)
        proxy.wait(timeout=30)
        for process, _ in replicas:
            if process.poll() is None:
                process.kill()
