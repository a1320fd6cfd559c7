"""Load on jattn-serve: concurrent multi-turn clients over gRPC, KV reuse on against off.

    python benchmarks/serve_load.py [--clients 16] [--turns 4] [--first-words 120]
                                    [--max-tokens 16] [--model DIR --random-weights]
                                    [--mt-bench ../shared/data/mt_bench_question.jsonl]

In the same run, a server with the AttentionStore (each turn sends only its new message,
as raw text, to its session) and one without KV reuse (each turn is a one-off request
carrying the whole conversation so far as text, which the server prefills) each serve
`--clients` conversations at once: a long first message, then short ones, greedy,
`--max-tokens` per answer. Each server first serves the same
load under other session ids, so compilation is in neither measurement. Prints TTFT p50/p99 (client side:
request sent to first event), TPOT p50 (time per output token after the first),
generated tokens/s over the run, and the ratio of the two servers; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from jattn.llm import EMBEDDED_MODEL
from jattn.model.config import ModelConfig
from jattn.tokenizer import Tokenizer
from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the little dog ran to the park and saw a big red ball under a green tree while "
         "the sun was warm and the birds sang").split()
FOLLOW_UPS = ["What happened next?", "Then it started to rain.", "Who came to play?",
              "What did they eat?", "How did the day end?", "Tell me more."]


def first_message(client_index: int, words: int) -> str:
    rng = np.random.default_rng(client_index)
    return " ".join(rng.choice(WORDS, size=words))


def conversation(index: int, args) -> list[str]:
    """Client `index`'s messages: an MT-bench question's two turns with `--mt-bench`,
    else a long random first message and short follow-ups."""
    if args.questions:
        return args.questions[index % len(args.questions)]
    return [first_message(index, args.first_words)] + FOLLOW_UPS[:args.turns - 1]


def fitting_questions(args) -> list[list[str]]:
    """MT-bench's two-turn questions whose turns and answers fit the model's context
    window (the embedded stories260K's is 512 tokens; a conversation that outgrows it is
    truncated, one whose first turn does not fit is refused)."""
    directory = args.model or EMBEDDED_MODEL
    tokenizer = Tokenizer.from_dir(directory)
    window = ModelConfig.from_dir(directory).max_position_embeddings
    with open(args.mt_bench) as f:
        questions = [json.loads(line)["turns"] for line in f if line.strip()]
    fitting = [turns for turns in questions
               if sum(len(tokenizer.encode(t)) + args.max_tokens for t in turns) <= window]
    print(f"{len(fitting)} of {len(questions)} MT-bench questions fit a {window}-token window "
          f"with {args.max_tokens}-token answers")
    return fitting


def converse(client: Client, session: str, args, record: list | None, progress, *,
             stateless: bool) -> None:
    """One client's conversation: turns of `session`, or with `stateless` one-off
    requests that each carry the whole conversation so far as text (what a client of a
    server without KV reuse sends)."""
    messages = conversation(int(session.rsplit("-", 1)[1]), args)
    history = ""
    for turn, message in enumerate(messages):
        start = time.perf_counter()
        first = None
        tokens = 0
        events = (client.chat_events("", text=history + message, max_tokens=args.max_tokens,
                                     ignore_eos=True) if stateless else
                  client.chat_events(session, text=message, max_tokens=args.max_tokens,
                                     ignore_eos=True))
        answer = ""
        for event in events:
            if first is None and event.token_ids:
                first = time.perf_counter()
            tokens += len(event.token_ids)
            answer += event.text
        history += message + answer
        end = time.perf_counter()
        if record is not None:
            record.append({"turn": turn, "ttft_s": first - start, "tokens": tokens,
                           "tpot_s": (end - first) / max(tokens - 1, 1), "end": end})
        progress.update()


def load(client: Client, prefix: str, args, records, label: str, *, stateless: bool
         ) -> float:
    """`--clients` conversations at once; returns the seconds they took together."""
    with tqdm(total=args.clients * args.turns, desc=label, unit="turn") as progress:
        start = time.perf_counter()
        threads = [threading.Thread(target=converse, args=(client, f"{prefix}-{i}", args,
                                                           records, progress),
                                    kwargs={"stateless": stateless})
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


def run_server(args, store: bool) -> dict:
    server = Server(ServeConfig(
        model=args.model, random_weights=args.random_weights, port=0, http_port=0, store=store,
        max_running=args.clients, num_blocks=args.num_blocks, default_max_tokens=16,
        max_tokens=max(args.max_tokens, 16))).start()
    client = Client(f"127.0.0.1:{server.port}")
    client.wait_ready()
    try:
        label = "store on " if store else "store off"
        load(client, "warm-up", args, None, f"{label} warm-up", stateless=not store)
        records: list[dict] = []
        elapsed = load(client, "client", args, records, label, stateless=not store)
    finally:
        client.close()
        server.stop()
    ttft = np.array([r["ttft_s"] for r in records])
    later = np.array([r["ttft_s"] for r in records if r["turn"] > 0])
    return {"store": store, "turns": len(records),
            "ttft_p50_s": float(np.median(ttft)), "ttft_p99_s": float(np.quantile(ttft, 0.99)),
            "later_turn_ttft_p50_s": float(np.median(later)) if len(later) else None,
            "tpot_p50_s": float(np.median([r["tpot_s"] for r in records])),
            "tokens_per_s": sum(r["tokens"] for r in records) / elapsed,
            "elapsed_s": elapsed}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--first-words", type=int, default=120)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=None, help="default: the embedded stories260K")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--num-blocks", type=int, default=4096)
    parser.add_argument("--mt-bench", default=None, help="JSONL of MT-bench questions: "
                        "each client holds one question's two turns instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.questions = None
    if args.mt_bench:
        args.questions = fitting_questions(args)
        args.turns = 2

    rows = [run_server(args, store) for store in (True, False)]
    on, off = rows
    source = f"MT-bench questions ({args.mt_bench})" if args.mt_bench else "synthetic"
    print(f"\njattn-serve under load: {args.clients} concurrent clients x {args.turns} turns, "
          f"{args.max_tokens} tokens per answer, {source} ({jax.default_backend()})")
    print(f"{'store':6} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'later-turn p50 ms':>18} "
          f"{'TPOT p50 ms':>12} {'tokens/s':>9}")
    for row in rows:
        later = row["later_turn_ttft_p50_s"]
        print(f"{'on' if row['store'] else 'off':6} {row['ttft_p50_s'] * 1e3:>12.1f} "
              f"{row['ttft_p99_s'] * 1e3:>12.1f} "
              f"{(later or 0) * 1e3:>18.1f} {row['tpot_p50_s'] * 1e3:>12.2f} "
              f"{row['tokens_per_s']:>9.1f}")
    print(f"ratio on/off: TTFT p50 {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}, "
          f"later-turn TTFT p50 "
          f"{(on['later_turn_ttft_p50_s'] or 0) / (off['later_turn_ttft_p50_s'] or 1):.2f}, "
          f"tokens/s {on['tokens_per_s'] / off['tokens_per_s']:.2f}")
    out = args.json or os.path.join(ROOT, "benchmarks", "results",
                                    f"serve-load{'-mtbench' if args.mt_bench else ''}-"
                                    f"{jax.default_backend()}.json")
    with open(out, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "cpu": platform.processor(),
                               "cpu_count": os.cpu_count(), "jax": jax.__version__},
                   "arguments": {k: v for k, v in vars(args).items() if k != "questions"},
                   "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
