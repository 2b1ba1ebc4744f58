"""Qwen-Image-2.1 calibration and INT8/FP8 quantization: `qitrt calibrate` records QwenImage21Pipeline's transformer
calls (generation and editing, the layout in `img_mask`), the replay rebuilds what the graphs take, ModelOpt
calibrates the weights the extract and cached graphs share, both Q/DQ graphs carry the calibrated numbers, and
`qitrt build --precision int8` + `qitrt parity` pass with the quantization evidence; a graph with a wrong scale is
refused."""

from __future__ import annotations

import json

import pytest
import torch

from qwen_image_trt.cli import main
from qwen_image_trt.core.errors import InputError, QitrtError


@pytest.fixture(scope="module")
def calib(tiny21, tmp_path_factory):
    from qwen_image_trt.calibration.capture import calibrate

    root, _ = tiny21
    out = tmp_path_factory.mktemp("calib21") / "set"
    calibrate(root, out, num_prompts=6, steps=2, seed=0, progress=False)
    return out


def test_calibration_records_generation_and_edits_and_replays_them(tiny21, calib):
    """Every recorded call replays, through the engine's layout, to the stock forward's target tokens."""
    from qwen_image_trt.calibration.capture import CalibrationSet
    from qwen_image_trt.compile.quantize21 import Passes21, replay_21
    from qwen_image_trt.models import checkpoint as ckpt

    root, _ = tiny21
    cs = CalibrationSet(calib)
    samples = cs.manifest.samples
    assert {bool(c.condition_grids) for s in samples for c in s.calls} == {True, False}  # generation and edits
    assert {c.branch for s in samples for c in s.calls} == {"cond", "uncond"}
    stock = ckpt.load_transformer(root)
    passes = Passes21(stock)
    checked = 0
    for call in cs.calls("calib"):
        grids = call["grids"]
        kw = dict(hidden_states=call["hidden_states"], encoder_hidden_states=call["encoder_hidden_states"],
                  encoder_hidden_states_mask=call["encoder_hidden_states_mask"], timestep=call["timestep"],
                  img_mask=call["img_mask"], img_shapes=[[*grids[1:], grids[0]]])
        with torch.no_grad():
            want = stock(**kw, return_dict=False)[0]
            got = passes(*replay_21(call, stock.config.axes_dims_rope))
        t = got.shape[1]
        assert float((got - want[:, -t:]).abs().max() / want[:, -t:].abs().max()) <= 1e-5
        checked += 1
    assert checked == cs.num_calls("calib") >= 8


def test_evidence_names_are_the_graphs_own():
    """core.quant_evidence (read by parity, which may not import the build stage) spells the 2.1 graphs' inputs."""
    from qwen_image_trt.core.quant_evidence import E2E_INPUTS_21
    from qwen_image_trt.models.transformer21_export import CACHED_INPUTS, EXTRACT_INPUTS

    assert E2E_INPUTS_21[:7] == EXTRACT_INPUTS
    assert set(E2E_INPUTS_21[7:]) == set(CACHED_INPUTS) - {"prefix_kv", "prefix_key_valid"}


def test_recipe_names_the_21_block_parts():
    from qwen_image_trt.compile.recipe import FAMILY_21, is_excluded, make_recipe

    r = make_recipe("int8", 32, family=FAMILY_21, keep=["img_mlp"])
    assert r["kept_blocks"] == [0, 1, 30, 31]
    assert is_excluded("modulation.1", r) and is_excluded("txt_in.in_layer", r) and is_excluded("img_in", r)
    assert is_excluded("transformer_blocks.5.img_mlp.gate_layer", r)
    assert not is_excluded("transformer_blocks.5.attn.to_q", r)
    assert make_recipe("fp8", 4, family=FAMILY_21)["kept_blocks"] == [0, 3]  # small models keep num_blocks // 4
    with pytest.raises(InputError, match="quantize_modulation"):
        make_recipe("int8", 32, family=FAMILY_21, overrides={"quantize_modulation": False})
    with pytest.raises(InputError, match="no block would be quantized"):
        make_recipe("int8", 4, family=FAMILY_21, overrides={"keep_first_blocks": 2, "keep_last_blocks": 2})
    with pytest.raises(InputError, match="keep"):
        make_recipe("int8", 32, family=FAMILY_21, keep=["txt_mlp"])  # a 2509 part: 2.1 has none


