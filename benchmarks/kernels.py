"""Attention kernels: decode and prefill, every backend beside the dense reference.

    python benchmarks/kernels.py [--quick | --smoke] [--json PATH] [--backends xla,reference]
                                 [--ops decode,prefill,fwd+bwd,mixed]

Decode: batch 8, one query per sequence, pages of 16 tokens scattered at random over the
pool. Prefill: causal, T = S. For each size every backend runs in the same process as
the dense reference; the table gives the median time, the speed-up over the reference,
and the largest difference from it. On a GPU it also gives decode bandwidth as a fraction
of a device-to-device copy of the same bytes, and prefill TFLOP/s beside
`jax.nn.dot_product_attention` (cuDNN's fused attention, and XLA's). A backend that fails
to compile or run at a size is recorded with its error and the others go on. The Pallas
decode kernel also runs reading 2, 4 and 8 pages per step of its loop, and the Pallas
prefill kernel with larger tiles at the longest prefill, to pick their tuning on the
device. Forward + backward (training's gradient in q, k and v) runs at the prefill
lengths beside `jax.nn.dot_product_attention`'s forward + backward. Mixed: the ragged
kernel on a step of 8 decodes and one prefill chunk, at the decode contexts, against the
separate decode and prefill kernels on the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402

from pallas_kernels import (flash_attention, paged_attention,  # noqa: E402
                            ragged_paged_attention)

REFERENCE_BYTES_LIMIT = 6 * 2**30
"""The dense reference is skipped where its score matrices would pass this."""
PAGES_PER_STEP = (2, 4, 8)
"""The Pallas decode kernel's pages per loop step tried beside its default of one."""
PREFILL_TILES = ((128, 64), (64, 128), (128, 128))
"""The Pallas prefill kernel's `(block_q, block_k)` tried beside its default, at the
longest prefill of a run."""


@dataclass
class Shape:
    """Head layout and dtype of the attention being measured."""

    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize


@dataclass
class Row:
    op: str
    size: int
    backend: str
    median_ms: float | None
    speedup_vs_reference: float | None = None
    max_abs_diff_vs_reference: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None


DOT_PRODUCT_ATTENTION = {"cudnn": "jax.nn.dot_product_attention[cudnn]",
                         "xla": "jax.nn.dot_product_attention[xla]"}
"""The GPU prefill baselines, by `implementation=`."""


def timed(fn, args, repeats: int):
    """(median seconds, output) of `fn(*args)`, or (None, error text) if it fails."""
    try:
        seconds = median_seconds(fn, *args, repeats=repeats)
        return seconds, fn(*args)
    except Exception as error:  # a kernel that does not lower on this platform
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"


def timed_row(op: str, size: int, name: str, fn, args, repeats: int, flops: float):
    """`(row, output)`: the row with the median time and TFLOP/s of `fn(*args)`, or with
    its error and output None."""
    seconds, output = timed(fn, args, repeats)
    if seconds is None:
        return Row(op, size, name, None, error=output), None
    return Row(op, size, name, seconds * 1e3, extra={"tflops": flops / seconds / 1e12}), output


