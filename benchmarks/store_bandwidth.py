"""AttentionStore load bandwidth from host memory and from disk, against raw copies.

    python benchmarks/store_bandwidth.py [--blocks 128] [--repeats 5]

Blocks have the shape of a Llama-3-8B KV block (32 layers, 16 tokens, 8 KV heads, dim 128,
bfloat16: 2 MiB of keys and values). In the same run:

  host tier   `get` every block and move it to the device layer by layer
              (`load_layers`, the chat path's loading), against `np.copyto` of the same
              bytes into a preallocated buffer: once with the blocks saved as one turn
              (views of one layer-major array, as the chat engine saves a turn: each
              layer goes to the device as it is, which on CPU is no copy at all), once
              saved one by one (separate arrays, as blocks read back from disk are:
              staged, one copy);
  disk tier   `get` every block from its file (read, checksum, parse), and `get_run` of
              them all, as a turn looks its blocks up (read together into one
              layer-major array), against a raw read of the same files that keeps their
              bytes: `os.preadv` of each into its place in one buffer of them all,
              already in memory. (A loop of `f.read()` that drops each file's bytes is
              also printed: it reads them into the same few MiB again and again, which
              the CPU's cache holds; a store keeps what it reads.)

Both read the files from the page cache, as a repeated load does. Not in any row: the
arriving step's write of each layer into the pool (a copy on the device). The host rows are also
compared with the link's own rate, a bare `device_put` of one `pinned_host` array of the
same bytes to the device: on an accelerator, one DMA over the link; on CPU, XLA's copy
between two memory kinds of the same memory (1.6 GB/s on a 2-core x86 host with jax
0.10.2, a sixth of `np.copyto`: on CPU the host tier's numpy arrays are the device's
own memory already).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import ml_dtypes
import numpy as np

from jattn.store import AttentionStore, BlockKV, StoreConfig
from jattn.store.layer_load import saved_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 16, 8, 128)


def median_time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def pinned_put_time(nbytes: int, repeats: int) -> float | None:
    """Seconds of one `device_put` of a `pinned_host` array of `nbytes` to the device,
    median of `repeats`; None where the device has no `pinned_host` memory."""
    device = jax.devices()[0]
    if "pinned_host" not in {memory.kind for memory in device.addressable_memories()}:
        return None
    pinned = jax.device_put(np.ones(nbytes, np.uint8), jax.sharding.SingleDeviceSharding(
        device, memory_kind="pinned_host")).block_until_ready()
    on_device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    return median_time(lambda: jax.device_put(pinned, on_device).block_until_ready(), repeats)


def block_key(index: int) -> bytes:
    """The 16-byte block key the benchmark's block `index` is saved and loaded under (the
    engine computes it from the block's tokens and context; any distinct key will do)."""
    return index.to_bytes(16, "little")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    blocks = [BlockKV(rng.standard_normal(SHAPE).astype(ml_dtypes.bfloat16),
                      rng.standard_normal(SHAPE).astype(ml_dtypes.bfloat16))
              for _ in range(args.blocks)]
    total = sum(b.nbytes for b in blocks)
    rows = {}
    turn_k, turn_v = (saved_run(np.stack([getattr(b, name) for b in blocks], axis=1))
                      for name in ("k", "v"))  # [L, blocks, ...], as a turn is saved
    with tempfile.TemporaryDirectory() as disk_path:
        turns = AttentionStore(StoreConfig(host_bytes=2 * total), fingerprint="b" * 64)
        for index in range(args.blocks):
            turns.save(block_key(index), lambda i=index: BlockKV(turn_k[:, i], turn_v[:, i]))
        turns.flush()
        host = AttentionStore(StoreConfig(host_bytes=2 * total), fingerprint="b" * 64)
        disk = AttentionStore(StoreConfig(host_bytes=0, disk_bytes=2 * total,
                                          disk_path=disk_path), fingerprint="b" * 64)
        for index, block in enumerate(blocks):
            host.save(block_key(index), lambda b=block: b)
            disk.save(block_key(index), lambda b=block: b)
        host.flush()
        disk.flush()

        def load_from(store):
            found = [store.get(block_key(i))[0] for i in range(args.blocks)]
            load = store.load_layers(found)
            jax.block_until_ready([(piece.k, piece.v) for layer in range(SHAPE[0])
                                   for piece in load.layer(layer)])

        source = np.concatenate([np.concatenate([b.k.ravel(), b.v.ravel()]) for b in blocks])
        target = np.empty_like(source)
        copy_s = median_time(lambda: np.copyto(target, source), args.repeats)
        rows["host, one turn"] = (median_time(lambda: load_from(turns), args.repeats), copy_s)
        rows["host, single blocks"] = (median_time(lambda: load_from(host), args.repeats),
                                       copy_s)

        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(disk_path) for f in fs
                       if f.endswith(".kv"))

        def load_disk():
            for i in range(args.blocks):
                assert disk.get(block_key(i))[1] == "disk"

        kept = np.ones(sum(os.path.getsize(path) for path in files), np.uint8)

        def raw_read():
            offset = 0
            for path in files:
                fd = os.open(path, os.O_RDONLY)
                size = os.fstat(fd).st_size
                os.preadv(fd, [kept[offset:offset + size]], 0)
                os.close(fd)
                offset += size

        def dropped_read():
            for path in files:
                with open(path, "rb") as f:
                    f.read()

        def load_disk_run():
            assert len(disk.get_run([block_key(i) for i in range(args.blocks)])) == args.blocks

        raw_s = median_time(raw_read, args.repeats)
        dropped_s = median_time(dropped_read, args.repeats)
        rows["disk"] = (median_time(load_disk, args.repeats), raw_s)
        rows["disk, one run"] = (median_time(load_disk_run, args.repeats), raw_s)
        host.close()
        turns.close()
        disk.close()

    pinned_s = pinned_put_time(total, args.repeats)
    pinned = f"{total / pinned_s / 1e9:.2f}" if pinned_s else "-"
    print(f"\nstore load bandwidth, {args.blocks} blocks of {SHAPE} bf16 K+V "
          f"({total / 2**20:.0f} MiB), median of {args.repeats}; a bare pinned_host "
          f"device_put of the same bytes: {pinned} GB/s; f.read() of the files, "
          f"dropping their bytes: {total / dropped_s / 1e9:.2f} GB/s")
    print(f"{'tier':20} {'store GB/s':>11} {'baseline':>22} {'baseline GB/s':>14} "
          f"{'ratio':>6} {'x pinned put':>13}")
    result = {}
    for tier, (store_s, base_s) in rows.items():
        baseline = "raw read, bytes kept" if tier.startswith("disk") else "np.copyto"
        ratio = base_s / store_s
        to_pinned = pinned_s / store_s if pinned_s and tier.startswith("host") else None
        print(f"{tier:20} {total / store_s / 1e9:>11.2f} {baseline:>22} "
              f"{total / base_s / 1e9:>14.2f} {ratio:>6.2f} "
              f"{'-' if to_pinned is None else f'{to_pinned:.2f}':>13}")
        result[tier] = {"store_gbytes_per_s": total / store_s / 1e9, "baseline": baseline,
                        "baseline_gbytes_per_s": total / base_s / 1e9, "ratio": ratio,
                        "ratio_to_pinned_put": to_pinned}
    out = args.json or os.path.join(ROOT, "benchmarks", "results",
                                    f"store-bandwidth-{jax.default_backend()}.json")
    with open(out, "w") as f:
        json.dump({"machine": {"platform": jax.default_backend(), "cpu": platform.processor(),
                               "cpu_count": os.cpu_count(), "jax": jax.__version__},
                   "device": jax.devices()[0].device_kind,
                   "bytes": total, "blocks": args.blocks, "repeats": args.repeats,
                   "pinned_put_gbytes_per_s": total / pinned_s / 1e9 if pinned_s else None,
                   "dropped_read_gbytes_per_s": total / dropped_s / 1e9,
                   "tiers": result}, f, indent=2)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
