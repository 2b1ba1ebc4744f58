#!/usr/bin/env bash
# Download, on a machine with pip access, the wheels benchmarks/gpu_check.sh installs on a GPU host that has
# torch, transformers, onnx, onnxruntime, peft and safetensors but not diffusers (nor pydantic, which the typed
# manifest needs). Pure-Python wheels except pydantic-core and torchao (built for CPython 3.12 manylinux x86-64,
# the GPU image's python). torchao is optional: without it the fp8 section says so and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps -d .whl "${PLAT[@]}" diffusers==0.42.1 importlib_metadata
python3 -m pip download -q -d .whl "${PLAT[@]}" pydantic  # with its deps: pydantic-core must match its pin
python3 -m pip download -q --no-deps -d .whl "${PLAT[@]}" "torchao${TORCHAO_VERSION:+==$TORCHAO_VERSION}" \
  || echo "torchao not downloaded: the fp8 section will be skipped" >&2
ls -la .whl
