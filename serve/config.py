"""`jattn-serve` configuration: every key, from a YAML file and/or command-line flags.

Flags override the file; the file overrides the defaults below. Byte sizes accept
suffixes (`512MiB`, `8GiB`, `1GB`). `configs/serve/default.yaml` lists every key.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import yaml

from jattn.defaults import BLOCK_SIZE, HBM_SHARE, MAX_RUNNING, PREFILL_CHUNK, STEP_TIMEOUT_S
from jattn.engine import EngineLimits
from jattn.store import StoreConfig

STREAM_INTERVAL_S = 0.01
"""How often a streamed gRPC answer sends its tokens, at most, by default (seconds)."""

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> int:
    """An integer byte count from `4096`, `"512MiB"`, `"1.5GB"`..."""
    if isinstance(value, bool):
        raise ValueError(f"not a byte size: {value!r}")
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (use e.g. 4096, 512MiB, 8GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass
class ServeConfig:
    """Everything `jattn-serve` can be told. Sizes in bytes, times in seconds."""

    model: str | None = field(default=None, metadata={
        "help": "model directory (Hugging Face layout) or Hugging Face Hub id (org/name, "
                "downloaded once into the Hugging Face cache; HF_TOKEN, HF_HOME and "
                "HF_HUB_OFFLINE apply); default: the embedded stories260K"})
    revision: str | None = field(default=None, metadata={
        "help": "branch, tag or commit of a Hub model (default: its main branch)"})
    dtype: str | None = field(default=None, metadata={
        "help": "float32 or bfloat16; default: bfloat16 on accelerators, float32 on CPU"})
    random_weights: bool = field(default=False, metadata={
        "help": "run the model's shape with random weights (a config-only directory)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0: any free)"})
    http_port: int | None = field(default=8000, metadata={
        "help": "OpenAI-compatible HTTP API port (0: any free; null: no HTTP API)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "the model's name in the HTTP API; default: the model directory's name"})
    max_context: int | None = field(default=None, metadata={
        "help": "context window in tokens; default: the model's"})
    num_blocks: int | None = field(default=None, metadata={
        "help": "KV blocks in the device pool; default: room for max_running turns at the "
                "longest context, within half the device's memory left by the weights (an "
                "eighth of the machine's on CPU)"})
    block_size: int = field(default=BLOCK_SIZE, metadata={"help": "tokens per KV block"})
    kv_parallel: int = field(default=1, metadata={
        "help": "devices the KV pool is spread over (DistAttention); 1: one device; in a "
                "group of processes, all the group's devices"})
    coordinator: str | None = field(default=None, metadata={
        "help": "a group of processes over several hosts: process 0's HOST:PORT (every "
                "process the same), or auto (Cloud TPU, SLURM); null: this process alone"})
    num_processes: int | None = field(default=None, metadata={
        "help": "processes in the group (with coordinator HOST:PORT)"})
    process_id: int | None = field(default=None, metadata={
        "help": "this process's index in the group: 0 serves, the others follow its steps"})
    step_timeout_s: float = field(default=STEP_TIMEOUT_S, metadata={
        "help": "in a group, seconds a model step may take before process 0 reports "
                "NOT_SERVING and exits (a process of the group died or hangs)"})
    prefill_chunk: int = field(default=PREFILL_CHUNK, metadata={
        "help": "the most tokens one model step packs: chunks of several turns' prompts "
                "together with the decode batch's tokens"})
    store: bool = field(default=True, metadata={
        "help": "keep conversations' KV between turns (false: recompute every turn)"})
    hbm_bytes: int | None = field(default=None, metadata={
        "help": f"KV kept in the device pool between turns; default: {HBM_SHARE:g} of the "
                "pool's bytes"})
    host_bytes: int | None = field(default=None, metadata={
        "help": "KV kept in host memory; default: a quarter of the machine's memory"})
    disk_bytes: int = field(default=0, metadata={"help": "KV kept on disk (0: no disk tier)"})
    disk_path: str | None = field(default=None, metadata={
        "help": "directory of the disk tier (in a group of processes, each process's under "
                "process-<i> in it)"})
    remote_url: str | None = field(default=None, metadata={
        "help": "a Redis shared by replicas as the tier after disk, holding blocks and "
                "session records: redis://[user:password@]host:port/db (rediss:// for TLS); "
                "not in a group of processes"})
    remote_prefix: str = field(default=StoreConfig.remote_prefix, metadata={
        "help": "prefix of every Redis key of the remote tier"})
    store_key_file: str | None = field(default=None, metadata={
        "help": "a file holding a secret shared by every replica (16 bytes or more): "
                "disk and Redis entries and session records carry a keyed MAC, and those "
                "without it are dropped (default: checksums only; trust from access "
                "rights)"})
    max_queue: int = field(default=EngineLimits.max_queue, metadata={
        "help": "turns waiting; more: RESOURCE_EXHAUSTED"})
    max_running: int = field(default=MAX_RUNNING, metadata={
        "help": "turns run together (decoding or prefilling)"})
    max_prefill_seqs: int = field(default=EngineLimits.max_prefill_seqs, metadata={
        "help": "most turns whose prompts one model step prefills (1: one turn's chunk "
                "per step, beside the decodes)"})
    max_prompt_tokens: int = field(default=EngineLimits.max_prompt_tokens, metadata={
        "help": "new tokens per turn"})
    max_tokens: int = field(default=EngineLimits.max_tokens, metadata={
        "help": "tokens per answer, at most"})
    default_max_tokens: int = field(default=256, metadata={
        "help": "tokens per answer when a request does not say"})
    stream_interval_s: float = field(default=STREAM_INTERVAL_S, metadata={
        "help": "a streamed gRPC answer sends its tokens at most this often, several per "
                "message when they come faster (the first token at once; 0: one message "
                "per token)"})
    max_sessions: int = field(default=EngineLimits.max_sessions, metadata={
        "help": "conversations held at once"})
    max_sessions_per_tenant: int = field(default=EngineLimits.max_sessions_per_tenant,
                                         metadata={"help": "conversations one token's "
                                                           "client holds at once"})
    session_idle_s: float = field(default=EngineLimits.session_idle_s, metadata={
        "help": "a conversation with no turn for this long is ended, as EndSession "
                "would (0: never)"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain: serve TLS"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    auth_tokens: list[str] = field(default_factory=list, metadata={
        "help": "bearer tokens accepted (repeat the flag for several clients); each "
                "token's sessions are its own"})
    metrics_port: int | None = field(default=None, metadata={
        "help": "serve Prometheus metrics on this port too (default: off), with no "
                "authentication: with auth tokens it needs --metrics-open (the HTTP API's "
                "/metrics asks for a token)"})
    metrics_open: bool = field(default=False, metadata={
        "help": "with auth tokens, allow --metrics-port's unauthenticated metrics"})
    compilation_cache_dir: str | None = field(default="~/.cache/jattn/xla", metadata={
        "help": "where compiled programs are kept across restarts (null: nowhere)"})
    warm_up: bool = field(default=True, metadata={
        "help": "compile every batch and chunk shape before serving (no compile stalls)"})
    shutdown_grace_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM, seconds turns in flight get to finish before they are cancelled"})

    def __post_init__(self):
        for name in ("hbm_bytes", "host_bytes", "disk_bytes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, parse_bytes(value))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.disk_bytes and not self.disk_path:
            raise ValueError("disk_bytes > 0 needs a disk_path")
        StoreConfig(key_file=self.store_key_file).store_key()  # (read now: fail at start)
        if isinstance(self.auth_tokens, str):
            self.auth_tokens = [self.auth_tokens]
        if any(not isinstance(t, str) or len(t) < 8 for t in self.auth_tokens):
            raise ValueError("auth tokens must be strings of at least 8 characters")
        if self.auth_tokens and self.metrics_port is not None and not self.metrics_open:
            raise ValueError("metrics_port serves metrics to anyone, while auth tokens are "
                             "set: add metrics_open (--metrics-open) to allow it, or read "
                             "/metrics of the HTTP API with a token")
        if not 1 <= self.default_max_tokens <= self.max_tokens:
            raise ValueError(f"default_max_tokens must be in [1, max_tokens={self.max_tokens}]")

    @classmethod
    def from_yaml(cls, path: str) -> "ServeConfig":
        with open(path) as f:
            values = yaml.safe_load(f) or {}
        return cls.from_dict(values, source=path)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "configuration") -> "ServeConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown keys in {source}: {', '.join(unknown)}")
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `ServeConfig` key (`max_queue` -> `--max-queue`), plus `--config`."""
    parser.add_argument("--config", help="YAML file of these keys (flags override it)")
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "auth_tokens":
            parser.add_argument("--auth-token", dest="auth_tokens", action="append",
                                default=None, help=f.metadata["help"])
        elif f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f.metadata["help"])
        else:
            kind = str if f.name.endswith("_bytes") else {
                "int": int, "int | None": int, "float": float}.get(f.type, str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None,
                                help=f.metadata["help"])


def from_arguments(args: argparse.Namespace) -> ServeConfig:
    """The configuration the file (if any) and the flags given describe."""
    values = {}
    if args.config:
        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        ServeConfig.from_dict(values, source=args.config)
    for f in dataclasses.fields(ServeConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return ServeConfig.from_dict(values)
