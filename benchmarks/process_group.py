"""DistAttention over a group of processes against one process, same eight-device mesh.

    python benchmarks/process_group.py [--quick] [--json PATH]

Runs the same model twice, each time in fresh processes on loopback:

  1 process     eight simulated CPU devices in one process (collectives in memory);
  2 processes   a `jax.distributed` group of two processes of four devices each
                (collectives over gloo/TCP), process 0 leading, process 1 following.

The pool is sharded over all eight devices either way (tiny-llama3-random, random
weights, float32). For each context length: one decode step of one sequence, median
wall time on process 0 (for the group, the step message to the follower included), and
the bytes the step's collectives move, read from the compiled HLO of the model's decode
step (every layer): constant in the context. For the group, also the store's round trip
for each context: its blocks saved by the processes whose devices hold them into their
own host memory, then loaded back onto those processes' devices (median ms), and the
collective bytes of those copies against one copy of the blocks to every process. Prints
tables; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "..", "shared", "models", "tiny-llama3-random")
DEVICES = 8


def worker(args) -> None:
    """One process of a run: builds the model over the eight-device mesh; process 0
    times the decode steps and writes them to `args.out`, the others follow."""
    import jax

    if args.processes > 1:
        jax.config.update("jax_num_cpu_devices", DEVICES // args.processes)
        from jattn.distributed import group

        group.initialize(f"127.0.0.1:{args.port}", args.processes, args.process_id)
    from dist_attention import collective_bytes
    from jattn import LLM, StoreConfig
    from jattn.model.kv_cache import blocks_for
    from timing import median_seconds

    block_size = 16
    blocks = -(-2 * blocks_for(max(args.contexts) + 1, block_size) // DEVICES) * DEVICES
    grouped = args.processes > 1
    store = StoreConfig(hbm_bytes=0, host_bytes=1 << 30, block_size=block_size) if grouped \
        else None
    llm = LLM(TINY, random_weights=True, store=store, kv_parallel=DEVICES, num_blocks=blocks,
              max_running=1)
    if jax.process_index() != 0:
        llm.follow()
        return
    runner, pool = llm.runner, llm.chats.blocks
    step_bytes = collective_bytes(runner.compiled_text(1)["decode"])
    rows = []
    for context in args.contexts:
        owned = pool.allocate(blocks_for(context + 1, block_size))
        runner.prefill([7] * context, 0, owned)
        seconds = median_seconds(lambda: runner.decode([7], [context], [owned]),
                                 repeats=args.repeats)
        row = {"context": context, "step_ms": seconds * 1e3,
               "collective_bytes": sum(step_bytes.values()), "by_kind": step_bytes}
        if grouped:
            row.update(store_round_trip(llm, owned, args.repeats))  # frees `owned`
        else:
            pool.free(owned)
        rows.append(row)
    llm.close()
    with open(args.out, "w") as f:
        json.dump(rows, f)


def store_round_trip(llm, owned: list[int], repeats: int) -> dict:
    """In a group: the context's pool blocks `owned` saved by the processes holding them
    into their own host memory (a plan of saves alone, then a flush), then loaded back
    (median ms of each), and the collective bytes of those copies (the compiled
    programs) against a copy of the same blocks to every process (a replicated read of
    the pool, what a store on process 0 alone needs). Frees `owned` before the loads,
    which go back to the devices of the same processes."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from dist_attention import collective_bytes
    from jattn.model.kv_cache import bucket
    from jattn.model.step_functions import read_blocks
    from jattn.model.step_plan import BlockSave, StepPlan
    from timing import median_seconds

    runner, store, pool = llm.runner, llm.store, llm.chats.blocks

    def save():
        keys = [os.urandom(16) for _ in owned]  # new keys: every save does its work
        llm.chats.run(StepPlan(saves=tuple(BlockSave(key, block)
                                           for key, block in zip(keys, owned))))
        store.flush()
        return keys

    save_seconds = median_seconds(save, repeats=repeats)
    keys = save()
    width = bucket(max(sum(pool.allocator.device_of(b) == d for b in owned)
                       for d in range(DEVICES)), minimum=1)
    pool.free(owned)

    def load():
        run = store.load_run(keys, pool)
        assert len(run) == len(keys), "a block saved was not loaded"
        pool.free(run.block_ids)

    load_seconds = median_seconds(load, repeats=repeats)
    programs = runner.compiled_text(width)
    replicated = NamedSharding(runner.pool.k[0].sharding.mesh, PartitionSpec())
    ids = np.zeros(bucket(len(owned), minimum=1), np.int32)
    everywhere = jax.jit(read_blocks, out_shardings=(replicated, replicated)).lower(
        runner.pool, ids).compile().as_text()
    return {"blocks": len(owned), "save_ms": save_seconds * 1e3,
            "load_ms": load_seconds * 1e3,
            "own_copy_collective_bytes": sum(collective_bytes(programs["read"]).values())
            + sum(collective_bytes(programs["write"]).values()),
            "copy_to_every_process_collective_bytes": sum(collective_bytes(everywhere).values())}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, args, directory: str) -> list[dict]:
    """The rows of one run of `processes` fresh processes."""
    out = os.path.join(directory, f"{processes}.json")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    # One process simulates all eight devices; a group's processes set their own count.
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={DEVICES}"
                        if processes == 1 else "")
    launched = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", "--processes", str(processes),
         "--process-id", str(i), "--port", str(port), "--out", out, "--repeats",
         str(args.repeats), "--contexts", ",".join(map(str, args.contexts))],
        cwd=ROOT, env=env) for i in range(processes)]
    for process in launched:
        if process.wait(timeout=1800):
            raise RuntimeError(f"a process of the {processes}-process run failed")
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--contexts", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 9)
    args.contexts = ([int(c) for c in args.contexts.split(",")] if args.contexts else
                     [256, 1024] if args.quick else [256, 512, 1024, 2048, 4000])
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as directory:
        runs = {n: run(n, args, directory) for n in (1, 2)}
    print(f"\ndecode step, tiny-llama3-random, batch 1, KV over {DEVICES} CPU devices "
          f"({platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'context':>8} {'1 process ms':>13} {'2 processes ms':>15} {'ratio':>6} "
          f"{'collective bytes (1 / 2)':>25}")
    rows = []
    for one, two in zip(runs[1], runs[2]):
        ratio = two["step_ms"] / one["step_ms"]
        rows.append({"context": one["context"], "one_process": one, "two_processes": two,
                     "step_ratio": ratio})
        print(f"{one['context']:>8} {one['step_ms']:>13.2f} {two['step_ms']:>15.2f} "
              f"{ratio:>6.2f} {one['collective_bytes']:>12,} / {two['collective_bytes']:,}")
    print("\nthe group's store: a context's blocks saved by the processes whose devices hold "
          "them, into their own host memory, and loaded back (2 processes)")
    print(f"{'context':>8} {'blocks':>7} {'save ms':>8} {'load ms':>8} "
          f"{'collective bytes: own copies / to every process':>48}")
    for two in runs[2]:
        print(f"{two['context']:>8} {two['blocks']:>7} {two['save_ms']:>8.2f} "
              f"{two['load_ms']:>8.2f} {two['own_copy_collective_bytes']:>24,} / "
              f"{two['copy_to_every_process_collective_bytes']:,}")
    import jax

    out = args.json or os.path.join(ROOT, "benchmarks", "results",
                                    f"process-group-cpu{'-quick' if args.quick else ''}.json")
    with open(out, "w") as f:
        json.dump({"machine": {"cpu": platform.processor(), "cpu_count": os.cpu_count(),
                               "jax": jax.__version__, "devices": DEVICES}, "rows": rows},
                  f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
