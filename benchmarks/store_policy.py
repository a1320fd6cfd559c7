"""Eviction policies of the AttentionStore on a Mooncake trace, at several budgets.

    python benchmarks/store_policy.py [--trace PATH] [--model-bytes-per-token 131072]

Drives the store's own placement code with the trace's requests, without data, through
`jattn.bench.simulate` (which says how blocks are reused and placed). `scheduler` passes
the blocks of the next `--lookahead` requests as the upcoming window; `lru` passes none. Reports the fraction of prefix blocks served by each tier, writes JSON
and a PNG plot.
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
    parser.add_argument("--hbm-gib", type=float, default=16)
    parser.add_argument("--host-gib", default="64,128,256,512")
    parser.add_argument("--disk-gib", type=float, default=1024)
    parser.add_argument("--lookahead", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    requests = load_trace(args.trace, limit=args.limit)
    block_bytes = 512 * args.model_bytes_per_token
    unique = len({b for r in requests for b in r.hash_ids})
    total = sum(len(r.hash_ids) for r in requests)
    rows = []
    cases = [(policy, float(h)) for h in args.host_gib.split(",") for policy in
             ("lru", "scheduler")]
    for policy, host_gib in tqdm(cases, desc="simulating", unit="run"):
        machine = Machine(int(args.hbm_gib * GIB), int(host_gib * GIB),
                          int(args.disk_gib * GIB))
        rates = simulate(requests, machine, kv_bytes_per_token=args.model_bytes_per_token,
                         policy=policy, lookahead=args.lookahead)["hit_rate"]
        rows.append(dict(policy=policy, host_gib=host_gib, **rates))
    print(f"\n{len(requests)} requests, {total} prefix blocks, {unique} distinct: at most "
          f"{1 - unique / total:.1%} reusable. Block {block_bytes / 2**20:.0f} MiB; "
          f"HBM {args.hbm_gib:g} GiB, disk {args.disk_gib:g} GiB.")
    print(f"{'policy':10} {'host GiB':>9} {'hbm':>7} {'host':>7} {'disk':>7} {'miss':>7}")
    for row in rows:
        print(f"{row['policy']:10} {row['host_gib']:>9g} {row['hbm']:>7.1%} "
              f"{row['host']:>7.1%} {row['disk']:>7.1%} {row['miss']:>7.1%}")
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

    fig, ax = plt.subplots(figsize=(7, 4))
    for policy, style in (("lru", "o--"), ("scheduler", "s-")):
        mine = [r for r in rows if r["policy"] == policy]
        ax.plot([r["host_gib"] for r in mine], [1 - r["miss"] for r in mine], style,
                label=f"{policy}: any tier")
        ax.plot([r["host_gib"] for r in mine], [r["hbm"] + r["host"] for r in mine], style,
                alpha=0.5, label=f"{policy}: device + host")
    ax.axhline(ceiling, color="gray", linestyle=":", label="reuse the trace allows")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("host memory budget (GiB)")
    ax.set_ylabel("fraction of prefix blocks reused")
    ax.set_title("AttentionStore eviction on the Mooncake trace")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
