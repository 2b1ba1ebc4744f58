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


def test_readme_python_snippets_run_as_written(tiny_checkpoint, tiny_engines, tiny_edit_2511, tiny21, tmp_path):
    """Every ```python block of README.md, run in a folder laid out as `qitrt quickstart` and README's editing
    commands leave it."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python snippet"
    runs = tmp_path / "runs" / "quickstart"
    runs.mkdir(parents=True)
    (runs / "qwen-image-tiny").symlink_to(tiny_checkpoint)
    (runs / "engines-fp32").symlink_to(tiny_engines)
    (tmp_path / "runs" / "tiny-edit-2511").symlink_to(tiny_edit_2511[0])
    (tmp_path / "runs" / "engines-edit-2511").symlink_to(tiny_edit_2511[1])
    (tmp_path / "runs" / "tiny-21").symlink_to(tiny21[0])
    (tmp_path / "runs" / "engines-21").symlink_to(tiny21[1])
    from qwen_image_trt.models.condition_images import condition_image

    condition_image(0).save(tmp_path / "cat.png")  # as README's editing commands make them
    condition_image(1).save(tmp_path / "hat.png")
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


def test_modelopt_noise_becomes_one_summary_line(capsys):
    import warnings

    import pytest

    from qwen_image_trt.compile.quantize import modelopt_quiet

    with pytest.warns(UserWarning, match="something to act on"), modelopt_quiet(kept_by_recipe=5, progress=True):
        print("Inserted 42 quantizers")
        for i in range(3):
            warnings.warn(f"transformer_blocks.{i}.attn.to_q is not calibrated, skip smoothing", stacklevel=1)
        warnings.warn("something to act on", stacklevel=1)
    err = capsys.readouterr()
    assert "Inserted" not in err.out and "is not calibrated" not in err.err
    assert "ModelOpt inserted 42 quantizers; 5 layers left unquantized by the recipe (3 of them" in err.err


def test_generate_defaults_to_the_engines_size_and_the_checkpoints_steps(tiny_checkpoint, tiny_engines, tmp_path):
    from PIL import Image

    from qwen_image_trt.core.manifest import read_manifest, write_manifest
    from qwen_image_trt.runtime.generate import default_request

    assert default_request(tiny_checkpoint) == (64, 64, 4)  # the tiny model's own
    assert default_request(tiny_checkpoint, tiny_engines) == (64, 64, 4)  # an ONNX folder built for any size
    built = tmp_path / "built"
    built.mkdir()
    write_manifest(built, read_manifest(tiny_engines).model_copy(update={"sizes": [[96, 64], [64, 64]]}))
    assert default_request(tiny_checkpoint, built) == (96, 64, 4)  # the first size a TensorRT build was made for

    out = tmp_path / "fox.png"
    r = qitrt("generate", tiny_checkpoint, "--engines", tiny_engines, "--prompt", "a red fox", "--out", out)
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (64, 64)
    assert "true_cfg_scale" not in r.stderr  # diffusers' CFG warning is not shown when CFG is simply off


def test_every_command_help_has_its_defaults_and_an_example():
    import argparse

    from qwen_image_trt.cli import build_parser

    def commands(parser, path=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    nested = any(isinstance(a, argparse._SubParsersAction) for a in child._actions)
                    yield from commands(child, f"{path} {name}".strip()) if nested else [(f"{path} {name}".strip(),
                                                                                          child)]

    seen = dict(commands(build_parser()))
    assert {"tiny", "export", "generate", "serve", "bench serve", "bench chaos"} <= set(seen)
    for name, parser in seen.items():
        text = " ".join(parser.format_help().split())
        assert f"example: qitrt {name}" in text, name
        for action in parser._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and action.help != argparse.SUPPRESS:
                assert "default" in parser._get_formatter()._get_help_string(action), (name, action.dest)


def test_ui_without_gradio_names_the_extra(monkeypatch):
    import pytest

    from qwen_image_trt.core.errors import QitrtError
    from qwen_image_trt.serve.ui import mount_ui

    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: `import gradio` raises ImportError
    with pytest.raises(QitrtError, match=r"pip install 'qwen-image-trt\[ui\]'"):
        mount_ui(None, None, None, lambda: None)
