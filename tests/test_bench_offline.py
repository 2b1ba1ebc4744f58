"""`qitrt bench offline` on the tiny model: a short run is well-formed and writes JSON, markdown and plots;
bad input fails early and clearly; a variant that fails leaves the others' rows on disk."""

from __future__ import annotations

import json
import shutil

import pytest

from qwen_image_trt.cli import main


def _run(argv, capsys=None):
    code = main(argv)
    return code, (capsys.readouterr() if capsys else None)


@pytest.fixture(scope="module")
def short_run(tiny_checkpoint, tiny_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_offline")
    code = main(["bench", "offline", str(tiny_checkpoint), "--backends", "torch,onnxruntime", "--engines",
                 str(tiny_engines), "--sizes", "32x32,64x32", "--batch", "1,2", "--steps", "2", "--repeat", "2",
                 "--out", str(out), "--tag", "tiny", "--no-progress"])
    return code, out


def test_short_run_is_well_formed(short_run):
    code, out = short_run
    assert code == 0
    result = json.loads((out / "tiny.json").read_text())
    assert result["kind"] == "offline" and result["complete"] and not result["errors"]
    assert result["machine"]["versions"]["torch"] and result["command"].startswith("qitrt")
    assert "no peak known: CPU" in result["notes"]
    rows = result["rows"]
    assert {(r["label"], r["size"], r["batch"]) for r in rows} == {
        (lb, s, b) for lb in ("torch:fp32", "onnxruntime:fp32") for s in ("32x32", "64x32") for b in (1, 2)}
    for r in rows:
        assert r["latency_s"] > 0 and len(r["latency_all_s"]) == 2
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["latency_s"])
        for key in ("text_encoder_s", "transformer_step_s", "vae_decode_s"):
            assert 0 < r[key] < r["latency_s"]
        assert r["transformer_calls"] == 2  # one batched forward per step covers both CFG branches
        assert r["transformer_forward"]["batch"] == 2 * r["batch"]
        assert r["transformer_forward"]["image_tokens"] == (r["width"] // 16) * (r["height"] // 16)
        assert r["flops_per_step"] > 0 and r["transformer_flops_per_s"] > 0
        assert r["roofline_fraction"] == "n/a (CPU)" and r["floor_step_s"] is None
        assert r["peak_memory_bytes"] > 0 and "RSS" in r["memory_kind"]
        assert r["speedup_vs_eager"] > 0 and r["step_speedup_vs_eager"] > 0
        if r["backend"] == "torch":
            assert r["speedup_vs_eager"] == 1.0
        else:
            assert r["transformer_forward"]["text_tokens"] % 32 == 0  # the drop-in pads text to its bucket


def test_short_run_writes_markdown_and_plots(short_run):
    _, out = short_run
    md = (out / "tiny.md").read_text()
    assert "| variant | size | batch |" in md and "onnxruntime:fp32" in md and "n/a (CPU)" in md
    for name in ("tiny_throughput_vs_batch.png", "tiny_speedup.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_unknown_backend(tiny_checkpoint, tmp_path, capsys):
    code, cap = _run(["bench", "offline", str(tiny_checkpoint), "--backends", "torch,tensorflow",
                      "--out", str(tmp_path)], capsys)
    assert code == 2 and "backend='tensorflow'" in cap.err and "torch, onnxruntime, tensorrt" in cap.err
    assert not list(tmp_path.iterdir())  # refused before any work


def test_engines_missing_for_a_backend(tiny_checkpoint, tiny_engines, tmp_path, capsys):
    code, cap = _run(["bench", "offline", str(tiny_checkpoint), "--backends", "onnxruntime", "--out",
                      str(tmp_path)], capsys)
    assert code == 2 and "for backend onnxruntime" in cap.err
    code, cap = _run(["bench", "offline", str(tiny_checkpoint), "--backends", "tensorrt", "--engines",
                      str(tiny_engines), "--out", str(tmp_path)], capsys)
    assert code == 2 and "TensorRT engines" in cap.err and "for backend tensorrt" in cap.err
    code, cap = _run(["bench", "offline", str(tiny_checkpoint), "--backends", "onnxruntime", "--engines",
                      str(tmp_path / "nope"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "an existing engine folder" in cap.err


def test_failed_variant_keeps_partial_results(tiny_checkpoint, tiny_engines, tmp_path, capsys):
    # an engine folder that claims TensorRT engines that are not there: that variant fails to load,
    # eager torch is still measured and written
    fake = tmp_path / "trt"
    shutil.copytree(tiny_engines, fake)
    from qwen_image_trt.core.manifest import TensorRTEngine, read_manifest, write_manifest

    manifest = read_manifest(fake)
    for comp in ("transformer", "vae_decoder"):
        manifest.components[comp].tensorrt = TensorRTEngine(
            file=f"{comp}.missing.plan", bytes=0, tensorrt="10.13.0", gpu="NVIDIA H100", compute_capability="9.0",
            profiles={}, cache_key="0" * 64, builder={})
    write_manifest(fake, manifest)
    out = tmp_path / "out"
    code, cap = _run(["bench", "offline", str(tiny_checkpoint), "--backends", "tensorrt", "--engines", str(fake),
                      "--sizes", "32x32", "--steps", "2", "--repeat", "1", "--warmup", "0", "--out", str(out),
                      "--no-progress", "--no-plots"], capsys)
    assert code == 1
    result = json.loads((out / "offline.json").read_text())
    assert [r["label"] for r in result["rows"]] == ["torch:fp32"]
    assert result["errors"][0]["label"] == "tensorrt:fp32" and result["errors"][0]["stage"] == "load"
    assert "eager torch added" in " ".join(result["notes"])
    assert "Errors" in (out / "offline.md").read_text() and "tensorrt:fp32" in cap.err
