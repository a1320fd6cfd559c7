"""DistAttention evidence on a mesh of (simulated) devices.

    python benchmarks/dist_attention.py [--devices 8] [--quick]

Three tables, written to JSON too:

  collectives   bytes moved by collectives in one decode step of `jattn.distributed.
                paged_attention` (Llama-3-8B heads, batch 8, one layer), read from the
                compiled HLO, for contexts 1K to 64K: constant in the context.
  max context   the longest sequence `LLM(kv_parallel=N)` runs with a fixed pool per
                device (tiny-llama3-random, 32 blocks of 16 tokens a device), for N = 1,
                2, 4, 8: run at that length, refused one block past it.
  step time     one decode step of that model against context, on N devices and on 1.

On CPU the devices are simulated (`--xla_force_host_platform_device_count`) and share
the host's cores, so step times show the overhead of the mesh, not its speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402  (XLA_FLAGS must be set before jax is imported)
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402

from jattn import LLM  # noqa: E402
from jattn.distributed import paged_attention  # noqa: E402
from jattn.engine.errors import PromptTooLong  # noqa: E402
from jattn.model.kv_cache import blocks_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "..", "shared", "models", "tiny-llama3-random")
COLLECTIVE = re.compile(r"= (\([^=]*?\)|[a-z0-9]+\[[0-9,]*\][^ ]*) "
                        r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")
SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s64": 8}


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in compiled HLO text."""
    totals: dict[str, int] = {}
    for result, kind in COLLECTIVE.findall(hlo):
        size = sum(BYTES[dtype] * int(np.prod([int(x) for x in dims.split(",") if x] or [1]))
                   for dtype, dims in SHAPE.findall(result))
        totals[kind] = totals.get(kind, 0) + size
    return totals


def mesh_of(devices: int):
    return jax.make_mesh((devices,), ("kv",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])


def collectives_table(contexts, devices: int) -> list[dict]:
    batch, hq, hkv, d, block_size = 8, 32, 8, 128, 16
    mesh = mesh_of(devices)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("kv"))
    rows = []
    for context in tqdm(contexts, desc="collectives", unit="context"):
        pages = batch * blocks_for(context, block_size)
        pages = -(-pages // devices) * devices
        pool = jax.ShapeDtypeStruct((pages, block_size, hkv, d), jnp.bfloat16, sharding=sharded)
        q = jax.ShapeDtypeStruct((batch, hq, d), jnp.bfloat16)
        tables = jax.ShapeDtypeStruct((batch, blocks_for(context, block_size)), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        inv_freq = jnp.ones((d // 2,), jnp.float32)
        step = jax.jit(lambda q, k, v, t, n: paged_attention(
            q, k, v, t, n, mesh=mesh, key_rope_inv_freq=inv_freq))
        hlo = step.lower(q, pool, pool, tables, lengths).compile().as_text()
        totals = collective_bytes(hlo)
        rows.append({"context": context, "kv_bytes": 2 * pages * block_size * hkv * d * 2,
                     "collective_bytes": sum(totals.values()), "by_kind": totals})
    return rows


def max_context_table(device_counts, blocks_per_device: int, new_tokens: int) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for devices in tqdm(device_counts, desc="max context", unit="mesh"):
        llm = LLM(TINY, store=None, kv_parallel=devices, num_blocks=blocks_per_device * devices)
        capacity = blocks_per_device * devices * llm.runner.block_size
        longest = min(capacity, llm.max_context)
        prompt = rng.integers(3, llm.config.vocab_size, size=longest - new_tokens).tolist()
        ran = len(llm.generate(prompt, max_tokens=new_tokens, ignore_eos=True).token_ids)
        refused = None
        if capacity < llm.max_context:
            try:
                llm.generate(prompt + [5] * llm.runner.block_size, max_tokens=new_tokens,
                             ignore_eos=True)
            except PromptTooLong as error:
                refused = str(error)
        rows.append({"devices": devices, "blocks_per_device": blocks_per_device,
                     "max_context_tokens": longest, "generated": ran, "one_block_more": refused})
    return rows


def step_time_table(contexts, devices: int, repeats: int) -> list[dict]:
    rows = []
    for count in (1, devices):
        llm = LLM(TINY, store=None, kv_parallel=count,
                  num_blocks=-(-blocks_for(max(contexts) + 1, 16) // count) * count)
        runner = llm.runner
        for context in tqdm(contexts, desc=f"step time on {count}", unit="context"):
            blocks = llm.chats.blocks.allocate(blocks_for(context + 1, runner.block_size))
            runner.prefill([7] * context, 0, blocks)
            seconds = median_seconds(lambda: runner.decode([7], [context], [blocks]),
                                     repeats=repeats)
            llm.chats.blocks.free(blocks)
            rows.append({"devices": count, "context": context, "step_ms": seconds * 1e3})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    contexts = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    collectives = collectives_table(contexts, args.devices)
    counts = [n for n in (1, 2, 4, 8) if n <= args.devices]
    max_context = max_context_table(counts, blocks_per_device=32, new_tokens=8)
    step_contexts = [256, 1024] if args.quick else [256, 512, 1024, 2048, 4000]
    steps = step_time_table(step_contexts, args.devices, repeats=3 if args.quick else 7)

    print(f"\ncollective bytes per decode step, one layer, {args.devices} devices, "
          "batch 8, 32 q heads / 8 kv heads x 128, bf16")
    print(f"{'context':>8} {'KV bytes':>14} {'collective bytes':>17}  by kind")
    for row in collectives:
        print(f"{row['context']:>8} {row['kv_bytes']:>14,} {row['collective_bytes']:>17,}  "
              f"{row['by_kind']}")
    print("\nlongest context with 32 blocks x 16 tokens per device (tiny-llama3-random)")
    print(f"{'devices':>8} {'max context':>12}  one block more")
    for row in max_context:
        print(f"{row['devices']:>8} {row['max_context_tokens']:>12}  "
              f"{'refused: ' + row['one_block_more'] if row['one_block_more'] else '-'}")
    print("\ndecode step time (ms), tiny-llama3-random, batch 1")
    print(f"{'context':>8} " + " ".join(f"{n:>3} device(s)" for n in (1, args.devices)))
    for context in step_contexts:
        times = [r["step_ms"] for r in steps if r["context"] == context]
        print(f"{context:>8} " + " ".join(f"{t:>13.2f}" for t in times))
    out = args.json or os.path.join(ROOT, "benchmarks", "results",
                                    f"dist-attention-{jax.default_backend()}"
                                    f"{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "cpu": platform.processor(),
                               "cpu_count": os.cpu_count(), "jax": jax.__version__,
                               "devices": args.devices},
                   "collectives": collectives, "max_context": max_context,
                   "step_time": steps}, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
