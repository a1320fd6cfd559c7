"""Load on jattn-serve: concurrent multi-turn clients, KV reuse on against off, over gRPC
and over the OpenAI HTTP API.

    python benchmarks/serve_load.py [--clients 16] [--turns 4] [--first-words 120]
                                    [--max-tokens 16] [--model DIR --random-weights]
                                    [--mt-bench ../shared/data/mt_bench_question.jsonl]
                                    [--transports grpc,http]

In the same run, `--clients` conversations at once (a long first message, then short ones,
greedy, `--max-tokens` per answer), sent three ways over each transport:

  session    store on; each turn sends only its new message, as raw text, to its session
  stateless  store on; each turn is a one-off request carrying the whole conversation so
             far as text (what an OpenAI-API client sends): reuse by content
  no reuse   a server without the store, the same one-off requests: the baseline

gRPC uses `Chat` (text input); HTTP uses `POST /v1/completions` with streaming, the session
named by `X-Session-ID`. Each load has a cache salt of its own, so no load reuses another's
KV, and each mode first serves the same load under another salt, so compilation is in no
measurement. Prints TTFT p50/p99 (client
side: request sent to first token), TPOT p50 (time per output token after the first),
generated tokens/s over the run, and the ratios to the no-reuse baseline of the same
transport; writes JSON.
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
from serve_process import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the little dog ran to the park and saw a big red ball under a green tree while "
         "the sun was warm and the birds sang").split()
FOLLOW_UPS = ["What happened next?", "Then it started to rain.", "Who came to play?",
              "What did they eat?", "How did the day end?", "Tell me more."]


def first_message(client_index: int, words: int) -> str:
    rng = np.random.default_rng(client_index)
    return " ".join(rng.choice(WORDS, size=words))


def conversation(index: int, args) -> list:
    """Client `index`'s messages: an MT-bench question's two turns with `--mt-bench`,
    else a long random first message and short follow-ups. Text, or token ids (the
    embedded tokenizer's) with `--token-ids`."""
    if args.questions:
        messages = args.questions[index % len(args.questions)]
    else:
        messages = [first_message(index, args.first_words)] + FOLLOW_UPS[:args.turns - 1]
    if args.token_ids:
        tokenizer = Tokenizer.from_dir(EMBEDDED_MODEL)
        return [tokenizer.encode(message) for message in messages]
    return messages


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


class GrpcTurns:
    """Turns over gRPC `Chat`: yields each event's token count and its text (its token
    ids when the message is token ids)."""

    name = "grpc"

    def __init__(self, server: ServeProcess):
        self.client = Client(server.grpc_address)
        self.client.wait_ready()

    def turn(self, session: str | None, message, max_tokens: int, salt: str):
        content = {"text": message} if isinstance(message, str) else {"token_ids": message}
        for event in self.client.chat_events(session or "", max_tokens=max_tokens,
                                             ignore_eos=True, cache_salt=salt, **content):
            yield len(event.token_ids), (event.text if isinstance(message, str)
                                         else list(event.token_ids))

    def close(self) -> None:
        self.client.close()


class HttpTurns:
    """Turns over the OpenAI API's streamed `/v1/completions`."""

    name = "http"

    def __init__(self, server: ServeProcess):
        import openai

        self.client = openai.OpenAI(base_url=server.http_url, api_key="none", max_retries=0,
                                    timeout=600)
        self.model = self.client.models.list().data[0].id

    def turn(self, session: str | None, text: str, max_tokens: int, salt: str):
        chunks = self.client.completions.create(
            model=self.model, prompt=text, max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True, "cache_salt": salt},
            extra_headers={"X-Session-ID": session} if session else None)
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason is None:
                yield 1, chunk.choices[0].text

    def close(self) -> None:
        self.client.close()


def converse(turns, index: int, salt: str, args, record: list | None, progress, *,
             stateless: bool) -> None:
    """Client `index`'s conversation: turns of its session, or with `stateless` one-off
    requests that each carry the whole conversation so far as text. Its KV is shared only
    with requests of the same cache `salt` (one per load)."""
    session = f"{salt}-client-{index}"
    history = [] if args.token_ids else ""
    for turn, message in enumerate(conversation(index, args)):
        start = time.perf_counter()
        first = None
        tokens = 0
        answer = [] if args.token_ids else ""
        for count, text in (turns.turn(None, history + message, args.max_tokens, salt)
                            if stateless else
                            turns.turn(session, message, args.max_tokens, salt)):
            if first is None and count:
                first = time.perf_counter()
            tokens += count
            answer += text
        history += message + answer
        end = time.perf_counter()
        if record is not None:
            record.append({"turn": turn, "ttft_s": first - start, "tokens": tokens,
                           "tpot_s": (end - first) / max(tokens - 1, 1), "end": end})
        progress.update()


