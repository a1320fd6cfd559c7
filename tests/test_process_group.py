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

from jattn.distributed.group import GROUP_FAILED_EXIT, StepChannel
from jattn.distributed.group_store import run_holders
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
    arrives whole, as its dataclass; each process reads exactly the pool blocks on
    its own devices, with their values, and writes only those, leaving every other
    block as it was (unowned slots stay NaN)."""
    results = worker_results
    sent = json.loads(str(results[0]["message"]))
    assert len(json.dumps(sent)) > StepChannel.FRAME_BYTES
    assert json.loads(str(results[1]["message"])) == sent
    assert [str(result["message_type"]) for result in results] == ["Probe", "Probe"]
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


class Group:
    """`jattn-serve` as a group of two processes of four CPU devices on loopback."""

    def __init__(self, tmp_path, *, store: bool = False, step_timeout_s: float = 60.0,
                 warm_up: bool = False, extra: tuple = ()):
        coordinator = f"127.0.0.1:{free_port()}"
        flags = ["--coordinator", coordinator, "--num-processes", "2", "--kv-parallel", "8",
                 "--store" if store else "--no-store", "--num-blocks", str(8 * BLOCKS_PER_DEVICE), "--max-running",
                 "4", "--port", "0", "--http-port", "0", "--warm-up" if warm_up else "--no-warm-up",
                 "--step-timeout-s", str(step_timeout_s),
                 "--compilation-cache-dir", str(tmp_path / "xla"), *extra]
        env = group_env()
        env["JAX_NUM_CPU_DEVICES"] = "4"
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "serve.cli", "serve", *flags, "--process-id", str(i)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        self.output: list[str] = []
        for line in self.processes[0].stdout:
            self.output.append(line)
            if "listening on" in line:
                self.address = f"127.0.0.1:{int(line.rsplit(':', 1)[1])}"
                break
        else:
            raise AssertionError("the group did not start:\n" + "".join(self.output[-30:])
                                 + self.processes[1].communicate(timeout=30)[0][-3000:])
        self.client = Client(self.address)
        self.client.wait_ready(timeout=120)

    def leader_output(self, timeout: float) -> str:
        """Process 0's remaining output once it has exited (within `timeout` s)."""
        rest, _ = self.processes[0].communicate(timeout=timeout)
        return "".join(self.output) + rest

    def close(self) -> None:
        self.client.close()
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=60)


def converse(address: str, messages=MESSAGES) -> list:
    """The replies (`TurnReply`) to `messages`, a greedy conversation over gRPC."""
    client = Client(address)
    try:
        return [client.chat("group-test", text=message, max_tokens=ANSWER_TOKENS,
                            ignore_eos=True) for message in messages]
    finally:
        client.close()


def in_process_server(**config) -> Server:
    return Server(ServeConfig(port=0, http_port=None, warm_up=False, max_running=4,
                              compilation_cache_dir=None, **config)).start()


@pytest.mark.parametrize("store", [False, True])
def test_group_server_answers_as_one_process_with_twice_its_context(tmp_path, store):
    """Without the store every turn recomputes its history; with it, the group keeps
    each turn's KV in the pool for the next (the device tier)."""
    alone = in_process_server(num_blocks=64, store=store)
    try:
        want = [reply.token_ids for reply in converse(f"127.0.0.1:{alone.port}")]
        client = Client(f"127.0.0.1:{alone.port}")
        context = client.describe("group-test").context_tokens
        client.close()
    finally:
        alone.stop()
    # The conversation needs more blocks than one process's four devices hold ...
    assert 4 * BLOCKS_PER_DEVICE * 16 < context <= 8 * BLOCKS_PER_DEVICE * 16
    one_process = in_process_server(num_blocks=4 * BLOCKS_PER_DEVICE, kv_parallel=4,
                                    store=store)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            converse(f"127.0.0.1:{one_process.port}")
        assert "does not fit the KV block pool" in refused.value.details()
    finally:
        one_process.stop()
    # ... and fits the two processes' eight, with the same tokens.
    group = Group(tmp_path, store=store)
    try:
        replies = converse(group.address)
        assert [reply.token_ids for reply in replies] == want
        reused = [reply.facts.cached_tokens for reply in replies[1:]]
        assert all(reused) if store else not any(reused), reused
        group.processes[0].send_signal(signal.SIGTERM)
        assert group.processes[0].wait(timeout=120) == 0
        assert group.processes[1].wait(timeout=60) == 0  # the leader stopped the group
    finally:
        group.close()


