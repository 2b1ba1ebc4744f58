"""One-call GPU check: `python benchmarks/gpu_check.py` (or benchmarks/gpu_check.sh on a host without diffusers).
See qwen_image_trt/bench/gpu_check.py for what it measures; results go to benchmarks/results/gpu/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without `pip install`

from qwen_image_trt.bench.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
