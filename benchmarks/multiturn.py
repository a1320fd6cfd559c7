"""Multi-turn time to first token: the AttentionStore against recomputing the history.

    python benchmarks/multiturn.py [--model smollm2-135m | --model DIR] [--first-turn 3000]
                                   [--turns 6]

A random-weight model of a real shape (`configs/models/<model>`) holds one conversation:
a long first message, then short ones. Every turn runs, in the same process, with:

  hbm        the store keeps the session's KV in the device pool between turns;
  host       the device tier is off: each turn loads the KV from host memory;
  disk       device and host tiers are off: each turn loads it from disk files;
  remote     only the remote tier, a private redis-server on loopback: each turn reads
             the KV from Redis layer by layer (skipped without `redis-server`);
  none       no store: nothing outlives a turn, each turn prefills its whole context
             (in chunks), as a server without reuse does for a stateless request;
  one-shot   the strongest plain baseline: the whole context prefilled in one pass.

It prints TTFT per turn and the ratio to one-shot, and writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from tqdm import tqdm

from jattn import LLM
from jattn.bench.redis_server import RedisServer
from jattn.model.config import ModelConfig
from jattn.model.kv_cache import blocks_for
from jattn.store import StoreConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("hbm", "host", "disk", "remote", "none")
STORED = MODES[:-1]


def build(model_dir: str, mode: str, disk_path: str, max_context: int,
          remote_url: str | None) -> LLM:
    pool = 3 * blocks_for(max_context, 16)  # the rehearsal, the conversation, one-shot
    stores = {
        "hbm": StoreConfig(hbm_bytes=2**40, host_bytes=2**40),
        "host": StoreConfig(hbm_bytes=0, host_bytes=2**40),
        "disk": StoreConfig(hbm_bytes=0, host_bytes=0, disk_bytes=2**40,
                            disk_path=disk_path),
        "remote": StoreConfig(hbm_bytes=0, host_bytes=0, remote_url=remote_url),
        "none": None,
    }
    return LLM(model_dir, random_weights=True, seed=0, max_context=max_context,
               num_blocks=pool, store=stores[mode])


def conversation(rng, vocab: int, args) -> list[list[int]]:
    """Random token ids: a `--first-turn` message, then `--later-turns` ones."""
    return [rng.integers(3, vocab, size=args.first_turn).tolist()] + [
        rng.integers(3, vocab, size=args.later_turns).tolist() for _ in range(args.turns - 1)]


def one_shot_ttft(llm: LLM, tokens: list[int]) -> float:
    """Prefill of the whole context in one pass and the first token's logits (the second
    of two runs, so compilation is not counted)."""
    runner = llm.runner
    blocks = llm.chats.blocks.allocate(blocks_for(len(tokens) + 1, runner.block_size))
    try:
        np.asarray(runner.prefill(tokens, 0, blocks))
        start = time.perf_counter()
        np.asarray(runner.prefill(tokens, 0, blocks))
        return time.perf_counter() - start
    finally:
        llm.chats.blocks.free(blocks)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--first-turn", type=int, default=3000)
    parser.add_argument("--later-turns", type=int, default=32)
    parser.add_argument("--answer", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    model_dir = (args.model if os.path.isdir(args.model)
                 else os.path.join(ROOT, "configs", "models", args.model))
    max_context = blocks_for(args.first_turn + args.turns * (args.later_turns + args.answer)
                             + 64, 16) * 16
    vocab = min(1000, ModelConfig.from_dir(model_dir).vocab_size)
    messages, rehearsal = (conversation(np.random.default_rng(seed), vocab, args)
                           for seed in (0, 1))
    modes = MODES if shutil.which("redis-server") else tuple(m for m in MODES
                                                              if m != "remote")
    if "remote" not in modes:
        print("no redis-server here: the remote mode is left out")
    results = {mode: [] for mode in modes}
    tokens_per_turn = {mode: [] for mode in modes}
    one_shot, context = [], []
    store_stats = {}
    redis_server = RedisServer() if "remote" in modes else None
    with tempfile.TemporaryDirectory() as disk_path:
        for mode in modes:
            llm = build(model_dir, mode, disk_path, max_context,
                        redis_server.url if redis_server else None)
            for message in rehearsal:  # compiles every shape the measured turns use
                llm.chat("rehearsal", message, max_tokens=args.answer, ignore_eos=True)
                if llm.store is not None:
                    llm.store.flush()
            llm.end_session("rehearsal")
            for turn, message in enumerate(tqdm(messages, desc=mode, unit="turn")):
                result = llm.chat("conversation", message, max_tokens=args.answer,
                                  ignore_eos=True)
                if llm.store is not None:
                    llm.store.flush()
                results[mode].append(result.ttft_s)
                tokens_per_turn[mode].append(result.token_ids)
                if mode == "hbm":
                    history = llm.engine.conversation("conversation").tokens
                    context.append(len(history) - len(result.token_ids))
                    prompt = history[:context[-1]]
                    one_shot.append(one_shot_ttft(llm, prompt))
            if llm.store is not None:
                store_stats[mode] = llm.store.stats()
                hidden = store_stats[mode]["load_hidden_seconds"]
                loading = store_stats[mode]["load_seconds"]
                print(f"{mode}: {hidden / loading if loading else 0:.1%} of "
                      f"{loading:.3f} s of layer-wise loading hidden behind compute")
            llm.close()
            del llm
    if redis_server is not None:
        redis_server.stop()

    same = all(tokens_per_turn[m] == tokens_per_turn["none"] for m in modes)
    stored = [m for m in STORED if m in modes]
    device = jax.devices()[0].device_kind
    print(f"\nmulti-turn TTFT on {device} ({jax.default_backend()}), {args.model} shape, "
          f"random weights; identical tokens in every mode: {same}")
    header = f"{'turn':>4} {'context':>8} " + " ".join(f"{m + ' s':>9}" for m in modes) + \
        f" {'one-shot s':>10}" + "".join(f" {m + '/one-shot':>15}" for m in stored)
    print(header)
    for turn in range(args.turns):
        row = f"{turn + 1:>4} {context[turn]:>8} " + " ".join(
            f"{results[m][turn]:>9.3f}" for m in modes)
        row += f" {one_shot[turn]:>10.3f}" + "".join(
            f" {results[m][turn] / one_shot[turn]:>15.3f}" for m in stored)
        print(row)
    out = args.json or os.path.join(ROOT, "benchmarks", "results",
                                    f"multiturn-{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "device_kind": device,
                               "cpu": platform.processor(), "cpu_count": os.cpu_count(),
                               "jax": jax.__version__},
                   "args": vars(args), "context_tokens": context, "ttft_s": results,
                   "one_shot_ttft_s": one_shot, "identical_tokens": same,
                   "store_stats": store_stats}, f, indent=2)
    plot(out.replace(".json", ".png"), context, results, one_shot, args.model)
    print(f"\nwrote {out}")


def plot(path, context, results, one_shot, model) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = np.arange(1, len(context) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, ttft in results.items():
        ax.plot(turns, ttft, marker="o", label=f"store: {mode}" if mode != "none"
                else "no store (prefill of the whole context)")
    ax.plot(turns, one_shot, marker="s", linestyle="--", color="black",
            label="one-shot prefill of the history")
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"TTFT per turn, {model} shape on {jax.default_backend()}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
