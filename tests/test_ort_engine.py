"""ONNX Runtime engine target: the optimized model is saved, reloads, and matches the source graph."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_image_trt.compile.ort_engine import build_ort_engine
from qwen_image_trt.core.errors import InputError


def _run(path, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def _feeds(tiny_checkpoint, component):
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.specs import SPECS

    spec = SPECS[component]
    shape = dict(batch=2, grid=(4, 6), text_len=9) if component == "transformer" else dict(batch=2, height=48, width=32)
    args = spec.sample_inputs(ckpt.read_config(tiny_checkpoint, spec.part), **shape, seed=3)
    return {n: a.numpy() for n, a in zip(spec.input_names, args)}


@pytest.mark.parametrize("component,level", [("transformer", "basic"), ("transformer", "extended"),
                                             ("vae_decoder", "basic")])
def test_optimized_graph_matches_source(tiny_engines, tiny_checkpoint, tmp_path, component, level):
    src = tiny_engines / f"{component}.onnx"
    engine = build_ort_engine(src, tmp_path, component, precision="fp32", level=level)
    assert engine.file == f"{component}.fp32.ort-{level}.onnx" and (tmp_path / engine.file).is_file()
    assert engine.providers == ["CPUExecutionProvider"] and engine.level == level
    assert engine.external_data == f"{engine.file}.data"  # weights stay in a data file, whatever the size
    feeds = _feeds(tiny_checkpoint, component)
    want, got = _run(src, feeds)[0], _run(tmp_path / engine.file, feeds)[0]
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_runs_through_make_runner(tiny_engines, tiny_checkpoint, tmp_path):
    import shutil

    import torch

    from qwen_image_trt.core.manifest import read_manifest, write_manifest
    from qwen_image_trt.runtime.backends import make_runner

    manifest = read_manifest(tiny_engines)
    entry = manifest.components["vae_decoder"]
    for name in (entry.graph.file, entry.graph.external_data):
        shutil.copy(tiny_engines / name, tmp_path / name)
    entry.onnxruntime = build_ort_engine(tmp_path / entry.graph.file, tmp_path, "vae_decoder", precision="fp32")
    manifest.components = {"vae_decoder": entry}
    write_manifest(tmp_path, manifest)
    runner = make_runner("onnxruntime", "vae_decoder", engines_dir=tmp_path)
    assert runner.model_path.name == entry.onnxruntime.file
    feeds = _feeds(tiny_checkpoint, "vae_decoder")
    out = runner.infer({k: torch.from_numpy(v) for k, v in feeds.items()})["images"]
    np.testing.assert_allclose(out.numpy(), _run(tiny_engines / "vae_decoder.onnx", feeds)[0], rtol=1e-4, atol=1e-5)


def test_rejects_bad_arguments(tiny_engines, tmp_path):
    src = tiny_engines / "vae_encoder.onnx"
    with pytest.raises(InputError, match="level"):
        build_ort_engine(src, tmp_path, "vae_encoder", precision="fp32", level="all")
    with pytest.raises(InputError, match="providers"):
        build_ort_engine(src, tmp_path, "vae_encoder", precision="fp32", providers=("NoSuchExecutionProvider",))
    with pytest.raises(InputError, match="onnx_path"):
        build_ort_engine(tmp_path / "missing.onnx", tmp_path, "vae_encoder", precision="fp32")
    assert not list(tmp_path.glob("*.ort-*"))


def test_external_data_model(tmp_path):
    """A graph stored with external data (as the real 40 GB transformer is) keeps it external after optimization."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Relu", ["y0"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    onnx.save_model(model, str(src_dir / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    engine = build_ort_engine(src_dir / "m.onnx", tmp_path / "out", "vae_decoder", precision="fp32")
    assert engine.external_data == "vae_decoder.fp32.ort-basic.onnx.data"
    x = {"x": np.ones((3, 64), np.float32)}
    np.testing.assert_allclose(_run(tmp_path / "out" / engine.file, x)[0], _run(src_dir / "m.onnx", x)[0],
                               rtol=1e-5, atol=1e-5)
