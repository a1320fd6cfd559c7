"""Start-up of `jattn-serve` on the embedded model: seconds from launch to SERVING, and
to the end of the compilation a warm-up leaves to the background.

    python benchmarks/startup.py [--json PATH] [--repeats N]

Launches `jattn-serve` (with `JAX_LOG_COMPILES=1`) one run after the other, each until
its gRPC health check says SERVING and its background compilation is done, then stops
it (SIGTERM):

  cold       the warm-up with an empty persistent compilation cache (a first start);
  cached     the warm-up again, with the cache the cold start filled (a restart);
  no warm-up `--no-warm-up`: nothing compiled before SERVING (requests compile instead).

With `--repeats N` the cold and cached starts run N times each (each cold one with a
fresh cache). Prints seconds to SERVING, seconds until the background compilation is
done, and the XLA compilations before SERVING (every "Compiling" that jax logged before
the server's "serving" line, persistent-cache hits included); writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from serve_process import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING_LINE = "jattn serving gRPC on"
BACKGROUND_DONE = "background compilation done"


def _logged_at(line: str) -> float:
    """The time.time() of a log line of jattn-serve's format ("%(asctime)s ...")."""
    stamp = " ".join(line.split(" ", 2)[:2])
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def start_to_serving(extra: list[str], cache_dir: str, *, background: bool) -> dict:
    """Launches `jattn-serve`; returns the seconds until it answered SERVING, the XLA
    compilations it logged before, and (with `background`) the seconds from launch
    until its background compilation logged that it was done."""
    launched = time.time()
    with ServeProcess(["--compilation-cache-dir", cache_dir, *extra]) as server:
        seconds = server.seconds_to_serving
        done = None
        while background and done is None:
            done = next((line for line in list(server.output) if BACKGROUND_DONE in line),
                        None)
            time.sleep(0.2)
    lines = "".join(server.output).splitlines()
    serving = next(i for i, line in enumerate(lines) if SERVING_LINE in line)
    return {"seconds_to_serving": round(seconds, 2),
            "compilations_before_serving": sum("Compiling " in line
                                               for line in lines[:serving]),
            "seconds_to_all_compiled": (round(_logged_at(done) - launched, 2)
                                        if done else None)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "startup-cpu.json"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["JAX_LOG_COMPILES"] = "1"
    rows = {}
    for repeat in range(1, args.repeats + 1):
        suffix = f" #{repeat}" if args.repeats > 1 else ""
        with tempfile.TemporaryDirectory() as cache:
            rows["cold" + suffix] = start_to_serving([], cache, background=True)
            rows["cached" + suffix] = start_to_serving([], cache, background=True)
            if repeat == args.repeats:
                rows["no warm-up"] = start_to_serving(["--no-warm-up"], cache,
                                                      background=False)
    load = os.getloadavg()
    print(f"\njattn-serve start-up, embedded model ({platform.machine()}, "
          f"{os.cpu_count()} cores, load average {load[0]:.2f})")
    print(f"{'start':12} {'s to SERVING':>13} {'compilations before':>20} "
          f"{'s to all compiled':>18}")
    for name, row in rows.items():
        compiled = row["seconds_to_all_compiled"]
        print(f"{name:12} {row['seconds_to_serving']:>13.1f} "
              f"{row['compilations_before_serving']:>20} "
              f"{'-' if compiled is None else f'{compiled:.1f}':>18}")
    with open(args.json, "w") as f:
        json.dump({"machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(),
                               "python": platform.python_version(),
                               "load_average_after": [round(x, 2) for x in load]},
                   "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
