"""Generation throughput: prefill and decode tokens/s of whole models.

    python benchmarks/generate.py [--models stories260K,llama-3.2-1b] [--json PATH]

stories260K runs with its embedded weights; `configs/models/*` shapes run with random
weights (the speed of a shape does not depend on its weights). Prefill: one sequence,
the prompt in one chunk. Decode: one step for a batch of sequences, each at the given
context. Medians after a warm-up (compilation) run. Each case runs twice in the same
process: with the default attention backend and with the dense reference attention
(the baseline), on the same weights and pool.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402

from jattn import LLM  # noqa: E402
from jattn.model.kv_cache import blocks_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name: str) -> LLM:
    if name == "stories260K":
        return LLM(max_context=512, num_blocks=blocks_for(512, 16) * 8)
    return LLM(os.path.join(ROOT, "configs", "models", name), random_weights=True,
               max_context=4096, num_blocks=blocks_for(4096, 16) * 2)


def prefill_rate(llm: LLM, length: int, repeats: int) -> float:
    runner = llm.runner
    tokens = np.random.default_rng(0).integers(3, llm.config.vocab_size, size=length)
    blocks = llm.chats.blocks.allocate(blocks_for(length, runner.block_size))
    try:
        seconds = median_seconds(lambda: runner.prefill(tokens, 0, blocks), repeats=repeats)
    finally:
        llm.chats.blocks.free(blocks)
    return length / seconds


def decode_rate(llm: LLM, batch: int, context: int, repeats: int) -> float:
    runner = llm.runner
    per_sequence = blocks_for(context + 1, runner.block_size)
    block_lists = [llm.chats.blocks.allocate(per_sequence) for _ in range(batch)]
    try:
        seconds = median_seconds(
            lambda: runner.decode([5] * batch, [context] * batch, block_lists), repeats=repeats)
    finally:
        for blocks in block_lists:
            llm.chats.blocks.free(blocks)
    return batch / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="stories260K,llama-3.2-1b")
    parser.add_argument("--prompt-lengths", default="128,480")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        llm = load(name)
        load_s = time.perf_counter() - start
        work = [("prefill", int(n)) for n in args.prompt_lengths.split(",")] + \
               [("decode", int(b)) for b in args.batches.split(",")]
        for kind, size in tqdm(work, desc=name, unit="case"):
            rates = {}
            for backend in ("auto", "reference"):
                llm.runner.backend = backend
                rates[backend] = (prefill_rate(llm, size, args.repeats) if kind == "prefill"
                                  else decode_rate(llm, size, args.context, args.repeats))
            row = dict(model=name, phase=kind, tokens_per_s=rates["auto"],
                       reference_attention_tokens_per_s=rates["reference"],
                       speedup=rates["auto"] / rates["reference"], load_s=load_s)
            if kind == "prefill":
                row["prompt_tokens"] = size
            else:
                row.update(batch=size, context=args.context)
            rows.append(row)
        del llm

    device = jax.devices()[0].device_kind
    print(f"\njattn generation on {device} ({jax.default_backend()}), median of {args.repeats}")
    print(f"{'model':14} {'phase':8} {'case':>18} {'tokens/s':>10} {'dense attn':>11} "
          f"{'ratio':>6}")
    for row in rows:
        case = (f"prompt {row['prompt_tokens']}" if row["phase"] == "prefill"
                else f"batch {row['batch']} @ {row['context']}")
        print(f"{row['model']:14} {row['phase']:8} {case:>18} {row['tokens_per_s']:>10.1f} "
              f"{row['reference_attention_tokens_per_s']:>11.1f} {row['speedup']:>5.2f}x")
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"generate-{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "device_kind": device,
                               "cpu": platform.processor(), "cpu_count": os.cpu_count(),
                               "jax": jax.__version__},
                   "repeats": args.repeats, "rows": rows}, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
