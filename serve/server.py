"""The server: over one engine, gRPC (our Conversations service, JetStream's
Orchestrator, the standard health service and server reflection) and the OpenAI HTTP
API, both through one `serve.service.Service`.

`Server(config).start()` loads the model and listens; `stop()` stops accepting turns,
lets those in flight finish for `shutdown_grace_s` (then cancels them), flushes the
store and closes the ports.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jattn import LLM
from jattn.compile_cache import use_compilation_cache
from jattn.distributed.group import exit_group
from jattn.engine import EngineLimits
from jattn.store import StoreConfig
from serve.auth import Tenants
from serve.config import ServeConfig
from serve.conversations import ConversationsServicer
from serve.interceptors import RequestDecoding, TokenCheck
from serve.jetstream import OrchestratorServicer
from serve.http_server import HttpServer
from serve.metrics import Metrics
from serve.openai_api import create_app
from serve.protos import jattn_pb2, jattn_pb2_grpc, jetstream_pb2, jetstream_pb2_grpc
from serve.service import Service

log = logging.getLogger("jattn.serve")

SERVICES = (jattn_pb2.DESCRIPTOR.services_by_name["Conversations"].full_name,
            jetstream_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name)


def build_llm(config: ServeConfig, on_group_failure=None) -> LLM:
    """The configured LLM; in a group of processes, `on_group_failure(message)` is
    called when a step outlives `step_timeout_s`."""
    store = None
    if config.store:
        overrides = {k: getattr(config, k) for k in ("hbm_bytes", "host_bytes")
                     if getattr(config, k) is not None}
        store = StoreConfig.sized_for_machine(
            block_size=config.block_size, disk_bytes=config.disk_bytes,
            disk_path=config.disk_path, remote_url=config.remote_url,
            remote_prefix=config.remote_prefix, key_file=config.store_key_file, **overrides)
    return LLM(config.model, revision=config.revision, dtype=config.dtype,
               random_weights=config.random_weights,
               block_size=config.block_size, max_context=config.max_context,
               num_blocks=config.num_blocks, prefill_chunk=config.prefill_chunk,
               max_running=config.max_running, store=store, kv_parallel=config.kv_parallel,
               step_timeout_s=config.step_timeout_s, on_group_failure=on_group_failure)


class Server:
    """A configured jattn server. `port` is the bound port once started."""

    def __init__(self, config: ServeConfig, llm: LLM | None = None):
        self.config = config
        use_compilation_cache(config.compilation_cache_dir)
        self.health = health.HealthServicer()
        self.llm = llm or build_llm(config, on_group_failure=self._group_failed)
        self.engine = self.llm.start_engine(EngineLimits(
            max_queue=config.max_queue, max_running=config.max_running,
            max_prefill_seqs=config.max_prefill_seqs, max_prompt_tokens=config.max_prompt_tokens,
            max_tokens=config.max_tokens, max_sessions=config.max_sessions,
            max_sessions_per_tenant=config.max_sessions_per_tenant,
            session_idle_s=config.session_idle_s), warm_up=config.warm_up,
            on_failure=self._engine_failed)
        self.metrics = Metrics(self.engine, port=config.metrics_port)
        tenants = Tenants(config.auth_tokens)
        workers = config.max_queue + config.max_running + 8
        self.service = Service(self.engine, tenants,
                               default_max_tokens=config.default_max_tokens,
                               stream_interval_s=config.stream_interval_s,
                               model_name=config.served_model_name or os.path.basename(
                                   os.path.normpath(self.llm.model_path)))
        self._serving = False
        self.http = None
        if config.http_port is not None:
            self.http = HttpServer(
                create_app(self.service, self.metrics, ready=lambda: self._serving,
                           max_concurrency=workers),
                host=config.host, port=config.http_port, tls_cert=config.tls_cert,
                tls_key=config.tls_key)
        self.grpc = grpc.server(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jattn-grpc"),
            interceptors=(TokenCheck(tenants, self.metrics.call),
                          RequestDecoding(self.metrics.call)),
            maximum_concurrent_rpcs=workers)
        jattn_pb2_grpc.add_ConversationsServicer_to_server(
            ConversationsServicer(self.service, self.metrics), self.grpc)
        jetstream_pb2_grpc.add_OrchestratorServicer_to_server(
            OrchestratorServicer(self.service, self.metrics), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            SERVICES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                        reflection.SERVICE_NAME), self.grpc)
        address = f"{config.host}:{config.port}"
        if config.tls_cert:
            with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self.grpc.add_secure_port(address, credentials)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot listen on {address}")

    @property
    def http_port(self) -> int | None:
        """The HTTP API's bound port (None without one)."""
        return self.http.port if self.http else None

    def start(self) -> "Server":
        self.grpc.start()
        if self.http:
            self.http.start()
        self._serving = True
        self._set_health(health_pb2.HealthCheckResponse.SERVING
                         if self.engine.is_live() else health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("jattn serving gRPC on %s:%d%s", self.config.host, self.port,
                 f", HTTP on port {self.http_port}" if self.http else "")
        return self

    def _set_health(self, status) -> None:
        for service in ("",) + SERVICES:
            self.health.set(service, status)

    def _engine_failed(self, error: BaseException) -> None:
        """The engine's thread stopped: say so to health checks (calls already fail
        with UNAVAILABLE); the process keeps running until it is stopped."""
        log.critical("the engine has stopped (%r): health is NOT_SERVING", error)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.llm.in_group:
            self._group_failed(f"the engine has stopped ({error!r})")

    def _group_failed(self, message: str) -> None:
        """A process of the group died or hangs: the group cannot run another step.
        Says NOT_SERVING, logs `message` and exits non-zero (a supervisor restarts the
        group)."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        exit_group(message)

    def stop(self) -> None:
        """Stops accepting turns, finishes (then cancels) those in flight, flushes the
        store, closes the port."""
        self._serving = False
        self.health.enter_graceful_shutdown()
        self.llm.close(grace=self.config.shutdown_grace_s)
        self.grpc.stop(grace=1.0).wait()
        if self.http:
            self.http.stop()
        self.metrics.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()
