"""Parity gates that can fail: each gate fails on a deliberately broken engine, and every reported figure is
recomputed here from the eager and engine outputs the report saved (so a report that compared the engine with
itself cannot pass)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qwen_image_trt.parity.run import ParityConfig, run_parity

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = dict(steps=2, sizes=[(32, 32)], batches=[1], image_size=(64, 64), progress=False)


def _broken_copy(src, dst, component: str, pick, factor: float):
    """Copy an engine folder with one initializer of `component` scaled by `factor`."""
    import onnx_ir as ir

    from qwen_image_trt.compile import onnx_io
    from qwen_image_trt.core.manifest import read_manifest

    shutil.copytree(src, dst)
    path = read_manifest(dst).components[component].graph.path(dst)
    model = onnx_io.load_structure(path)
    hits = 0
    for name, v in list(model.graph.initializers.items()):
        if pick(name):
            v.const_value = ir.tensor(v.const_value.numpy() * factor, name=name)
            hits += 1
    assert hits, f"no initializer of {component} picked"
    onnx_io.save(model, path)
    return dst


def _failed(report) -> set[str]:
    return {g["name"] for g in report.data["gates"] if not g["ok"]}


@pytest.fixture(scope="module")
def good_report(tiny_checkpoint, tiny_engines, tmp_path_factory):
    return run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=tiny_engines,
                                   out=tmp_path_factory.mktemp("parity") / "good", **SMALL))


def test_reported_figures_are_recomputed_from_the_saved_outputs(good_report):
    """Forward and step metrics from outputs.safetensors, PSNR/SSIM from the saved eager and engine PNGs."""
    from safetensors.torch import load_file

    from qwen_image_trt.core.metrics import tensor_metrics
    from qwen_image_trt.parity.metrics import psnr, ssim

    data, out = good_report.data, good_report.html_path.parent
    assert good_report.passed
    saved = load_file(str(out / data["outputs_file"]))
    for row in data["forward"] + data["per_step"]:
        eager, engine = saved[f"{row['key']}.eager"], saved[f"{row['key']}.engine"]
        assert not torch.equal(eager, engine) or row["max_abs"] == 0  # two different computations were saved
        again = tensor_metrics(eager, engine)
        assert again["cosine"] == pytest.approx(row["cosine"], abs=1e-9)
        assert again["rel_l2"] == pytest.approx(row["rel_l2"], rel=1e-6, abs=1e-12)
    for img in data["images"]:
        a, b = (np.asarray(Image.open(out / img["files"][k])) for k in ("eager", "engine"))
        assert psnr(a, b) == pytest.approx(img["psnr_db"]) and ssim(a, b) == pytest.approx(img["ssim"])
    assert data["quantization"] is None and "quant_mismatch_max" not in {g["name"] for g in data["gates"]}


def test_a_broken_vae_decoder_fails_the_image_and_forward_gates(tiny_checkpoint, tiny_engines, tmp_path):
    """The transformer is intact, so the denoising trajectory (step gate) still matches; the images do not."""
    bad = _broken_copy(tiny_engines, tmp_path / "bad-vae", "vae_decoder",
                       lambda n: n.startswith("vae.decoder.conv_out") and n.endswith("weight"), 1.6)
    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=bad, out=tmp_path / "r", **SMALL))
    failed = _failed(report)
    assert {"image_psnr_min", "image_ssim_min", "forward_cosine_min", "forward_rel_l2_max"} <= failed, failed
    assert "step_cosine_min" not in failed


def test_a_broken_transformer_fails_the_step_gate(tiny_checkpoint, tiny_engines, tmp_path):
    """The output projection off by half: every noise prediction is wrong, so the trajectory leaves eager's.
    (A wrong weight inside one block barely moves the tiny model's trajectory: its blocks add a few percent.)"""
    bad = _broken_copy(tiny_engines, tmp_path / "bad-tx", "transformer",
                       lambda n: n.startswith("transformer.proj_out.weight"), 1.5)
    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=bad, out=tmp_path / "r", **SMALL))
    assert {"step_cosine_min", "forward_cosine_min"} <= _failed(report), _failed(report)


@pytest.fixture(scope="module")
def int8_folder(tiny_checkpoint, tiny_engines, tmp_path_factory):
    from qwen_image_trt.calibration.capture import calibrate
    from qwen_image_trt.compile.quantize import quantize_onnx

    root = tmp_path_factory.mktemp("pq")
    calibrate(tiny_checkpoint, root / "calib", num_prompts=4, steps=2, holdout=1, progress=False)
    quantize_onnx(tiny_checkpoint, root / "calib", root / "int8", "int8", graphs=tiny_engines, progress=False)
    return root / "int8"


def test_quantized_engine_reports_its_evidence(tiny_checkpoint, int8_folder, tmp_path):
    """parity recomputes the quantize stage's figures on the backend it checks, and gates them."""
    good = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=int8_folder, out=tmp_path / "good", **SMALL))
    q = good.data["quantization"]
    assert q and 0 < q["mismatch"] <= 0.25 and 0 < q["block_rel_err"] <= 0.25
    assert {"quant_mismatch_max", "quant_block_rel_err_max"} <= {g["name"] for g in good.data["gates"]}
    assert not {"quant_mismatch_max", "quant_block_rel_err_max"} & _failed(good)


@pytest.mark.parametrize("suffix,factor,gates", [
    # Activation scales x4: not the quantization ModelOpt calibrated (mismatch); its error against high precision
    # need not grow (a 4x range clips less), which is why error-vs-fp32 alone cannot see it.
    (".input_quantizer.scale", 4.0, {"quant_mismatch_max"}),
    # Weights dequantized with a quarter of their scale: both figures fail.
    (".weight_quantizer.scale", 0.25, {"quant_mismatch_max", "quant_block_rel_err_max"}),
])
def test_broken_quantization_fails_its_parity_gates(tiny_checkpoint, int8_folder, tmp_path, suffix, factor, gates):
    bad = _broken_copy(int8_folder, tmp_path / "bad", "transformer", lambda n: n.endswith(suffix), factor)
    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=bad, out=tmp_path / "r", **SMALL))
    assert gates <= _failed(report), report.data["quantization"]
    # The old gate alone: closeness to fp32 per forward stays high with these broken numbers.
    assert min(r["cosine"] for r in report.data["forward"]) > 0.99


def test_non_finite_outputs_fail_the_finiteness_gate(tiny_checkpoint, tiny_engines, tmp_path):
    bad = _broken_copy(tiny_engines, tmp_path / "nan", "vae_decoder",
                       lambda n: n.startswith("vae.decoder.conv_out") and n.endswith("bias"), float("nan"))
    report = run_parity(ParityConfig(checkpoint=tiny_checkpoint, engines=bad, out=tmp_path / "r", **SMALL))
    assert "all_outputs_finite" in _failed(report)
