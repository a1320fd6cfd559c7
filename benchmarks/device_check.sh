#!/usr/bin/env bash
# One prepared check of an accelerator machine that has nothing installed but its image:
#   benchmarks/device_check.sh [--cpu] OUT_DIR
# Python packages the image lacks are taken from wheels in $JATTN_WHEELS (default .whl)
# when that folder exists; the repository runs from its source tree. See device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheels="${JATTN_WHEELS:-.whl}"
if compgen -G "$wheels/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
exec "$python" benchmarks/device_check.py "$@"
