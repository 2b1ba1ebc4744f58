#!/usr/bin/env bash
# The one-call GPU check on a host with torch (CUDA) but no network and no diffusers: installs the wheels
# carried in .whl/ (made here by benchmarks/gpu_wheels.sh) into /tmp/qitrt-site, then runs gpu_check.py from
# this checkout. Arguments go to gpu_check.py (--budget-s, --layers, --sections, ...). Safe to run twice.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qitrt-site \
    .whl/*.whl
  export PYTHONPATH="/tmp/qitrt-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import diffusers, pydantic" 2>/dev/null || {
  echo "diffusers/pydantic missing: run benchmarks/gpu_wheels.sh on a machine with pip access first" >&2; exit 2; }
exec python3 benchmarks/gpu_check.py "$@"
