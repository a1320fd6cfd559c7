"""The engine's own cost per step: host time, and the device's idle time between steps.

    python benchmarks/engine_overhead.py [--turns 1,16,64] [--tokens 64]
                                         [--model DIR --random-weights] [--json PATH]

For each count of running turns, one-off turns (16-token prompts, greedy, `--tokens`
answers, end-of-sequence ignored) are submitted at once to the engine, twice in the same
process: with overlapped scheduling (each step dispatched before the tokens of the step
before it reach the host) and without it (the baseline: the host takes each step's tokens,
then plans the next). Only the steps in which every turn decodes are counted. For each
step, from timestamps:

  dispatched   when the engine's thread handed the step to the device
  ready        when its tokens were ready (a watcher thread waits on each step's tokens)
  gap          the device's idle time before the step: max(0, dispatched - ready of the
               step before)
  step time    ready - max(dispatched, ready of the step before): the device's busy time
  host time    the engine thread's CPU time between consecutive dispatches

Prints medians per configuration (and the gap as a share of the step time) and writes
JSON. The first run of each configuration is a rehearsal, so no compilation is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time

import jax

from jattn import LLM
from jattn.defaults import PREFILL_CHUNK
from jattn.engine import Engine, EngineLimits, TurnRequest
from jattn.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class StepTimeline:
    """A runner that records, for each step whose tokens are drawn, when it was
    dispatched, the engine thread's CPU time then, and (on a watcher thread) when its
    tokens were ready. Everything else is the wrapped runner's."""

    def __init__(self, runner):
        self._runner = runner
        self.steps: list[dict] = []
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._watch, daemon=True).start()

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def execute(self, plan):
        cpu = time.thread_time()
        output = self._runner.execute(plan)
        if output.tokens is not None:
            step = {"dispatched": time.perf_counter(), "cpu": cpu,
                    "decodes": sum(len(s.tokens) == 1 for s in plan.segments),
                    "segments": len(plan.segments)}
            self.steps.append(step)
            self._waiting.put((step, output.tokens))
        return output

    def _watch(self) -> None:
        while True:
            step, tokens = self._waiting.get()
            jax.block_until_ready(tokens)
            step["ready"] = time.perf_counter()

    def reset(self) -> list[dict]:
        """The steps recorded so far (once all are ready), and starts a new record."""
        while any("ready" not in step for step in self.steps):
            time.sleep(0.001)
        steps, self.steps = self.steps, []
        return steps


def measure(timeline: StepTimeline, engine: Engine, turns: int, tokens: int) -> dict:
    """Runs `turns` one-off turns at once; the medians over their all-decoding steps."""
    timeline.reset()
    params = SamplingParams(max_tokens=tokens)
    streams = [engine.submit(TurnRequest(None, "tokens", tuple(range(5 + i % 7, 21 + i % 7)),
                                         params, ignore_eos=True)) for i in range(turns)]
    for stream in streams:
        for _ in stream:
            pass
    steps = timeline.reset()
    gaps, busy, host = [], [], []
    for before, step in zip(steps, steps[1:]):
        if step["decodes"] != turns or step["segments"] != turns:
            continue
        gaps.append(max(0.0, step["dispatched"] - before["ready"]))
        busy.append(step["ready"] - max(step["dispatched"], before["ready"]))
        host.append(step["cpu"] - before["cpu"])
    gap, step_time = statistics.median(gaps), statistics.median(busy)
    return {"turns": turns, "steps_measured": len(gaps), "gap_ms": gap * 1e3,
            "step_ms": step_time * 1e3, "gap_share": gap / step_time,
            "host_ms": statistics.median(host) * 1e3,
            "ms_per_token_step": (steps[-1]["ready"] - steps[0]["ready"])
            / max(len(steps) - 1, 1) * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", default="1,16,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="default: the embedded stories260K")
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                        help="the largest packed step (fewer shapes to compile)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.turns.split(",")]
    llm = LLM(args.model, random_weights=args.random_weights, store=None,
              max_running=max(counts), max_context=512,
              num_blocks=max(counts) * 8 + 64, prefill_chunk=args.prefill_chunk)
    timeline = StepTimeline(llm.runner)
    llm.chats.runner = timeline
    rows = []
    for overlap in (True, False):
        engine = Engine(llm.chats, EngineLimits(max_running=max(counts)), warm_up=True,
                        overlap=overlap)
        llm.chats.wait_compiled()  # every step compiled: none runs on a larger bucket
        for turns in counts:
            measure(timeline, engine, turns, args.tokens)  # a rehearsal
            rows.append({"overlap": overlap, **measure(timeline, engine, turns, args.tokens)})
        engine.shutdown()
    device = jax.devices()[0]
    print(f"\nengine overhead per step, {args.model or 'embedded model'} "
          f"({device.device_kind}, {os.cpu_count()} cores, jax {jax.__version__})")
    print(f"{'overlap':8} {'turns':>5} {'steps':>6} {'step ms':>8} {'gap ms':>7} "
          f"{'gap/step':>9} {'host ms':>8} {'ms/step':>8}")
    for row in rows:
        print(f"{str(row['overlap']):8} {row['turns']:>5} {row['steps_measured']:>6} "
              f"{row['step_ms']:>8.2f} {row['gap_ms']:>7.2f} {row['gap_share']:>9.1%} "
              f"{row['host_ms']:>8.2f} {row['ms_per_token_step']:>8.2f}")
    path = args.json or os.path.join(
        ROOT, "benchmarks", "results", f"engine-overhead-{device.platform}.json")
    with open(path, "w") as f:
        json.dump({"machine": {"device": device.device_kind, "platform": device.platform,
                               "cpu": platform.machine(), "cpu_count": os.cpu_count(),
                               "python": platform.python_version(),
                               "jax": jax.__version__},
                   "model": args.model or "embedded", "tokens": args.tokens,
                   "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