def load(turns, salt: str, args, records, label: str, *, stateless: bool) -> float:
    """`--clients` conversations at once, under cache salt `salt` (every load the same
    texts, none reusing another load's KV); returns the seconds they took together."""
    with tqdm(total=args.clients * args.turns, desc=label, unit="turn") as progress:
        start = time.perf_counter()
        threads = [threading.Thread(target=converse, args=(turns, i, salt, args, records,
                                                           progress),
                                    kwargs={"stateless": stateless})
                   for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start


def run_server(args, store: bool) -> list[dict]:
    """The modes of one `jattn-serve` process (with or without the store), over each
    transport."""
    flags = ["--store" if store else "--no-store", "--max-running", str(args.clients),
             "--max-queue", str(4 * args.clients), "--num-blocks", str(args.num_blocks),
             "--default-max-tokens", "16", "--max-tokens", str(max(args.max_tokens, 16)),
             "--warm-up" if args.warm_up else "--no-warm-up"]
    if args.model:
        flags += ["--model", args.model]
    if args.random_weights:
        flags += ["--random-weights"]
    modes = ("session", "stateless") if store else ("no reuse",)
    rows = []
    with ServeProcess(flags) as server:
        if args.warm_up:
            server.wait_compiled()
        for transport in args.transports:
            turns = {"grpc": GrpcTurns, "http": HttpTurns}[transport](server)
            for mode in modes:
                label = f"{transport} {mode}"
                stateless = mode != "session"
                load(turns, f"{label} warm-up", args, None, f"{label} warm-up",
                     stateless=stateless)
                records: list[dict] = []
                elapsed = load(turns, label, args, records, label, stateless=stateless)
                rows.append(summary(records, elapsed, transport=transport, mode=mode))
            turns.close()
    return rows


def summary(records: list[dict], elapsed: float, **labels) -> dict:
    ttft = np.array([r["ttft_s"] for r in records])
    later = np.array([r["ttft_s"] for r in records if r["turn"] > 0])
    return {**labels, "turns": len(records),
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
    parser.add_argument("--transports", default="grpc,http",
                        help="comma-separated: grpc, http")
    parser.add_argument("--token-ids", action="store_true",
                        help="send token ids (the embedded tokenizer's), for a model "
                             "directory without a tokenizer; gRPC only")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="skip the server's start-up compilation: each mode's warm-up "
                             "load compiles what it needs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.transports = args.transports.split(",")
    args.questions = None
    if args.mt_bench:
        args.questions = fitting_questions(args)
        args.turns = 2

    rows = run_server(args, True) + run_server(args, False)
    source = f"MT-bench questions ({args.mt_bench})" if args.mt_bench else "synthetic"
    print(f"\njattn-serve under load: {args.clients} concurrent clients x {args.turns} turns, "
          f"{args.max_tokens} tokens per answer, {source} ({jax.default_backend()})")
    print(f"{'transport':9} {'mode':10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'later p50 ms':>13} {'TPOT p50 ms':>12} {'tokens/s':>9} {'p50 / base':>11} "
          f"{'tok/s / base':>13}")
    for row in rows:
        base = next(r for r in rows if r["transport"] == row["transport"]
                    and r["mode"] == "no reuse")
        row["ttft_p50_ratio"] = row["ttft_p50_s"] / base["ttft_p50_s"]
        row["tokens_per_s_ratio"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(f"{row['transport']:9} {row['mode']:10} {row['ttft_p50_s'] * 1e3:>12.1f} "
              f"{row['ttft_p99_s'] * 1e3:>12.1f} "
              f"{(row['later_turn_ttft_p50_s'] or 0) * 1e3:>13.1f} "
              f"{row['tpot_p50_s'] * 1e3:>12.2f} {row['tokens_per_s']:>9.1f} "
              f"{row['ttft_p50_ratio']:>11.2f} {row['tokens_per_s_ratio']:>13.2f}")
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
