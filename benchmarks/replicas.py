"""Two replicas behind round-robin routing, with and without a shared Redis tier.

    python benchmarks/replicas.py [--trace ../shared/data/mooncake_synthetic_trace.jsonl]
        [--scale 0.03125] [--limit 1000] [--speedup 4]
        [--model ../shared/models/tiny-llama3-random]

Starts a private `redis-server` (in memory, no persistence), then, in the same run, two
`jattn-serve` replicas (servers in this process, each with its own device and host tiers)
twice: without a remote tier, and sharing the Redis. The trace is replayed over gRPC, each
request sent whole to the next replica in turn (no stickiness, the worst case for local
tiers). Prints reuse against what the trace allows and TTFT for both, then the remote
tier's load bandwidth (`RemoteTier.get` of the blocks Redis holds: fetch, checks and
decode) against a raw pipelined `GET` of the same values; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time

import jax
import redis

from jattn.bench.replay import replay, round_robin, run_over_grpc
from jattn.bench.trace import load_trace
from jattn.model.config import ModelConfig
from jattn.store.remote_tier import RemoteTier
from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_redis() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save",
         "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def run_replicas(args, requests, vocab_size: int, remote_url: str | None) -> dict:
    servers = [Server(ServeConfig(
        model=args.model, port=0, http_port=None, compilation_cache_dir=args.compilation_cache,
        remote_url=remote_url, max_running=32, max_queue=4096, num_blocks=args.num_blocks,
        max_tokens=64)).start() for _ in range(2)]
    clients = [Client(f"127.0.0.1:{server.port}") for server in servers]
    try:
        summary = replay(requests, round_robin([run_over_grpc(c) for c in clients]),
                         vocab_size=vocab_size, speedup=args.speedup, max_workers=64)
        summary["stores"] = [server.engine.stats()["store"] for server in servers]
        summary["fingerprint"] = servers[0].llm.store.fingerprint
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
    return summary


def remote_bandwidth(remote_url: str, fingerprint: str) -> dict:
    """Load bandwidth of the remote tier against a raw pipelined GET, same values."""
    tier = RemoteTier(remote_url, fingerprint=fingerprint)
    keys = tier.keys()
    client = redis.Redis.from_url(remote_url)
    start = time.perf_counter()
    values = client.pipeline(transaction=False)
    for key in keys:
        values.get(tier.block_name(key))
    raw_bytes = sum(len(v) for v in values.execute() if v)
    raw_s = time.perf_counter() - start
    start = time.perf_counter()
    got = [tier.get(key) for key in keys]
    tier_s = time.perf_counter() - start
    tier_bytes = sum(block.nbytes for block in got if block is not None)
    return {"blocks": len(keys), "raw_pipelined_get_gbps": raw_bytes / raw_s / 1e9,
            "remote_tier_get_gbps": tier_bytes / tier_s / 1e9,
            "ratio": (tier_bytes / tier_s) / (raw_bytes / raw_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=os.path.join(
        ROOT, "..", "shared", "data", "mooncake_synthetic_trace.jsonl"))
    parser.add_argument("--scale", type=float, default=0.03125)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--speedup", type=float, default=4.0)
    parser.add_argument("--model", default=os.path.join(ROOT, "..", "shared", "models",
                                                        "tiny-llama3-random"))
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--compilation-cache", default="~/.cache/jattn/xla")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "replicas-cpu.json"))
    args = parser.parse_args(argv)
    requests = load_trace(args.trace, scale=args.scale, limit=args.limit)
    vocab_size = ModelConfig.from_dir(args.model).vocab_size
    process, url = start_redis()
    try:
        rows = {"local tiers only": run_replicas(args, requests, vocab_size, None),
                "shared Redis tier": run_replicas(args, requests, vocab_size, url)}
        bandwidth = remote_bandwidth(url, rows["shared Redis tier"]["fingerprint"])
    finally:
        process.terminate()
    print(f"\ntwo replicas, round robin, {len(requests)} requests of {args.trace} at "
          f"scale {args.scale}, {args.speedup}x ({jax.default_backend()})")
    print(f"{'':18} {'reused of allowed':>17} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'prefilled tokens':>17}")
    for name, row in rows.items():
        print(f"{name:18} {row['reuse_of_allowed']:>17.3f} {row['ttft_p50_s'] * 1e3:>12.1f} "
              f"{row['ttft_p99_s'] * 1e3:>12.1f} {row['prefill_tokens_computed']:>17,}")
    print(f"remote tier load: {bandwidth}")
    with open(args.json, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "cpu": platform.processor(),
                               "cpu_count": os.cpu_count(), "jax": jax.__version__},
                   "arguments": vars(args), "rows": rows, "remote_bandwidth": bandwidth},
                  f, indent=2, default=str)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
