"""`benchmarks/device_check.sh --cpu` runs every step on tiny shapes and reports each
result: what keeps the accelerator check working between the times a GPU is at hand."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cpu_mode_runs_every_step_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "JATTN_WHEELS": str(tmp_path / "none"),
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}
    env.pop("XLA_FLAGS", None)
    completed = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_check.sh"),
                                "--cpu", str(out)], env=env, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads((out / "device_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == [
        "kernel_tests", "kernels", "multiturn", "serve_load", "engine_overhead",
        "store_bandwidth"]
    assert all(s["returncode"] == 0 for s in report["steps"])
    assert report["machine"]["platform"] == "cpu"

    tests = report["kernel_tests"]["outcomes"]
    assert tests and set(tests.values()) == {"PASSED"}
    assert any("pallas_gpu" in name for name in tests)

    kernels = report["kernels"]["rows"]
    assert {(r["op"], r["backend"]) for r in kernels} == {
        (op, backend) for op in ("decode", "prefill") for backend in ("pallas", "xla",
                                                                        "reference")} | {
        ("decode", f"pallas pages_per_step={pages}") for pages in (2, 4, 8)} | {
        ("prefill", f"pallas block_q={q} block_k={k}") for q, k in ((128, 64), (64, 128),
                                                                   (128, 128))} | {
        ("fwd+bwd", backend) for backend in ("jax.nn.dot_product_attention[xla]", "pallas",
                                             "xla", "reference")} | {
        ("mixed", backend) for backend in ("pallas", "xla")}
    for row in kernels:
        assert row["error"] is None and row["median_ms"] > 0
        assert row["max_abs_diff_vs_reference"] < 1e-4, row

    multiturn = report["multiturn"]
    assert multiturn["identical_tokens"] is True
    assert len(multiturn["one_shot_ttft_s"]) == 2
    assert multiturn["store_stats"]["host"]["host_bytes_loaded"] > 0
    assert multiturn["store_stats"]["disk"]["disk_bytes_loaded"] > 0
    assert (out / "multiturn.png").stat().st_size > 0

    rows = {r["mode"]: r for r in report["serve_load"]["rows"]}
    assert set(rows) == {"session", "stateless", "no reuse"}
    for row in rows.values():
        assert row["turns"] == 4 and row["tokens_per_s"] > 0

    overhead = {(r["overlap"], r["turns"]): r for r in report["engine_overhead"]["rows"]}
    assert set(overhead) == {(overlap, turns) for overlap in (True, False) for turns in (1, 2)}
    for row in overhead.values():
        assert row["steps_measured"] > 0 and row["step_ms"] > 0 and row["gap_ms"] >= 0

    bandwidth = report["store_bandwidth"]
    assert set(bandwidth["tiers"]) == {"host, one turn", "host, single blocks", "disk",
                                       "disk, one run"}
    for tier in bandwidth["tiers"].values():
        assert tier["store_gbytes_per_s"] > 0 and tier["baseline_gbytes_per_s"] > 0
    assert bandwidth["pinned_put_gbytes_per_s"] > 0  # CPU has the pinned_host memory kind

    log = (out / "device_check.log").read_text()
    assert "===== serve_load" in log
