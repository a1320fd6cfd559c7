"""The trace replayed through jattn-serve: one server without and with reuse, and two
replicas behind round-robin routing, without and with a shared Redis tier.

    python benchmarks/replicas.py [--trace ../shared/data/mooncake_synthetic_trace.jsonl]
        [--scale 0.03125] [--limit 1000] [--speedup 4]
        [--model ../shared/models/tiny-llama3-random]

Starts a private `redis-server` (in memory, no persistence), then, in the same run, each
setup in turn, its servers in this process (each with its own device and host tiers):
one server without a store (every request prefills its whole prompt), one with the store,
two replicas with local tiers only, and two replicas sharing the Redis. The trace is
replayed over gRPC, each request sent whole (a stateless client) to the next server in
turn (no stickiness: the worst case for local tiers). Prints reuse against what the trace
allows and TTFT per setup, then the remote tier's load bandwidth on the blocks Redis holds
(fetch, checks and decode): whole blocks in one pipelined round trip
(`RemoteTier.get_many`) against a raw pipelined `HGETALL` of the same values, and layer by
layer as loads read them (`RemoteTier.read_layer`, a round trip per layer) against a raw
pipelined `HGET`; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import redis

from jattn.bench.redis_server import RedisServer
from jattn.bench.replay import replay, round_robin, run_over_grpc
from jattn.bench.trace import load_trace
from jattn.model.config import ModelConfig
from jattn.store.remote_tier import RemoteTier
from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_servers(args, requests, vocab_size: int, *, count: int, store: bool,
                remote_url: str | None) -> dict:
    servers = [Server(ServeConfig(
        model=args.model, port=0, http_port=None, compilation_cache_dir=args.compilation_cache,
        store=store, remote_url=remote_url, max_running=32, max_queue=4096,
        num_blocks=args.num_blocks)).start() for _ in range(count)]
    clients = [Client(f"127.0.0.1:{server.port}") for server in servers]
    try:
        summary = replay(requests, round_robin([run_over_grpc(c) for c in clients]),
                         vocab_size=vocab_size, speedup=args.speedup, max_workers=64)
        summary["stores"] = [server.engine.stats()["store"] for server in servers]
        summary["fingerprint"] = store and servers[0].llm.store.fingerprint
    finally:
        for client in clients:
            client.close()
        for server in servers:
            server.stop()
    return summary


def remote_bandwidth(remote_url: str, fingerprint: str) -> dict:
    """Load bandwidth of the remote tier against raw pipelined reads of the same values:
    whole blocks (`get_many` against HGETALL), and layer by layer as loads read them
    (`read_layer` of every block, one round trip per layer, against HGET)."""
    tier = RemoteTier(remote_url, fingerprint=fingerprint)
    keys = tier.keys()
    client = redis.Redis.from_url(remote_url)
    num_layers = len(client.hkeys(tier.block_name(keys[0])))

    def raw(read_into) -> tuple[int, float]:
        start = time.perf_counter()
        total = 0
        for batch in read_into():
            pipe = client.pipeline(transaction=False)
            for name, field in batch:
                pipe.hget(name, field) if field is not None else pipe.hgetall(name)
            total += sum(sum(map(len, v.values())) if isinstance(v, dict) else len(v or b"")
                         for v in pipe.execute())
        return total, time.perf_counter() - start

    names = [tier.block_name(key) for key in keys]
    whole_bytes, whole_s = raw(lambda: [[(name, None) for name in names]])
    layer_bytes, layer_s = raw(lambda: ([(name, str(layer)) for name in names]
                                        for layer in range(num_layers)))
    start = time.perf_counter()
    tier_whole = sum(b.nbytes for b in tier.get_many(keys) if b is not None)
    tier_whole_s = time.perf_counter() - start
    start = time.perf_counter()
    tier_layer = sum(k.nbytes + v.nbytes for layer in range(num_layers)
                     for got in tier.read_layer(keys, layer) if got is not None
                     for k, v in [got[:2]])
    tier_layer_s = time.perf_counter() - start
    return {"blocks": len(keys), "layers": num_layers,
            "raw_hgetall_gbps": whole_bytes / whole_s / 1e9,
            "remote_tier_get_many_gbps": tier_whole / tier_whole_s / 1e9,
            "whole_ratio": (tier_whole / tier_whole_s) / (whole_bytes / whole_s),
            "raw_hget_per_layer_gbps": layer_bytes / layer_s / 1e9,
            "remote_tier_read_layer_gbps": tier_layer / tier_layer_s / 1e9,
            "layer_ratio": (tier_layer / tier_layer_s) / (layer_bytes / layer_s)}


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
    redis_server = RedisServer()
    url = redis_server.url
    try:
        setups = {"1 server, no reuse": (1, False, None), "1 server, reuse": (1, True, None),
                  "2 replicas, local tiers": (2, True, None),
                  "2 replicas, shared Redis": (2, True, url)}
        rows = {name: run_servers(args, requests, vocab_size, count=count, store=store,
                                  remote_url=remote)
                for name, (count, store, remote) in setups.items()}
        bandwidth = remote_bandwidth(url, rows["2 replicas, shared Redis"]["fingerprint"])
    finally:
        redis_server.stop()
    print(f"\n{len(requests)} requests of {args.trace} at scale {args.scale}, "
          f"{args.speedup}x, round robin over the servers ({jax.default_backend()})")
    print(f"{'':25} {'reused of allowed':>17} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'prefilled tokens':>17} {'reused by tier':>30}")
    for name, row in rows.items():
        print(f"{name:25} {row['reuse_of_allowed']:>17.3f} {row['ttft_p50_s'] * 1e3:>12.1f} "
              f"{row['ttft_p99_s'] * 1e3:>12.1f} {row['prefill_tokens_computed']:>17,} "
              f"{str(row['reused_tokens_by_tier']):>30}")
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
