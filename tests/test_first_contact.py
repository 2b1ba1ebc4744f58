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
