"""Eviction policies of the AttentionStore on a Mooncake trace, at several budgets.

    python benchmarks/store_policy.py [--trace PATH] [--model-bytes-per-token 131072]

Drives the engine's device tier and the store's placement code with the trace's requests,
without data, through `jattn.bench.simulate` (whose docstring says exactly what it models:
saves written through to every tier, a block found in a later tier copied into host
memory). `scheduler` hints the blocks of the next `--lookahead` requests to the device,
host and disk tiers and prefetches them into host memory; `lru` hints none. Reports, for
each device and host budget, the fraction of prefix blocks served by each tier, the
blocks prefetched and the modelled TTFT (prefill rate and tier bandwidths as
parameters), writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os

from tqdm import tqdm

from jattn.bench.simulate import Machine, simulate
from jattn.bench.trace import load_trace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRACE = os.path.join(ROOT, "..", "shared", "data", "mooncake_synthetic_trace.jsonl")
GIB = 2**30


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--model-bytes-per-token", type=int, default=131072,
                        help="KV bytes per token; default Llama-3-8B in bfloat16")
    parser.add_argument("--hbm-gib", default="16,64",
                        help="device-tier budgets, comma-separated (one panel each)")
    parser.add_argument("--host-gib", default="64,128,256,512")
    parser.add_argument("--disk-gib", type=float, default=1024)
    parser.add_argument("--hbm-gbps", type=float, default=1000.0)
    parser.add_argument("--host-gbps", type=float, default=25.0)
    parser.add_argument("--disk-gbps", type=float, default=5.0)
    parser.add_argument("--prefill-tokens-per-s", type=float, default=10_000.0)
    parser.add_argument("--lookahead", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    requests = load_trace(args.trace, limit=args.limit)
    block_bytes = 512 * args.model_bytes_per_token
    unique = len({b for r in requests for b in r.hash_ids})
    total = sum(len(r.hash_ids) for r in requests)
    rows = []
    cases = [(float(hbm), float(host), policy) for hbm in args.hbm_gib.split(",")
             for host in args.host_gib.split(",") for policy in ("lru", "scheduler")]
    for hbm_gib, host_gib, policy in tqdm(cases, desc="simulating", unit="run"):
        machine = Machine(int(hbm_gib * GIB), int(host_gib * GIB), int(args.disk_gib * GIB),
                          hbm_bytes_per_s=args.hbm_gbps * 1e9,
                          host_bytes_per_s=args.host_gbps * 1e9,
                          disk_bytes_per_s=args.disk_gbps * 1e9,
                          prefill_tokens_per_s=args.prefill_tokens_per_s)
        result = simulate(requests, machine, kv_bytes_per_token=args.model_bytes_per_token,
                          policy=policy, lookahead=args.lookahead)
        rows.append(dict(policy=policy, hbm_gib=hbm_gib, host_gib=host_gib,
                         **result["hit_rate"], prefetched_blocks=result["prefetched_blocks"],
                         ttft_p50_s=result["ttft_p50_s"],
                         ttft_p90_s=result["ttft_p90_s"],
                         ttft_without_store_p50_s=result["ttft_without_store_p50_s"],
                         ttft_mean_ratio=result["ttft_mean_ratio"]))
    print(f"\n{len(requests)} requests, {total} prefix blocks, {unique} distinct: at most "
          f"{1 - unique / total:.1%} reusable. Block {block_bytes / 2**20:.0f} MiB; "
          f"disk {args.disk_gib:g} GiB. Modelled TTFT: prefill "
          f"{args.prefill_tokens_per_s:g} tokens/s; loads at {args.hbm_gbps:g} / "
          f"{args.host_gbps:g} / {args.disk_gbps:g} GB/s from device / host / disk.")
    print(f"{'policy':10} {'HBM GiB':>8} {'host GiB':>9} {'hbm':>7} {'host':>7} {'disk':>7} "
          f"{'miss':>7} {'prefetched':>10} {'TTFT p50':>9} {'p90':>7} {'no store p50':>13} "
          f"{'mean ratio':>11}")
    for row in rows:
        print(f"{row['policy']:10} {row['hbm_gib']:>8g} {row['host_gib']:>9g} "
              f"{row['hbm']:>7.1%} {row['host']:>7.1%} {row['disk']:>7.1%} {row['miss']:>7.1%} "
              f"{row['prefetched_blocks']:>10} "
              f"{row['ttft_p50_s']:>9.3f} {row['ttft_p90_s']:>7.3f} "
              f"{row['ttft_without_store_p50_s']:>13.3f} {row['ttft_mean_ratio']:>11.3f}")
    out = args.json or os.path.join(ROOT, "benchmarks", "results", "store-policy.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "requests": len(requests), "blocks": total,
                   "distinct_blocks": unique, "rows": rows}, f, indent=2)
    plot(out.replace(".json", ".png"), rows, 1 - unique / total)
    print(f"\nwrote {out}")


def plot(path, rows, ceiling) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["hbm_gib"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), sharey=True,
                             squeeze=False)
    for ax, hbm_gib in zip(axes[0], budgets):
        for policy, style in (("lru", "o--"), ("scheduler", "s-")):
            mine = [r for r in rows if r["policy"] == policy and r["hbm_gib"] == hbm_gib]
            ax.plot([r["host_gib"] for r in mine], [1 - r["miss"] for r in mine], style,
                    label=f"{policy}: any tier")
            ax.plot([r["host_gib"] for r in mine], [r["hbm"] + r["host"] for r in mine], style,
                    alpha=0.5, label=f"{policy}: device + host")
        ax.axhline(ceiling, color="gray", linestyle=":", label="reuse the trace allows")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("host memory budget (GiB)")
        ax.set_title(f"device tier {hbm_gib:g} GiB")
    axes[0][0].set_ylabel("fraction of prefix blocks reused")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("AttentionStore eviction on the Mooncake trace")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