def decode_inputs(key, context: int, batch: int, shape: Shape, block_size: int = 16):
    pages = context // block_size
    num_blocks = batch * pages
    dtype = jnp.dtype(shape.dtype)
    kq, kk, kv, kp = jax.random.split(key, 4)
    pool = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
    q = jax.random.normal(kq, (batch, shape.q_heads, shape.head_dim), dtype)
    k_pages = jax.random.normal(kk, pool, dtype)
    v_pages = jax.random.normal(kv, pool, dtype)
    tables = jax.random.permutation(kp, num_blocks).reshape(batch, pages).astype(jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    return q, k_pages, v_pages, tables, lengths


def prefill_inputs(key, length: int, shape: Shape):
    dtype = jnp.dtype(shape.dtype)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (length, shape.q_heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (length, shape.kv_heads, shape.head_dim), dtype)
    v = jax.random.normal(kv, (length, shape.kv_heads, shape.head_dim), dtype)
    return q, k, v


def copy_seconds(num_bytes: int, repeats: int) -> float:
    """Median time of a device-to-device copy of `num_bytes` (read once, written once)."""
    buffer = jnp.ones((num_bytes // 4,), jnp.float32)
    return median_seconds(jax.jit(lambda x: x + 0), buffer, repeats=repeats)


def _compare(rows_for_size: list[Row], outputs: dict) -> None:
    reference = next((r for r in rows_for_size
                      if r.backend == "reference" and r.error is None), None)
    if reference is None:
        return
    want = np.asarray(outputs["reference"], np.float32)
    for row in rows_for_size:
        if row.error is not None:
            continue
        row.speedup_vs_reference = reference.median_ms / row.median_ms
        got = np.asarray(outputs[row.backend], np.float32)
        row.max_abs_diff_vs_reference = float(np.max(np.abs(got - want)))


def decode_variants(backends) -> list[tuple[str, str, dict]]:
    """`(label, backend, keyword arguments)` of each decode row: every backend, and the
    Pallas kernel reading `PAGES_PER_STEP` pages per step of its loop (the GPU kernel's
    tuning; other kernels ignore it)."""
    variants = [(backend, backend, {}) for backend in backends]
    if "pallas" in backends:
        variants += [(f"pallas pages_per_step={pages}", "pallas", {"pages_per_step": pages})
                     for pages in PAGES_PER_STEP]
    return variants


def bench_decode(contexts, backends, shape: Shape, batch: int, repeats: int, on_gpu: bool):
    rows = []
    for context in tqdm(contexts, desc="decode", unit="context"):
        args = decode_inputs(jax.random.key(context), context, batch, shape)
        kv_bytes = 2 * batch * context * shape.kv_heads * shape.head_dim * shape.itemsize
        size_rows, outputs = [], {}
        for label, backend, options in decode_variants(backends):
            fn = jax.jit(lambda *a, b=backend, o=options: paged_attention(*a, backend=b, **o)[0])
            seconds, output = timed(fn, args, repeats)
            if seconds is None:
                size_rows.append(Row("decode", context, label, None, error=output))
                continue
            outputs[label] = output
            extra = {"kv_gbytes_per_s": kv_bytes / seconds / 1e9}
            if on_gpu:
                extra["fraction_of_copy_bandwidth"] = (
                    kv_bytes / seconds) / (2 * kv_bytes / copy_seconds(kv_bytes, repeats))
            size_rows.append(Row("decode", context, label, seconds * 1e3, extra=extra))
        _compare(size_rows, outputs)
        rows += size_rows
        del args, outputs
    return rows


def bench_prefill(lengths, backends, shape: Shape, repeats: int, on_gpu: bool):
    rows = []
    for length in tqdm(lengths, desc="prefill", unit="length"):
        args = prefill_inputs(jax.random.key(length), length, shape)
        flops = 4 * length * length * shape.q_heads * shape.head_dim / 2  # causal half
        score_bytes = 3 * shape.q_heads * length * length * 4
        runnable = [b for b in backends
                    if b != "reference" or score_bytes <= REFERENCE_BYTES_LIMIT]
        if on_gpu:
            runnable += DOT_PRODUCT_ATTENTION.values()
        tiles = {}
        if "pallas" in backends and length == max(lengths):
            tiles = {f"pallas block_q={q} block_k={k}": {"block_q": q, "block_k": k}
                     for q, k in PREFILL_TILES}
            runnable += list(tiles)
        size_rows, outputs = [], {}
        for backend in runnable:
            implementation = next((i for i, name in DOT_PRODUCT_ATTENTION.items()
                                   if name == backend), None)
            if implementation is not None:
                fn = jax.jit(lambda q, k, v, i=implementation: jax.nn.dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, implementation=i)[0])
            elif backend in tiles:
                fn = jax.jit(lambda *a, t=tiles[backend]: flash_attention(
                    *a, backend="pallas", **t)[0])
            else:
                fn = jax.jit(lambda *a, b=backend: flash_attention(*a, backend=b)[0])
            row, output = timed_row("prefill", length, backend, fn, args, repeats, flops)
            size_rows.append(row)
            if output is not None:
                outputs[backend] = output
        _compare(size_rows, outputs)
        baseline = next((r for r in size_rows if r.error is None
                         and r.backend in DOT_PRODUCT_ATTENTION.values()), None)
        if baseline is not None:
            for row in size_rows:
                if row.error is not None:
                    continue
                row.extra[f"tflops_vs_{baseline.backend}"] = (
                    row.extra["tflops"] / baseline.extra["tflops"])
        rows += size_rows
        del args, outputs
    return rows


def bench_training(lengths, backends, shape: Shape, repeats: int, on_gpu: bool):
    """Forward + backward of causal attention, T = S: the gradient in q, k and v of
    `sum(out * cotangent)`, as training takes it, against `jax.nn.dot_product_attention`'s
    forward + backward (XLA's autodiff of dense attention; and cuDNN's on a GPU). The
    difference is to XLA's dense gradient; `vs_baseline` is the baseline's time over
    this row's (above 1: faster)."""
    baselines = list(DOT_PRODUCT_ATTENTION) if on_gpu else ["xla"]
    rows = []
    for length in tqdm(lengths, desc="fwd+bwd", unit="length"):
        q, k, v = prefill_inputs(jax.random.key(length), length, shape)
        cotangent = jax.random.normal(jax.random.key(-length), q.shape, q.dtype)
        flops = 3.5 * 4 * length * length * shape.q_heads * shape.head_dim / 2
        dense_fits = 3 * shape.q_heads * length * length * 4 <= REFERENCE_BYTES_LIMIT
        attends = {DOT_PRODUCT_ATTENTION[i]: (lambda q, k, v, i=i: jax.nn.dot_product_attention(
            q[None], k[None], v[None], is_causal=True, implementation=i)[0])
            for i in baselines if dense_fits or i != "xla"}
        attends.update({b: (lambda q, k, v, b=b: flash_attention(q, k, v, backend=b)[0])
                        for b in backends if b != "reference" or dense_fits})
        size_rows, grads = [], {}
        for name, attend in attends.items():
            fn = jax.jit(jax.grad(lambda q, k, v, a=attend: jnp.sum(
                a(q, k, v).astype(jnp.float32) * cotangent), argnums=(0, 1, 2)))
            row, output = timed_row("fwd+bwd", length, name, fn, (q, k, v), repeats, flops)
            size_rows.append(row)
            if output is not None:
                grads[name] = output
        dense = grads.get(DOT_PRODUCT_ATTENTION["xla"])
        baseline = next((r for r in size_rows if r.error is None
                         and r.backend == DOT_PRODUCT_ATTENTION[baselines[0]]), None)
        for row in size_rows:
            if row.error is not None:
                continue
            if dense is not None:
                row.max_abs_diff_vs_reference = max(
                    float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                    for g, w in zip(grads[row.backend], dense))
            if baseline is not None:
                row.extra[f"vs_{baseline.backend}"] = baseline.median_ms / row.median_ms
        rows += size_rows
        del q, k, v, grads
    return rows


def mixed_inputs(key, context: int, decodes: int, chunk: int, shape: Shape,
                 block_size: int = 16):
    """A step as the engine packs it: `decodes` sequences of `context` tokens with one new
    query each, then one sequence's prefill chunk of `chunk` queries ending at `context`;
    every page scattered over the pool. Returns the ragged call's arguments and the prefill
    sequence's keys and values laid out contiguously (for the separate kernels)."""
    sequences = decodes + 1
    q, k_pages, v_pages, tables, lengths = decode_inputs(key, context, sequences, shape,
                                                         block_size)
    rows = jax.random.normal(jax.random.fold_in(key, 1),
                             (decodes + chunk, shape.q_heads, shape.head_dim), q.dtype)
    query_starts = jnp.asarray(list(range(decodes + 1)) + [decodes + chunk], jnp.int32)
    contiguous = [pages[tables[decodes]].reshape(context, shape.kv_heads, shape.head_dim)
                  for pages in (k_pages, v_pages)]
    return (rows, k_pages, v_pages, tables, query_starts, lengths), contiguous


def bench_mixed(contexts, backends, shape: Shape, decodes: int, chunk: int, repeats: int):
    """The ragged kernel on a mixed step (decodes and a prefill chunk in one call) against
    the separate kernels on the same work: `paged_attention` for the decodes plus
    `flash_attention` for the chunk over its keys laid out contiguously (their best case).
    `vs_separate` is the separate kernels' time over the ragged one's (above 1: faster)."""
    rows = []
    for context in tqdm(contexts, desc="mixed", unit="context"):
        ragged_args, (k_seq, v_seq) = mixed_inputs(jax.random.key(context), context, decodes,
                                                   chunk, shape)
        q, k_pages, v_pages, tables, _, lengths = ragged_args
        for backend in backends:
            ragged = jax.jit(lambda *a, b=backend: ragged_paged_attention(*a, backend=b)[0])
            decode = jax.jit(lambda *a, b=backend: paged_attention(*a, backend=b)[0])
            prefill = jax.jit(lambda *a, b=backend: flash_attention(
                *a, causal=True, q_offset=context - chunk, backend=b)[0])
            seconds, output = timed(ragged, ragged_args, repeats)
            decode_args = (q[:decodes], k_pages, v_pages, tables[:decodes], lengths[:decodes])
            decode_s, decode_out = timed(decode, decode_args, repeats)
            prefill_s, prefill_out = timed(prefill, (q[decodes:], k_seq, v_seq), repeats)
            failed = next((o for t, o in ((seconds, output), (decode_s, decode_out),
                                          (prefill_s, prefill_out)) if t is None), None)
            if failed is not None:
                rows.append(Row("mixed", context, backend, None, error=failed))
                continue
            separate = jnp.concatenate([decode_out, prefill_out]).astype(jnp.float32)
            rows.append(Row("mixed", context, backend, seconds * 1e3,
                            max_abs_diff_vs_reference=float(jnp.max(jnp.abs(
                                output.astype(jnp.float32) - separate))),
                            extra={"separate_ms": (decode_s + prefill_s) * 1e3,
                                   "vs_separate": (decode_s + prefill_s) / seconds}))
        del ragged_args, k_seq, v_seq
    return rows


def print_table(rows: list[Row]) -> None:
    header = f"{'op':8} {'size':>6} {'backend':30} {'median ms':>10} {'vs ref':>7} " \
             f"{'max|diff|':>9}  figures"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.error is not None:
            print(f"{row.op:8} {row.size:>6} {row.backend:30} failed: {row.error}")
            continue
        speedup = "" if row.speedup_vs_reference is None else f"{row.speedup_vs_reference:.2f}x"
        diff = "" if row.max_abs_diff_vs_reference is None else \
            f"{row.max_abs_diff_vs_reference:.1e}"
        figures = "  ".join(f"{k}={v:.3g}" for k, v in row.extra.items())
        print(f"{row.op:8} {row.size:>6} {row.backend:30} {row.median_ms:>10.3f} "
              f"{speedup:>7} {diff:>9}  {figures}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes, about a minute")
    sizes.add_argument("--smoke", action="store_true",
                       help="tiny sizes and heads: checks that every path runs")
    parser.add_argument("--json", default=None, help="where to write the results")
    parser.add_argument("--backends", default=None,
                        help="comma-separated; default: pallas (GPU/TPU only), xla, reference")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--ops", default="decode,prefill,fwd+bwd,mixed",
                        help="comma-separated: which of decode, prefill, fwd+bwd, mixed "
                             "to run")
    args = parser.parse_args(argv)

    here = jax.default_backend()
    on_gpu = here == "gpu"
    backends = (args.backends.split(",") if args.backends else
                (["pallas"] if here in ("gpu", "tpu") else []) + ["xla", "reference"])
    dtype = "float32" if here == "cpu" else "bfloat16"
    decode_shape = Shape(32, 8, 128, dtype)
    prefill_shape = Shape(8, 2, 64, dtype) if here == "cpu" else Shape(32, 8, 128, dtype)
    if args.smoke:
        decode_shape = prefill_shape = Shape(4, 2, 64, dtype)
        contexts, lengths, repeats = [256], [128], args.repeats or 2
        mixed_chunk = 64
    elif args.quick:
        contexts, lengths, repeats = [1024, 4096], [512, 1024], args.repeats or 3
        mixed_chunk = 256
    else:
        contexts, lengths = [1024, 4096, 16384, 32768], [512, 1024, 2048, 4096, 8192]
        repeats = args.repeats or 5
        mixed_chunk = 512

    benches = {"decode": lambda: bench_decode(contexts, backends, decode_shape, 8, repeats,
                                              on_gpu),
               "prefill": lambda: bench_prefill(lengths, backends, prefill_shape, repeats,
                                                on_gpu),
               "fwd+bwd": lambda: bench_training(lengths, backends, prefill_shape, repeats,
                                                 on_gpu),
               "mixed": lambda: bench_mixed(contexts, [b for b in backends if b != "reference"],
                                            decode_shape, 8, mixed_chunk, repeats)}
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(benches))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {sorted(benches)}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"kernels-{here}{'-quick' if args.quick else ''}"
                                     f"{'-smoke' if args.smoke else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = []
    for op in ops:  # the JSON is rewritten after each op: a run cut short keeps what it did
        rows += benches[op]()
        result = {
            "machine": {"platform": here, "device_kind": jax.devices()[0].device_kind,
                        "device_count": jax.device_count(), "cpu": platform.processor(),
                        "cpu_count": os.cpu_count(), "jax": jax.__version__},
            "decode_shape": asdict(decode_shape), "prefill_shape": asdict(prefill_shape),
            "decode_batch": 8, "mixed_chunk": mixed_chunk, "repeats": repeats,
            "ops_done": ops[:ops.index(op) + 1], "rows": [asdict(r) for r in rows],
        }
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    print(f"\njattn kernels on {jax.devices()[0].device_kind} ({here}), "
          f"decode {decode_shape}, prefill {prefill_shape}, median of {repeats}")
    print_table(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
