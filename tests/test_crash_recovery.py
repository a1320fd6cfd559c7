"""`kill -9` of jattn-serve at random points of a conversation with a disk tier, then a
restart: the server starts, holds every turn it acknowledged (and perhaps the one in
flight), and every answer equals a server that never crashed (greedy), so no KV left
on disk by a lost turn is ever read as the KV of a different history."""

import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc

from jattn import LLM, StoreConfig
from serve.client import Client

# Turn i's message; after a crash that lost a turn, the next attempt sends the other
# list's message, so the history differs from the one whose blocks reached disk.
FIRST = ["Once upon a time there was a little dog named Max.", "He liked to run.",
         "One day he found a ball in the park.", "It was red and shiny.",
         "He took it home to show his mom.", "She smiled at him.", "Then they ate cake.",
         "The end of the day came.", "Max went to sleep.", "He dreamed of balls."]
SECOND = ["Lily had a big red kite.", "The wind was strong.", "The kite flew high.",
          "A bird came to look.", "Lily laughed and ran.", "Her friend Tom came too.",
          "They played all day.", "The sun went down.", "They went home.", "Good night."]
MAX_TOKENS = 24


def launch(disk):
    process = subprocess.Popen(
        [sys.executable, "-m", "serve.cli", "serve", "--port", "0", "--http-port", "0",
         "--disk-bytes", "64MiB",
         "--disk-path", str(disk), "--no-warm-up", "--compilation-cache-dir", "",
         "--hbm-bytes", "64KiB", "--host-bytes", "256KiB", "--max-context", "192"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    for line in process.stdout:
        if "listening on" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # drain
            return process, Client(f"127.0.0.1:{int(line.rsplit(':', 1)[1])}")
    raise AssertionError("jattn-serve did not start: " + str(process.wait()))


def test_kill_9_at_random_points_never_gives_a_wrong_token(tmp_path):
    processes = []
    try:
        crash_and_continue(tmp_path, processes)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def crash_and_continue(tmp_path, processes):
    rng = random.Random(13)
    held: list[str] = []  # messages of the turns the server holds, in order
    answers: dict[int, list[int]] = {}  # turn index -> the answer the client received
    process, client = launch(tmp_path)
    processes.append(process)
    for cycle in range(6):
        result = {}

        def turn(message, index):
            try:
                reply = client.chat("s", message, max_tokens=MAX_TOKENS, ignore_eos=True)
                result[index] = list(reply.token_ids)
            except grpc.RpcError as error:
                result["error"] = error.code()

        # One or two acknowledged turns, then a turn the kill may interrupt.
        for _ in range(rng.choice([1, 2])):
            message = (FIRST if cycle % 2 == 0 else SECOND)[len(held) % len(FIRST)]
            turn(message, len(held))
            assert len(held) in result, result
            answers[len(held)] = result.pop(len(held))
            held.append(message)
        message = (FIRST if cycle % 2 == 0 else SECOND)[len(held) % len(FIRST)]
        runner = threading.Thread(target=turn, args=(message, len(held)))
        runner.start()
        time.sleep(rng.choice([0.0, 0.005, 0.02, 0.05, 0.1]))
        process.send_signal(signal.SIGKILL)
        process.wait()
        runner.join(30)
        acknowledged = len(held) in result
        client.close()

        process, client = launch(tmp_path)  # starts over whatever the kill left
        processes.append(process)
        turns = client.describe("s").turns
        if acknowledged:  # an acknowledged turn is durable
            assert turns == len(held) + 1
        else:  # a turn not acknowledged is there whole or not at all
            assert turns in (len(held), len(held) + 1)
        if turns == len(held) + 1:
            if acknowledged:
                answers[len(held)] = result[len(held)]
            held.append(message)

    # One more turn on the restarted server, read from disk, then compare everything
    # with a server that never crashed.
    message = FIRST[len(held) % len(FIRST)]
    reply = client.chat("s", message, max_tokens=MAX_TOKENS, ignore_eos=True)
    answers[len(held)] = list(reply.token_ids)
    assert reply.facts.cached_tokens > 0 and "disk" in reply.facts.tier_blocks
    held.append(message)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    client.close()

    reference = LLM(store=StoreConfig(hbm_bytes=1 << 26, host_bytes=1 << 26),
                    max_context=192)
    for index, message in enumerate(held):
        expected = reference.chat("s", message, max_tokens=MAX_TOKENS, ignore_eos=True)
        if index in answers:
            assert answers[index] == expected.token_ids, f"turn {index}"
    assert len(answers) >= len(held) - 6
