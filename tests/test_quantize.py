"""int8 / fp8 quantization: recipe, Q/DQ placement in the ONNX graph, ONNX Runtime parity inside the pipeline."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from qwen_image_trt.core.errors import InputError

HIGH_PRECISION = ("img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def calib_set(tiny_checkpoint, tmp_path_factory):
    from qwen_image_trt.calibration.capture import calibrate

    out = tmp_path_factory.mktemp("qcalib") / "set"
    calibrate(tiny_checkpoint, out, progress=False)  # tiny defaults: 8 prompts x 4 steps at 64x64, 1 held out
    return out


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tiny_engines, calib_set, tmp_path_factory):
    from qwen_image_trt.compile.quantize import quantize_onnx

    root = tmp_path_factory.mktemp("quant")
    return {p: quantize_onnx(tiny_checkpoint, calib_set, root / p, p, vae_from=tiny_engines, progress=False)
            and root / p for p in ("int8", "fp8")}


def _weight_dq_consumers(path):
    """{consumer node name: op} for MatMul/Gemm nodes whose weight comes from a DequantizeLinear of an initializer."""
    import onnx

    g = onnx.load(str(path)).graph
    inits = {i.name for i in g.initializer}
    dq_of_init = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    act_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits}
    out = {}
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in dq_of_init:
            assert n.input[0] in act_dq, f"{n.name}: weight is quantized but the activation is not"
            out[n.name] = n.op_type
    return out, g


def _block(name):
    m = re.search(r"transformer_blocks\.(\d+)", name)
    return int(m.group(1)) if m else None


def test_default_recipe_keeps_sensitive_layers():
    from qwen_image_trt.compile.recipe import default_recipe, is_excluded, make_recipe

    r = default_recipe("int8", 60)
    assert r["algorithm"] == "smoothquant" and r["smoothquant_alpha"] == 0.8
    assert r["kept_blocks"] == [0, 1, 58, 59]
    for name in ("img_in", "txt_in", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out",
                 "transformer_blocks.1.attn.to_q", "transformer_blocks.58.img_mlp.net.2"):
        assert is_excluded(name, r), name
    assert not is_excluded("transformer_blocks.2.attn.to_q", r)
    assert not is_excluded("transformer_blocks.10.img_mlp.net.0.proj", r)
    r = make_recipe("fp8", 60, keep=["img_mlp"])
    assert r["algorithm"] == "max" and is_excluded("transformer_blocks.10.img_mlp.net.0.proj", r)
    assert not is_excluded("transformer_blocks.10.txt_mlp.net.0.proj", r)
    r = make_recipe("int8", 60, overrides={"keep_first_blocks": 0, "smoothquant_alpha": 0.5})
    assert r["kept_blocks"] == [58, 59] and r["smoothquant_alpha"] == 0.5
    with pytest.raises(InputError):
        make_recipe("int4", 60)
    with pytest.raises(InputError, match="keep"):
        make_recipe("int8", 60, keep=["mlp_of_doom"])
    with pytest.raises(InputError):
        make_recipe("int8", 60, overrides={"no_such_field": 1})
    with pytest.raises(InputError):
        make_recipe("int8", 60, overrides={"keep_last_blocks": 61})


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_only_on_intended_layers(quantized, precision):
    folder = quantized[precision]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["precision"] == precision and manifest["quantization"]["recipe"]["precision"] == precision
    entry = manifest["components"]["transformer"]
    consumers, g = _weight_dq_consumers(folder / entry["file"])
    blocks = {_block(n) for n in consumers}
    assert blocks == {2, 3}, consumers  # tiny has 6 blocks: 0, 1, 4, 5 are kept in high precision
    assert not [n for n in consumers if any(h in n for h in HIGH_PRECISION)]
    # Every Linear of blocks 2 and 3 (attention q/k/v/out x2, two MLPs x2 layers, two modulations) is quantized.
    assert len(consumers) == 2 * 14 == len(manifest["quantization"]["quantized_layers"])
    assert all(n.domain in ("", "ai.onnx") for n in g.node), "custom-domain ops left in the graph"
    import onnx

    onnx_type = onnx.TensorProto.INT8 if precision == "int8" else onnx.TensorProto.FLOAT8E4M3FN
    stored = [i for i in g.initializer if i.name.endswith("_quantized")]
    assert len(stored) == 28 and all(i.data_type == onnx_type for i in stored)
    assert entry["qdq"]["weights_stored_quantized"] == 28 and entry["qdq"]["weight_transposes_folded"] > 0
    if precision == "fp8":
        assert entry["qdq"]["fp8_nodes_made_native"] > 0
        q_zp = {n.input[2] for n in g.node if n.op_type == "QuantizeLinear"}
        zps = [i for i in g.initializer if i.name in q_zp]
        assert zps and all(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in zps)


def test_keep_img_mlp_removes_its_qdq(tiny_checkpoint, tiny_engines, calib_set, tmp_path):
    from qwen_image_trt.compile.quantize import quantize_onnx

    m = quantize_onnx(tiny_checkpoint, calib_set, tmp_path / "q", "int8", keep=["img_mlp"], vae_from=tiny_engines,
                      progress=False)
    consumers, _ = _weight_dq_consumers(tmp_path / "q" / m["components"]["transformer"]["file"])
    assert consumers and not [n for n in consumers if "img_mlp" in n]
    assert [n for n in consumers if "txt_mlp" in n]
    assert "img_mlp" in m["quantization"]["recipe"]["keep"]
    assert not [n for n in m["quantization"]["quantized_layers"] if "img_mlp" in n]


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_graph_matches_eager_fp32_on_held_out_forwards(quantized, precision, tiny_checkpoint, calib_set):
    import onnxruntime as ort

    from qwen_image_trt.calibration.capture import CalibrationSet
    from qwen_image_trt.models.checkpoint import read_config
    from qwen_image_trt.models.specs import TRANSFORMER
    from qwen_image_trt.models.transformer_export import INPUT_NAMES

    folder = quantized[precision]
    entry = json.loads((folder / "manifest.json").read_text())["components"]["transformer"]
    assert entry["ort_check"]["cosine_min"] >= 0.99
    sess = ort.InferenceSession(str(folder / entry["file"]), providers=["CPUExecutionProvider"])
    module = TRANSFORMER.build_module(tiny_checkpoint, torch.float32)
    axes = read_config(tiny_checkpoint, "transformer")["axes_dims_rope"]
    n = 0
    for args in CalibrationSet(calib_set).export_inputs(axes, "holdout"):
        got = sess.run(None, {k: a.numpy() for k, a in zip(INPUT_NAMES, args)})[0]
        with torch.no_grad():
            want = module(*args).numpy()
        cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
        assert cos >= 0.99, (precision, cos)
        n += 1
    assert n == 4


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantized_engines_run_in_the_pipeline_and_pass_image_gate(quantized, precision, tiny_checkpoint, eager_pipe):
    from qwen_image_trt import load_pipeline
    from qwen_image_trt.parity.gates import gates_for

    pipe = load_pipeline(tiny_checkpoint, engines=quantized[precision], backend="onnxruntime")
    kw = dict(prompt="a red bicycle leaning on a wall, 一只猫", negative_prompt=" ", true_cfg_scale=4.0, height=64,
              width=64, num_inference_steps=4)
    got = pipe(**kw, generator=torch.Generator().manual_seed(5)).images[0]
    want = eager_pipe(**kw, generator=torch.Generator().manual_seed(5)).images[0]
    from qwen_image_trt.parity.metrics import psnr as image_psnr

    psnr = image_psnr(np.asarray(got), np.asarray(want))
    assert psnr >= gates_for(precision).image_psnr_min, psnr


def test_quantize_checks_before_work(tiny_checkpoint, tiny_engines, calib_set, tmp_path):
    from qwen_image_trt.compile.quantize import quantize_onnx

    with pytest.raises(InputError, match="precision"):
        quantize_onnx(tiny_checkpoint, calib_set, tmp_path / "a", "int4")
    with pytest.raises(InputError, match="too few"):
        quantize_onnx(tiny_checkpoint, calib_set, tmp_path / "a", "int8", sizes=[(64, 64), (128, 64)])
    other = tmp_path / "other-set"
    shutil.copytree(calib_set, other)
    m = json.loads((other / "manifest.json").read_text())
    m["checkpoint"]["identity"] = "feedfacefeedface"
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="recorded from this checkpoint"):
        quantize_onnx(tiny_checkpoint, other, tmp_path / "a", "int8")
    with pytest.raises(InputError, match="keep"):
        quantize_onnx(tiny_checkpoint, calib_set, tmp_path / "a", "fp8", keep=["nonsense"])
    assert not (tmp_path / "a").exists()  # nothing was written


def test_quantize_skips_when_unchanged(tiny_checkpoint, tiny_engines, calib_set, quantized):
    from qwen_image_trt.compile.quantize import quantize_onnx

    folder = quantized["int8"]
    before = json.loads((folder / "manifest.json").read_text())
    again = quantize_onnx(tiny_checkpoint, calib_set, folder, "int8", vae_from=tiny_engines, progress=False)
    assert again["skipped"]
    assert again["components"]["transformer"]["sha256"] == before["components"]["transformer"]["sha256"]
