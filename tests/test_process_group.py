"""A group of two processes on loopback (`jax.distributed`, gloo collectives), four CPU
devices each, one eight-device mesh: DistAttention over it equals one device's
attention; `jattn-serve` over the group answers a greedy conversation token for token as
one process does, holds a conversation twice as long as one process's devices can at
the same blocks per device, and fails cleanly (NOT_SERVING, a log line, a non-zero exit
within the step timeout) when a follower dies or hangs."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jattn.dist.group import GROUP_FAILED_EXIT, StepChannel
from jattn.dist.group_store import run_holders
from pallas_kernels import flash_attention
from pallas_kernels import paged_attention as single_device_paged_attention
from serve.client import Client
from serve.config import ServeConfig
from serve.server import Server

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
MESSAGES = ["Tell me a story about a cat.", "What did the cat eat?", "And then?"]
ANSWER_TOKENS = 40
BLOCKS_PER_DEVICE = 2  # of 16 tokens: 256 tokens over the group's 8 devices


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_env() -> dict:
    """Each process sets its own device count: no inherited simulated-device flag."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> list:
    """What each process of one `group_kernels_worker.py` run wrote."""
    out = tmp_path_factory.mktemp("group-kernels")
    port = free_port()
    workers = [subprocess.Popen([sys.executable, os.path.join(TESTS, "group_kernels_worker.py"),
                                 str(i), str(port), str(out)], cwd=TESTS, env=group_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, output[-3000:]
    return [np.load(out / f"process-{i}.npz") for i in range(2)]


def test_dist_attention_across_processes_equals_one_device(worker_results):
    results = worker_results
    r = results[0]
    k, v, tables = jnp.asarray(r["k"]), jnp.asarray(r["v"]), jnp.asarray(r["tables"])
    assert np.isnan(r["k"]).any()  # slots no sequence owns are poisoned
    want_out, want_lse = single_device_paged_attention(
        r["q"], k, v, tables, r["lengths"], backend="reference",
        key_rope_inv_freq=r["inv_freq"])
    hkv, d = k.shape[2:]
    keys, values = k[tables[0]].reshape(-1, hkv, d), v[tables[0]].reshape(-1, hkv, d)
    want_prefill, want_prefill_lse = flash_attention(
        r["chunk_q"], keys, values, causal=True, q_offset=128, kv_length=137,
        key_rope_inv_freq=r["inv_freq"], backend="reference")
    seen = ~np.isneginf(np.asarray(want_lse))
    for result in results:  # both processes hold the whole (replicated) answer
        assert not np.isnan(result["out"]).any()
        np.testing.assert_allclose(result["out"], want_out, atol=2e-5, rtol=2e-5)
        np.testing.assert_array_equal(np.isneginf(result["lse"]), ~seen)
        np.testing.assert_allclose(result["lse"][seen], np.asarray(want_lse)[seen], atol=2e-5)
        np.testing.assert_allclose(result["prefill_out"], want_prefill, atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(result["prefill_lse"], want_prefill_lse, atol=2e-5,
                                   rtol=2e-5)


def test_step_channel_and_own_pool_blocks_across_processes(worker_results):
    """From the same two-process run: a message longer than the channel's first frame
    (and an array after it) arrives whole; each process reads exactly the pool blocks on
    its own devices, with their values, and writes only those, leaving every other
    block as it was (unowned slots stay NaN)."""
    results = worker_results
    sent = json.loads(str(results[0]["message"]))
    assert len(json.dumps(sent)) > StepChannel.FRAME_BYTES
    assert json.loads(str(results[1]["message"])) == sent
    np.testing.assert_array_equal(results[1]["message_array"], results[0]["message_array"])
    k, v, ids = results[0]["k"], results[0]["v"], [int(i) for i in results[0]["ids"]]
    owned = [set(int(b) for b in result["own_ids"]) for result in results]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and owned[0] | owned[1] == set(ids)
    per_device = k.shape[0] // 8
    for result in results:
        for row, block in enumerate(result["own_ids"]):
            np.testing.assert_array_equal(result["read_k"][row][0], k[block])
            np.testing.assert_array_equal(result["read_v"][row][0], v[block])
        starts = [int(name.rsplit("_", 1)[1]) for name in result.files
                  if name.startswith("after_k_")]
        assert len(starts) == 4
        for start in starts:
            for part, before, new in (("k", k, result["new_k"]), ("v", v, result["new_v"])):
                want = before[start:start + per_device].copy()
                for i, block in enumerate(ids):
                    if start <= block < start + per_device:
                        want[block - start] = new[i][0]
                np.testing.assert_array_equal(result[f"after_{part}_{start}"], want)


@pytest.mark.parametrize("seed", range(6))
def test_run_holders_take_each_key_from_its_fastest_copy(seed):
    """The group's run: keys up to the first no process holds, each from the process
    with the fastest tier (code 1 host before 2 disk), the lowest-numbered among
    equals."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 3, (3, 10)) * (rng.random((3, 10)) < 0.8)
    want = []
    for key in range(codes.shape[1]):
        column = codes[:, key]
        if not column.any():
            break
        fastest = column[column > 0].min()
        want.append(int(np.flatnonzero(column == fastest)[0]))
    assert run_holders(codes) == want
