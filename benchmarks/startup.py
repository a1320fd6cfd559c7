"""Start-up of `jattn-serve` on the embedded model: seconds from launch to SERVING.

    python benchmarks/startup.py [--json PATH]

Launches `jattn-serve` three times, one after the other, each until its gRPC health check
says SERVING, then stops it (SIGTERM):

  cold       the warm-up with an empty persistent compilation cache (a first start);
  cached     the warm-up again, with the cache the cold start filled (a restart);
  no warm-up `--no-warm-up`: nothing compiled before SERVING (requests compile instead).

Prints seconds to SERVING and the shapes the warm-up compiled; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile

from serve_process import ServeProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = re.compile(r"compiling: 100%\|[^|]*\| (\d+)/\d+")


def start_to_serving(extra: list[str], cache_dir: str) -> dict:
    """Launches `jattn-serve`; returns the seconds until it answered SERVING and the
    shapes its warm-up reported compiling."""
    with ServeProcess(["--compilation-cache-dir", cache_dir, *extra]) as server:
        seconds = server.seconds_to_serving
    text = "".join(server.output)
    shapes = [int(n) for n in SHAPES.findall(text.replace("\r", "\n"))]
    return {"seconds_to_serving": seconds, "shapes_compiled": shapes[-1] if shapes else 0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                       "startup-cpu.json"))
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        rows["cold"] = start_to_serving([], cache)
        rows["cached"] = start_to_serving([], cache)
        rows["no warm-up"] = start_to_serving(["--no-warm-up"], cache)
    print(f"\njattn-serve start-up, embedded model ({platform.machine()}, "
          f"{os.cpu_count()} cores)")
    print(f"{'start':12} {'seconds to SERVING':>19} {'shapes compiled':>16}")
    for name, row in rows.items():
        print(f"{name:12} {row['seconds_to_serving']:>19.1f} {row['shapes_compiled']:>16}")
    with open(args.json, "w") as f:
        json.dump({"machine": {"cpu": platform.machine(), "cpu_count": os.cpu_count(),
                               "python": platform.python_version()}, "rows": rows}, f,
                  indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
