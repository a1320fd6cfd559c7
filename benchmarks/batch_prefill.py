"""Prefill throughput when many first turns arrive at once: packed steps against one
turn's prompt per step.

    python benchmarks/batch_prefill.py [--models stories260K,tiny-llama] [--clients 32]
        [--prompt-tokens 96] [--rounds 3] [--json PATH]

`--clients` one-off turns (random token-id prompts of `--prompt-tokens` tokens, one
answer token each, no reuse: no store) are submitted to the engine together. The
packed engine prefills the chunks of up to 32 turns per step within the step's token
budget; the baseline, `max_prefill_seqs=1`, prefills one turn's chunk per step beside
the decodes (the scheduling before packed steps). Both engines run the same weights in
the same process, warmed up; each round times submission to the last first token.
Reports prefill tokens/s (prompt tokens over that time) and TTFT p50/p90, the median of
the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from tqdm import tqdm

from jattn import LLM
from jattn.engine import EngineLimits, TurnRequest
from jattn.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MODELS = os.path.join(ROOT, "..", "shared", "models")


def build(name: str) -> LLM:
    if name == "stories260K":
        return LLM(store=None, max_context=512)
    path = os.path.join(ROOT, "configs", "models", name)
    if not os.path.isdir(path):
        path = os.path.join(SHARED_MODELS, name)
    return LLM(path, random_weights=True, store=None, max_context=1024)


def one_round(engine, prompts: list[list[int]]) -> dict:
    """Submits every prompt at once; waits for each first token."""
    started = time.perf_counter()
    streams = [engine.submit(TurnRequest(None, "tokens", tuple(prompt),
                                         SamplingParams(max_tokens=1), ignore_eos=True))
               for prompt in prompts]
    ttfts = []
    for stream in streams:
        for _ in stream:
            pass
        ttfts.append(stream.result.ttft_s)
    seconds = time.perf_counter() - started
    tokens = sum(len(p) for p in prompts)
    return {"seconds": seconds, "prefill_tokens_per_s": tokens / seconds,
            "ttft_p50_s": float(np.percentile(ttfts, 50)),
            "ttft_p90_s": float(np.percentile(ttfts, 90))}


def measure(name: str, clients: int, prompt_tokens: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    results = {}
    for label, prefill_seqs in (("packed", 32), ("one_per_step", 1)):
        llm = build(name)
        engine = llm.start_engine(EngineLimits(max_running=32, max_queue=4 * clients,
                                               max_prefill_seqs=prefill_seqs), warm_up=True)
        vocab = llm.config.vocab_size
        make = lambda: [rng.integers(3, vocab, size=prompt_tokens).tolist()  # noqa: E731
                        for _ in range(clients)]
        one_round(engine, make())  # rehearsal: first-use costs outside the timing
        samples = [one_round(engine, make()) for _ in tqdm(range(rounds), desc=f"{name} {label}")]
        engine.shutdown()
        results[label] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
        results[label]["max_prefill_seqs"] = prefill_seqs
    results["ratio_prefill_tokens_per_s"] = (results["packed"]["prefill_tokens_per_s"] /
                                             results["one_per_step"]["prefill_tokens_per_s"])
    results["ratio_ttft_p50"] = (results["packed"]["ttft_p50_s"] /
                                 results["one_per_step"]["ttft_p50_s"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="stories260K")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "batch_prefill-cpu.json"))
    args = parser.parse_args()
    report = {"machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "jax": jax.__version__,
              "backend": jax.default_backend(), "clients": args.clients,
              "prompt_tokens": args.prompt_tokens, "rounds": args.rounds, "models": {}}
    print(f"{'model':<20} {'setting':<14} {'prefill tok/s':>14} {'TTFT p50 ms':>12} "
          f"{'TTFT p90 ms':>12}")
    for name in args.models.split(","):
        result = measure(name, args.clients, args.prompt_tokens, args.rounds)
        report["models"][name] = result
        for label in ("packed", "one_per_step"):
            r = result[label]
            print(f"{name:<20} {label:<14} {r['prefill_tokens_per_s']:>14.0f} "
                  f"{1e3 * r['ttft_p50_s']:>12.1f} {1e3 * r['ttft_p90_s']:>12.1f}")
        print(f"{name:<20} {'ratio':<14} {result['ratio_prefill_tokens_per_s']:>14.2f}x "
              f"{result['ratio_ttft_p50']:>11.2f}x")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
