"""Export: the wrapper equals the stock module; graphs are valid, dynamic, resumable and described by a manifest."""

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qwen_image_trt.build.export import export_onnx
from qwen_image_trt.errors import InputError
from qwen_image_trt.models.checkpoint import checkpoint_identity, load_transformer, load_vae
from qwen_image_trt.models.specs import SPECS, VaeDecoderExport, VaeEncoderExport
from qwen_image_trt.models.transformer_export import ExportableTransformer, sample_inputs


@pytest.mark.parametrize("batch, grid, text_len", [(1, (4, 4), 5), (2, (6, 10), 12), (3, (8, 6), 33)])
def test_wrapper_equals_stock_transformer(tiny_checkpoint, batch, grid, text_len):
    stock = load_transformer(tiny_checkpoint)
    wrapper = ExportableTransformer(copy.deepcopy(stock)).eval()
    args = sample_inputs(stock.config, batch=batch, grid=grid, text_len=text_len)
    with torch.no_grad():
        want = stock(hidden_states=args[0], encoder_hidden_states=args[1], encoder_hidden_states_mask=args[2],
                     timestep=args[3], img_shapes=[[(1, *grid)]] * batch, return_dict=False)[0]
        got = wrapper(*args)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-6


def test_vae_wrappers_equal_stock_vae(tiny_checkpoint):
    vae = load_vae(tiny_checkpoint)
    z = torch.randn(2, 16, 1, 6, 4, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 1, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want_img = vae.decode(z, return_dict=False)[0]
        want_params = vae.encode(x).latent_dist.parameters
        got_img = VaeDecoderExport(copy.deepcopy(vae))(z)
        got_params = VaeEncoderExport(vae)(x)
    assert (got_img - want_img).abs().max().item() <= 1e-5
    assert (got_params - want_params).abs().max().item() <= 1e-5


def test_export_manifest_and_graphs(tiny_checkpoint, tiny_engines):
    m = json.loads((tiny_engines / "manifest.json").read_text())
    assert m["checkpoint"]["identity"] == checkpoint_identity(tiny_checkpoint)
    assert m["precision"] == "fp32" and m["opset"] >= 17 and "dynamo=False" in m["exporter"]
    assert m["checkpoint"]["transformer_config"]["num_layers"] == 6
    assert {"torch", "onnx", "onnxruntime", "diffusers"} <= set(m["versions"])
    for name in ("transformer", "vae_decoder", "vae_encoder"):
        entry = m["components"][name]
        path = tiny_engines / entry["file"]
        onnx.checker.check_model(str(path))
        assert [i["name"] for i in entry["inputs"]] == SPECS[name].input_names
        assert entry["ort_check"]["max_abs_err_vs_eager"] < 1e-4
    tx = {i["name"]: i["shape"] for i in m["components"]["transformer"]["inputs"]}
    assert tx["hidden_states"][:2] == ["batch", "image_tokens"]
    assert tx["encoder_hidden_states"][:2] == ["batch", "text_tokens"]
    assert m["components"]["vae_decoder"]["inputs"][0]["shape"] == ["batch", 16, 1, "latent_height", "latent_width"]


@pytest.mark.parametrize("batch, grid, text_len", [(1, (2, 2), 1), (2, (4, 8), 32), (4, (16, 16), 64),
                                                   (1, (8, 4), 100)])
def test_transformer_graph_runs_at_other_shapes(tiny_checkpoint, tiny_engines, batch, grid, text_len):
    sess = ort.InferenceSession(str(tiny_engines / "transformer.onnx"), providers=["CPUExecutionProvider"])
    module = ExportableTransformer(load_transformer(tiny_checkpoint)).eval()
    args = sample_inputs(module.transformer.config, batch=batch, grid=grid, text_len=text_len, seed=3)
    got = sess.run(None, {n: a.numpy() for n, a in zip(SPECS["transformer"].input_names, args)})[0]
    with torch.no_grad():
        want = module(*args).numpy()
    assert got.shape == (batch, grid[0] * grid[1], 64)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("batch, height, width", [(1, 16, 16), (3, 64, 96), (1, 128, 32)])
def test_vae_decoder_graph_dynamic(tiny_checkpoint, tiny_engines, batch, height, width):
    sess = ort.InferenceSession(str(tiny_engines / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((batch, 16, 1, height // 8, width // 8)).astype(np.float32)
    (img,) = sess.run(None, {"latents": z})
    with torch.no_grad():
        want = load_vae(tiny_checkpoint).decode(torch.from_numpy(z), return_dict=False)[0].numpy()
    assert img.shape == want.shape == (batch, 3, 1, height, width)
    assert np.abs(img - want).max() < 1e-4


def test_export_skips_unchanged_and_redoes_forced(tiny_checkpoint, tmp_path):
    out = tmp_path / "eng"
    first = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    stamp = (out / "vae_decoder.onnx").stat().st_mtime_ns
    again = export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    assert (out / "vae_decoder.onnx").stat().st_mtime_ns == stamp
    assert again["components"]["vae_decoder"]["sha256"] == first["components"]["vae_decoder"]["sha256"]
    (out / "vae_decoder.onnx").write_bytes(b"corrupted")  # a damaged file is never trusted
    export_onnx(tiny_checkpoint, out, components=["vae_decoder"], progress=False)
    onnx.checker.check_model(str(out / "vae_decoder.onnx"))


def test_export_fp16_carries_precision_in_graph(tiny_checkpoint, tmp_path):
    m = export_onnx(tiny_checkpoint, tmp_path / "fp16", precision="fp16", components=["transformer"], progress=False)
    graph = onnx.load(str(tmp_path / "fp16" / "transformer.onnx"))
    dtypes = {i.data_type for i in graph.graph.initializer if len(i.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}  # weights in half, I/O stays float32
    assert m["components"]["transformer"]["inputs"][0]["dtype"] == "float32"
    assert m["components"]["transformer"]["ort_check"]["max_abs_err_vs_eager"] < 0.05


@pytest.mark.parametrize("kwargs, field", [(dict(precision="int4"), "precision"),
                                           (dict(components=["unet"]), "components")])
def test_export_bad_input(tiny_checkpoint, tmp_path, kwargs, field):
    with pytest.raises(InputError, match=field):
        export_onnx(tiny_checkpoint, tmp_path / "x", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_export_bf16_transformer_keeps_vae_fp32(tiny_checkpoint, tmp_path):
    m = export_onnx(tiny_checkpoint, tmp_path / "bf16", precision="bf16", components=["transformer", "vae_decoder"],
                    progress=False)
    tx, vae = m["components"]["transformer"], m["components"]["vae_decoder"]
    graph = onnx.load(str(tmp_path / "bf16" / "transformer.onnx"))
    assert {i.data_type for i in graph.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.BFLOAT16}
    assert tx["precision"] == "bf16" and vae["precision"] == "fp32"
    # ONNX Runtime's CPU provider cannot run bf16 MatMul: the manifest says so rather than claiming a run.
    assert tx["ort_check"]["max_abs_err_vs_eager"] is None and "bf16" in tx["ort_check"]["skipped"]
    assert vae["ort_check"]["max_abs_err_vs_eager"] < 1e-4


def test_large_graphs_get_one_external_data_file(tiny_checkpoint, tmp_path, monkeypatch):
    """The real transformer is ~40 GB: past protobuf's 2 GB limit, weights go to <name>.onnx.data."""
    import qwen_image_trt.build.export as export

    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1024)  # pretend the tiny VAE is huge
    m = export.export_onnx(tiny_checkpoint, tmp_path / "ext", components=["vae_decoder"], progress=False)
    entry = m["components"]["vae_decoder"]
    assert entry["external_data"] == "vae_decoder.onnx.data"
    files = sorted(p.name for p in (tmp_path / "ext").iterdir())
    assert files == ["manifest.json", "vae_decoder.onnx", "vae_decoder.onnx.data"]
    assert (tmp_path / "ext" / "vae_decoder.onnx").stat().st_size < entry["bytes"] / 10
    assert entry["ort_check"]["max_abs_err_vs_eager"] < 1e-4  # ran in ONNX Runtime from the data file
