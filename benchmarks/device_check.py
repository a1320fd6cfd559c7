"""One prepared check of an accelerator: kernel tests compiled, kernel speed, multi-turn
TTFT from each tier, and the server under load. Run through `device_check.sh`.

    benchmarks/device_check.sh [--cpu] [--steps kernel_tests,kernels,...] OUT_DIR

Steps, each a subprocess under its own time limit (a step that fails or runs out of time
is recorded and the next one runs):

  kernel_tests  the kernel tests (prefill, paged decode, merge, block positions, ragged
                batches, gradients through the backward kernels) of the Pallas GPU
                kernels against the float64 oracle: compiled on
                a GPU (about 3 s of compilation a case), interpreted on a CPU.
  kernels       `benchmarks/kernels.py`: decode bandwidth against a device copy of the
                same bytes (4K–32K, Llama-3-8B heads, bf16), prefill against
                `jax.nn.dot_product_attention` (1K–8K), and forward+backward against its
                forward+backward (cuDNN's and XLA's).
  multiturn     `benchmarks/multiturn.py` on Llama-3.2-1B's shape, random bf16 weights:
                TTFT per turn from the device, host and disk tiers against a one-shot
                prefill, and the share of layer-wise loading hidden behind compute.
  serve_load    `benchmarks/serve_load.py` on the same shape over gRPC (token ids: the
                shape has no tokenizer), with and without reuse.
  engine_overhead  `benchmarks/engine_overhead.py`: host time per step and the device's
                idle time between steps, with overlapped scheduling and without.
  store_bandwidth  `benchmarks/store_bandwidth.py`: the host and disk tiers' load rate
                against `np.copyto`, a raw read and a bare `pinned_host` `device_put`.

`--cpu` runs every step on tiny shapes in about two minutes, so CI keeps the script
working. Under OUT_DIR: `device_check.json` (the machine, each step's status, seconds and
parsed results, every kernel test's outcome), `device_check.log` (every step's output),
and each benchmark's own JSON (`kernels.json`, `multiturn.json` with its plot,
`serve_load.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_MODEL = os.path.join(ROOT, "jattn", "models", "stories260K")
KERNEL_TEST_FILES = ("tests/test_flash_attention.py", "tests/test_paged_attention.py",
                     "tests/test_merge_attention.py", "tests/test_block_positions.py",
                     "tests/test_ragged_attention.py", "tests/test_flash_gradients.py")
STEP_NAMES = ("kernel_tests", "kernels", "multiturn", "serve_load", "engine_overhead",
              "store_bandwidth")
TEST_OUTCOME = re.compile(r"^(tests/\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


@dataclass
class Step:
    """One subprocess of the check: `argv` after the Python interpreter."""

    name: str
    argv: list[str]
    timeout_s: int


@dataclass
class Outcome:
    name: str
    returncode: int | None
    """None: stopped at its time limit."""
    seconds: float
    timeout_s: int


def steps(out_dir: str, cpu: bool) -> list[Step]:
    """The check's steps; `cpu`: tiny shapes. GPU limits sum to 570 s."""
    select = ("not pallas_tpu and not pallas_random and bfloat16" if cpu else
              "not pallas_tpu and not pallas_random and not reference and not xla")
    kernel_tests = ["-m", "pytest", "-v", "-p", "no:cacheprovider", "--tb=line",
                    "--timeout=120", "-k", select, *KERNEL_TEST_FILES]
    kernels = ["benchmarks/kernels.py", "--json", os.path.join(out_dir, "kernels.json")]
    multiturn = ["benchmarks/multiturn.py", "--json", os.path.join(out_dir, "multiturn.json")]
    serve_load = ["benchmarks/serve_load.py", "--random-weights", "--token-ids",
                  "--transports", "grpc", "--no-warm-up",
                  "--json", os.path.join(out_dir, "serve_load.json")]
    engine_overhead = ["benchmarks/engine_overhead.py", "--random-weights",
                       "--json", os.path.join(out_dir, "engine_overhead.json")]
    store_bandwidth = ["benchmarks/store_bandwidth.py",
                       "--json", os.path.join(out_dir, "store_bandwidth.json")]
    if cpu:
        return [
            Step("kernel_tests", kernel_tests, 300),
            Step("kernels", kernels + ["--smoke", "--backends", "pallas,xla,reference"], 120),
            Step("multiturn", multiturn + ["--model", EMBEDDED_MODEL, "--first-turn", "40",
                                           "--later-turns", "8", "--answer", "4",
                                           "--turns", "2"], 180),
            Step("serve_load", serve_load + ["--model", EMBEDDED_MODEL, "--clients", "2",
                                             "--turns", "2", "--first-words", "10",
                                             "--max-tokens", "4", "--num-blocks", "128"], 180),
            Step("engine_overhead", engine_overhead + ["--model", EMBEDDED_MODEL, "--turns",
                                                       "1,2", "--tokens", "8",
                                                       "--prefill-chunk", "32"], 180),
            Step("store_bandwidth", store_bandwidth + ["--blocks", "4", "--repeats", "2"], 120),
        ]
    llama_1b = os.path.join(ROOT, "configs", "models", "llama-3.2-1b")
    return [
        Step("kernel_tests", kernel_tests, 100),  # 48 s on an H200
        Step("kernels", kernels, 150),  # with the tuning variants and forward+backward
        Step("multiturn", multiturn + ["--model", llama_1b, "--first-turn", "4000",
                                       "--turns", "4"], 110),
        Step("serve_load", serve_load + ["--model", llama_1b, "--clients", "16",
                                         "--turns", "4", "--first-words", "400"], 110),
        Step("engine_overhead", engine_overhead + ["--model", llama_1b, "--turns", "1,16",
                                                   "--tokens", "32", "--prefill-chunk", "64"],
             60),
        Step("store_bandwidth", store_bandwidth, 40),
    ]