def block_keys(disk_root) -> set[str]:
    """The keys of the KV blocks a disk tier's directory holds."""
    return {path.stem for path in disk_root.glob("*/blocks/*/*.kv")}


def test_group_store_reloads_from_host_and_disk_across_a_restart(tmp_path):
    """Each process's own store: with no device tier, every later turn's history comes
    back from host memory into the devices of the process that saved it; each process's
    disk holds the blocks of its own devices, none twice, together those a single
    process saves; after the whole group restarts, the session continues from both
    disks. Tokens as a single process's."""
    tiers = ["--hbm-bytes", "0", "--disk-bytes", "64MiB"]
    later = "What happened at the end?"
    alone = in_process_server(num_blocks=64, store=True, hbm_bytes=0, disk_bytes=64 << 20,
                              disk_path=str(tmp_path / "alone-disk"))
    try:
        alone_replies = converse(f"127.0.0.1:{alone.port}")
        alone.llm.store.flush()
        alone_keys = block_keys(tmp_path / "alone-disk")
        alone_replies += converse(f"127.0.0.1:{alone.port}", [later])
        want = [reply.token_ids for reply in alone_replies]
    finally:
        alone.stop()
    assert alone_keys
    disk = ["--disk-path", str(tmp_path / "group-disk")]
    group = Group(tmp_path, store=True, extra=(*tiers, *disk))
    try:
        replies = converse(group.address)
        assert [r.token_ids for r in replies] == want[:3]
        for reply in replies[1:]:
            assert reply.facts.tier_blocks["host"] > 0 and reply.facts.cached_tokens > 0
        group.processes[0].send_signal(signal.SIGTERM)  # flushes the store to disk
        assert group.processes[0].wait(timeout=120) == 0
        assert group.processes[1].wait(timeout=60) == 0
    finally:
        group.close()
    held = [block_keys(tmp_path / "group-disk" / f"process-{i}") for i in range(2)]
    assert held[0] and held[1] and not held[0] & held[1]
    assert held[0] | held[1] == alone_keys
    assert list((tmp_path / "group-disk" / "process-0").glob("*/sessions/*.log"))
    assert not list((tmp_path / "group-disk" / "process-1").glob("*/sessions/*"))
    restarted = Group(tmp_path, store=True, warm_up=True, extra=(*tiers, *disk))
    try:
        session = restarted.client.describe("group-test")  # asks both processes' stores
        assert session.resident_blocks_by_tier["disk"] == len(alone_keys)
        # Each process's counters come back with every store step, and add up.
        assert restarted.client.stats().store["disk_blocks"] == len(alone_keys)
        (reply,) = converse(restarted.address, [later])
        assert reply.token_ids == want[3]
        assert reply.facts.tier_blocks["disk"] > 0
        assert reply.facts.cached_tokens == alone_replies[3].facts.cached_tokens
    finally:
        restarted.close()


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_leader_exits_cleanly_when_a_follower_dies_or_hangs(tmp_path, failure):
    timeout_s = 8.0
    group = Group(tmp_path, step_timeout_s=timeout_s)
    try:
        assert group.client.chat("before", text="Hello", max_tokens=4).token_ids
        assert health(group.address) == health_pb2.HealthCheckResponse.SERVING
        follower = group.processes[1]
        follower.send_signal(signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            group.client.chat("after", text="Hello again", max_tokens=4, timeout=4 * timeout_s)
        output = group.leader_output(timeout=4 * timeout_s)
        assert group.processes[0].returncode == GROUP_FAILED_EXIT, output[-4000:]
        assert time.monotonic() - started < 3 * timeout_s
        reason = (f"has not finished after {timeout_s:g} s" if failure == "hung" else
                  "failed (")
        assert reason in output and "a process of the group" in output, output[-4000:]
        assert f"exiting with status {GROUP_FAILED_EXIT}" in output
    finally:
        if group.processes[1].poll() is None:
            group.processes[1].send_signal(signal.SIGCONT)
        group.close()


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
