"""What a new user meets first: mistakes end in one line naming what to fix, never a traceback or a hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def qitrt(*args, timeout=180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("QITRT_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_engines_of_another_checkpoint_stops_at_start(tiny_checkpoint, tiny_engines, tmp_path):
    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models.checkpoint import checkpoint_identity
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    r = qitrt("serve", other, "--engines", tiny_engines, "--port", free_port(), "--jobs-dir", tmp_path / "jobs")
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert read_manifest(tiny_engines).checkpoint.identity in errors[0]  # what the engines were built from
    assert checkpoint_identity(other) in errors[0] and "qitrt export" in errors[0]  # what was given, and the fix
    ok = qitrt("serve", tmp_path / "not-a-checkpoint", "--port", free_port(), "--jobs-dir", tmp_path / "jobs")
    assert ok.returncode == 2 and "Traceback" not in ok.stderr and "error: " in ok.stderr


def test_errors_are_one_line_and_the_traceback_is_behind_v(tmp_path):
    missing = tmp_path / "nope.onnx"
    r = qitrt("lint", missing)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "nope.onnx" in lines[0] and "Traceback" not in r.stderr
    v = qitrt("-v", "lint", missing)
    assert v.returncode == r.returncode and "Traceback" in v.stderr and v.stderr.strip().endswith(lines[0].strip())


def test_one_line_error_shapes():
    from qwen_image_trt.cli import one_line_error
    from qwen_image_trt.core.errors import InputError

    assert one_line_error(InputError("steps", 0, "an integer in [1, 100]")) == \
        "error: steps=0 is not allowed: an integer in [1, 100]"
    e = one_line_error(PermissionError(13, "Permission denied", "/root/x"))
    assert e == "error: PermissionError: Permission denied: /root/x (run with -v for the traceback)"
    assert one_line_error(RuntimeError("CUDA out of\nmemory"), verbose=True) == "error: RuntimeError: CUDA out of memory"


def test_report_says_na_with_its_reason_and_identical_not_a_cap(tmp_path):
    from qwen_image_trt.parity.metrics import PSNR_CAP_DB
    from qwen_image_trt.parity.report import write_html

    data = {"passed": True, "backend": "onnxruntime", "precision": "fp32", "reference_dtype": "fp32",
            "checkpoint": "ckpt", "checkpoint_identity": "abc", "engines": "e", "seed": 0, "steps": 2, "seconds": 1.0,
            "gates": [{"name": "image_psnr_min", "kind": "min", "value": PSNR_CAP_DB, "limit": 40.0, "ok": True}],
            "forward": [{"component": "vae_decoder", "batch": 1, "grid": None, "text_len": None, "height": 64,
                         "width": 64, "max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}],
            "per_step": [], "images": [{"prompt": "p", "negative_prompt": " ", "seed": 0, "size": [64, 64],
                                        "psnr_db": PSNR_CAP_DB, "ssim": 1.0, "max_abs_levels": 0,
                                        "files": {"eager": "a.png", "engine": "b.png", "diff": "c.png"}}]}
    page = write_html(data, tmp_path).read_text()
    assert "n/a (no text input for vae_decoder)" in page and "n/a (no image-token grid for vae_decoder)" in page
    assert "identical (PSNR infinite)" in page
    assert ">None<" not in page and "200.00 dB" not in page


def test_readme_python_snippets_run_as_written(tiny_checkpoint, tiny_engines, tmp_path):
    """Every ```python block of README.md, run in a folder laid out as `qitrt quickstart` leaves it."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README.md has no python snippet"
    runs = tmp_path / "runs" / "quickstart"
    runs.mkdir(parents=True)
    (runs / "qwen-image-tiny").symlink_to(tiny_checkpoint)
    (runs / "engines-fp32").symlink_to(tiny_engines)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for i, code in enumerate(blocks):
        r = subprocess.run([sys.executable, "-c", code + "\nprint('snippet ok')"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "snippet ok" in r.stdout, f"README snippet {i}:\n{code}\n{r.stderr[-2000:]}"


def test_dev_script_names_its_commands():
    r = subprocess.run(["bash", str(ROOT / "scripts" / "dev"), "deploy"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "quickstart|test|install" in r.stderr


def test_bench_results_go_to_a_scratch_folder_unless_recorded():
    import argparse

    from qwen_image_trt.bench.cli import RECORDED, SCRATCH, _out
    from qwen_image_trt.bench.report import _spread

    assert _out(argparse.Namespace(out=None, record=False)) == SCRATCH == "runs/bench"
    assert _out(argparse.Namespace(out=None, record=True)) == RECORDED == "benchmarks/results"
    assert _out(argparse.Namespace(out="x", record=True)) == "x"
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
    assert _spread([0.1, 0.12, 0.11]) == "100.0-120.0" and _spread([0.1]).startswith("n/a (1 repeat")
