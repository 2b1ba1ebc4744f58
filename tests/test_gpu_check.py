"""The one-call GPU check (bench/gpu_check.py) run on this CPU at a tiny width, so it cannot rot between GPU loans:
every section runs or says why not, results are written after each section, and a second run is safe."""

from __future__ import annotations

import json

import pytest

from qwen_image_trt.bench.gpu_check import GpuCheck


def small(tmp_path, **kw) -> GpuCheck:
    args = dict(device="cpu", tiny=True, out=tmp_path, repeat=1, steps=6, thresholds=(0.3,), batch_sizes=(1, 2),
                compile_backend="aot_eager", progress=lambda _line: None)
    return GpuCheck(**{**args, **kw})


def test_every_section_runs_or_says_why_and_files_are_written(tmp_path):
    result = small(tmp_path).run()
    sections = result["sections"]
    assert list(sections) == ["transformer", "vae_decode", "batching", "step_cache", "dropin_overhead", "compile",
                              "fp8", "onnxruntime_cuda", "tensorrt"]
    for name in ("transformer", "vae_decode", "batching", "step_cache", "dropin_overhead", "compile"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    assert "8.9" in sections["fp8"]["reason"]  # refused by the fast path's own check, with what it needs
    assert "CUDAExecutionProvider" in sections["onnxruntime_cuda"]["reason"]
    assert "CUDA device" in sections["tensorrt"]["reason"]
    assert all(r["step_s"] > 0 and r["floor_s"] is None for r in sections["transformer"]["rows"])  # no CPU peak
    assert [r["images"] for r in sections["batching"]["rows"]] == [1, 2, 1, 2]
    cache = sections["step_cache"]["rows"]
    assert cache[0]["threshold"] == 0 and cache[1]["skip_ratio"] > 0 and cache[1]["rel_l2"] > 0
    assert sections["compile"]["graphs"] == 2  # one graph per size, shared by every block
    written = json.loads((tmp_path / f"{small(tmp_path).stem}.json").read_text())
    assert written["sections"].keys() == sections.keys()
    md = (tmp_path / f"{small(tmp_path).stem}.md").read_text()
    assert all(f"## {name}:" in md for name in sections)


class _BrokenVae(GpuCheck):
    def section_vae_decode(self):
        raise RuntimeError("out of memory (stand-in for a GPU failure)")


def test_a_failing_section_is_recorded_and_the_run_goes_on_and_a_second_run_is_safe(tmp_path):
    first = _BrokenVae(device="cpu", tiny=True, out=tmp_path, repeat=1, progress=lambda _line: None).run(
        ["transformer", "vae_decode", "tensorrt"])
    assert first["sections"]["vae_decode"]["status"] == "error"
    assert "out of memory" in first["sections"]["vae_decode"]["error"]
    assert first["sections"]["transformer"]["status"] == "ok"
    assert first["sections"]["tensorrt"]["status"] == "skipped"
    again = small(tmp_path).run(["vae_decode"])  # the same day's files are overwritten, nothing fails
    assert again["sections"]["vae_decode"]["status"] == "ok"


def test_sections_past_the_budget_are_skipped_as_such(tmp_path):
    result = small(tmp_path, budget_s=0).run(["transformer", "batching"])
    assert {s["status"] for s in result["sections"].values()} == {"skipped"}
    assert all("budget" in s["reason"] for s in result["sections"].values())


def test_engine_rows_time_a_real_onnxruntime_engine(tmp_path, tiny_engines):
    """The ONNX Runtime CUDA / TensorRT rows' code, run on an engine this machine can run."""
    row = small(tmp_path)._engine_rows("onnxruntime", engines=tiny_engines)
    assert row["forward_s"] > 0 and row["layers"] == 6


@pytest.mark.parametrize("argv", [["--device", "cpu", "--tiny", "--sections", "vae_decode", "--repeat", "1"]])
def test_script_entry_point(tmp_path, argv, capsys):
    from qwen_image_trt.bench.gpu_check import main

    assert main(argv + ["--out", str(tmp_path)]) == 0
    assert "vae_decode: ok" in capsys.readouterr().out