@pytest.mark.parametrize("precision", ["fp8"])
def test_quantize_writes_both_graphs_with_the_calibrated_numbers(tiny21, calib, tmp_path, precision):
    import onnx

    from qwen_image_trt.compile.quantize import quantize_onnx
    from qwen_image_trt.compile.quantize21 import verify_graphs_21
    from qwen_image_trt.core.quant_evidence import EVIDENCE_FILE

    root, engines = tiny21
    m = quantize_onnx(root, calib, tmp_path / "q", precision, graphs=engines, progress=False)
    assert set(m.components) == {"transformer_extract", "transformer_cached", "vae_decoder", "vae_encoder"}
    q = m.quantization
    assert q.quantized_layers and all(n.startswith(("transformer_blocks.1.", "transformer_blocks.2."))
                                      for n in q.quantized_layers)
    assert {"modulation.1", "img_in", "proj_out"} <= set(q.kept_layers)
    for name in ("transformer_extract", "transformer_cached"):
        c = m.components[name]
        assert c.precision == precision and c.qdq["quantized_matmuls"] == len(q.quantized_layers)
        graph = onnx.load(str(c.graph.path(tmp_path / "q")), load_external_data=False)
        assert sum(n.op_type == "QuantizeLinear" for n in graph.graph.node) == len(q.quantized_layers)
    check = m.components["transformer_cached"].check
    assert check["mismatch"] <= 0.25 and 0 < check["block_rel_err"] < 1
    # a graph whose scale is not the calibrated one is refused, layer by layer
    from qwen_image_trt.compile import onnx_io

    path = m.components["transformer_cached"].graph.path(tmp_path / "q")
    model = onnx_io.load_structure(path)
    layer = q.quantized_layers[0]
    scale = model.graph.initializers[f"{layer}.input_quantizer.scale"]
    import numpy as np
    import onnx_ir as ir

    scale.const_value = ir.tensor(np.asarray(scale.const_value.numpy() * 3, dtype=scale.const_value.numpy().dtype))
    broken = tmp_path / "broken"
    broken.mkdir()
    onnx_io.save(model, broken / "transformer_cached.onnx")
    paths = {"transformer_extract": m.components["transformer_extract"].graph.path(tmp_path / "q"),
             "transformer_cached": broken / "transformer_cached.onnx"}
    with pytest.raises(QitrtError, match="not the calibrated ones"):
        verify_graphs_21(paths, tmp_path / "q" / EVIDENCE_FILE, "fp32", precision)


def test_int8_build_and_parity_on_21(tiny21, tmp_path, capsys):
    """`qitrt build --precision int8` (export, calibrate, quantize, lint, ONNX Runtime) and `qitrt parity` with the
    int8 gates and the quantization evidence recomputed on the engines."""
    root, _ = tiny21
    out = tmp_path / "int8"
    assert main(["build", str(root), "--precision", "int8", "--out", str(out), "--num-prompts", "4",
                 "--steps", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"]["recipe"]["family"] == "qwen-image-2.1"
    assert [s["stage"] for s in manifest["stages"]] == ["export", "calibrate", "quantize", "lint", "engine"]
    capsys.readouterr()
    assert main(["parity", str(root), "--engines", str(out), "--out", str(tmp_path / "parity"), "--sizes", "64x64",
                 "--batches", "1", "--steps", "2", "--image-size", "64x64"]) == 0
    report = json.loads((tmp_path / "parity" / "report.json").read_text())
    assert report["precision"] == "int8" and report["quantization"]["calls"] == 4
    assert report["quantization"]["mismatch"] <= 0.75 and report["passed"]
    assert "quant_mismatch_max" in {g["name"] for g in report["gates"]}