def run(step: Step, log) -> Outcome:
    """Runs `step`, appending its output to `log`."""
    log.write(f"\n===== {step.name}: {' '.join(step.argv)}\n")
    log.flush()
    start = time.perf_counter()
    try:
        completed = subprocess.run([sys.executable, *step.argv], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, timeout=step.timeout_s)
        returncode = completed.returncode
    except subprocess.TimeoutExpired:
        returncode = None
        log.write(f"\n===== {step.name}: stopped after its {step.timeout_s} s limit\n")
    seconds = time.perf_counter() - start
    log.flush()
    return Outcome(step.name, returncode, seconds, step.timeout_s)


def test_outcomes(log_path: str) -> dict[str, str]:
    """Each kernel test's outcome, read off pytest's verbose lines in the log."""
    with open(log_path, errors="replace") as f:
        return {m.group(1): m.group(2) for line in f if (m := TEST_OUTCOME.match(line))}


def machine() -> dict:
    import jax

    device = jax.devices()[0]
    facts = {"platform": jax.default_backend(), "device_kind": device.device_kind,
             "device_count": jax.device_count(), "jax": jax.__version__,
             "python": platform.python_version(), "cpu": platform.processor(),
             "cpu_count": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.sm,clocks.mem", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return facts


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--steps", default=None,
                        help="comma-separated subset of: " + ", ".join(STEP_NAMES))
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    chosen = args.steps.split(",") if args.steps else list(STEP_NAMES)
    unknown = sorted(set(chosen) - set(STEP_NAMES))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEP_NAMES)}")
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
    log_path = os.path.join(out_dir, "device_check.log")
    report = {"machine": machine(), "mode": "cpu" if args.cpu else "device", "steps": []}
    print(f"device check on {report['machine']['device_kind']} "
          f"(jax {report['machine']['jax']}), writing {out_dir}", flush=True)
    with open(log_path, "w") as log:
        for step in (s for s in steps(out_dir, args.cpu) if s.name in chosen):
            outcome = run(step, log)
            report["steps"].append(asdict(outcome))
            status = ("timed out" if outcome.returncode is None else
                      "ok" if outcome.returncode == 0 else f"exit {outcome.returncode}")
            print(f"{step.name:13} {status:10} {outcome.seconds:7.1f} s", flush=True)
    outcomes = test_outcomes(log_path)
    counts = {kind: sum(1 for o in outcomes.values() if o == kind)
              for kind in sorted(set(outcomes.values()))}
    report["kernel_tests"] = {"counts": counts, "outcomes": outcomes}
    for name in STEP_NAMES[1:]:
        report[name] = read_json(os.path.join(out_dir, f"{name}.json"))
    with open(os.path.join(out_dir, "device_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"kernel tests: {counts}")
    return 0 if all(s["returncode"] == 0 for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
