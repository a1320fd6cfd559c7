"""Time per output token of `jattn-serve` from outside: one streaming client, then many.

    python benchmarks/serve_tpot.py [--clients 1,16] [--turns 8] [--max-tokens 128]
                                    [--model DIR --random-weights] [--json PATH]

One server (store on, warmed up), then in the same run, for each count of clients: every
client sends `--turns` one-off greedy requests over gRPC `Chat` (a 16-word prompt,
`--max-tokens` answers, end-of-sequence ignored), one after another, all clients at once.
TPOT is the client's time from its first token to its last, over the tokens after the
first. The first round of each count is a rehearsal. Prints the TPOT p50 per count and
its ratio to one client's, and the CPU time that the server process and the clients'
process spent per token of one client (both share this machine's cores); writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time

import numpy as np

from serve_load import GrpcTurns, first_message
from serve_process import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client(turns: GrpcTurns, index: int, args, tpots: list) -> None:
    for turn in range(args.turns):
        first, tokens = None, 0
        for count, _ in turns.turn(None, first_message(index * 97 + turn, 16),
                                   args.max_tokens, salt=f"tpot-{index}"):
            if first is None and count:
                first = time.perf_counter()
            tokens += count
        tpots.append((time.perf_counter() - first) / max(tokens - 1, 1))


def clients_at_once(turns: GrpcTurns, clients: int, args) -> list[float]:
    """Runs the clients together; returns each turn's TPOT in s."""
    tpots: list[float] = []
    threads = [threading.Thread(target=client, args=(turns, i, args, tpots))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tpots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="default: the embedded stories260K")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--stream-interval-s", type=float, default=None,
                        help="the server's --stream-interval-s (default: its own)")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "serve-tpot-cpu.json"))
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    flags = ["--store", "--max-running", str(max(counts)),
             "--max-tokens", str(args.max_tokens), "--default-max-tokens", "16"]
    if args.model:
        flags += ["--model", args.model]
    if args.random_weights:
        flags += ["--random-weights"]
    if args.stream_interval_s is not None:
        flags += ["--stream-interval-s", str(args.stream_interval_s)]
    rows = []
    with ServeProcess(flags) as server:
        server.wait_compiled()
        turns = GrpcTurns(server)
        for clients in counts:
            clients_at_once(turns, clients, args)  # a rehearsal
            server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
            tpots = clients_at_once(turns, clients, args)
            steps = args.turns * args.max_tokens  # tokens of one client: one per step
            rows.append({"clients": clients, "turns": len(tpots),
                         "tpot_p50_ms": float(np.median(tpots)) * 1e3,
                         "tpot_p90_ms": float(np.quantile(tpots, 0.9)) * 1e3,
                         "server_cpu_ms_per_step":
                             (server.cpu_seconds() - server_cpu) / steps * 1e3,
                         "clients_cpu_ms_per_step":
                             (time.process_time() - client_cpu) / steps * 1e3})
        turns.close()
    one = rows[0]["tpot_p50_ms"]
    print(f"\njattn-serve TPOT over gRPC Chat, {args.model or 'embedded model'} "
          f"({platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'clients':>7} {'TPOT p50 ms':>12} {'p90 ms':>8} {'x one client':>13} "
          f"{'server CPU ms/step':>19} {'clients CPU ms/step':>20}")
    for row in rows:
        row["ratio_to_first"] = row["tpot_p50_ms"] / one
        print(f"{row['clients']:>7} {row['tpot_p50_ms']:>12.2f} {row['tpot_p90_ms']:>8.2f} "
              f"{row['ratio_to_first']:>13.2f} {row['server_cpu_ms_per_step']:>19.2f} "
              f"{row['clients_cpu_ms_per_step']:>20.2f}")
    with open(args.json, "w") as f:
        json.dump({"machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(),
                               "python": platform.python_version()},
                   "date": time.strftime("%Y-%m-%d"), "max_tokens": args.max_tokens,
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
