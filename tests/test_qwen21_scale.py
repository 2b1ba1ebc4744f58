"""Qwen-Image-2.1 at real width (opt-in: QITRT_SLOW=1, ~4 GB of RAM and 6 GB of disk, ~3 min): two of the 32 real
blocks in fp32 (2.3 GB of weights), the cached graph's data over protobuf's 2 GB, export's peak within the scale-true
limit, and both graphs run in ONNX Runtime at shapes other than the traced one, equal to the eager wrappers."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

GB = 1e9

pytestmark = pytest.mark.slow


def test_real_width_21_two_blocks_fp32_graphs_over_2gb_run_in_onnxruntime(tmp_path):
    from qwen_image_trt.compile import onnx_io
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.core.resources import rss_bytes
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.specs import SPECS
    from qwen_image_trt.models.tiny21 import make_real_width_21_checkpoint

    root = make_real_width_21_checkpoint(tmp_path / "rw21", 2, dtype="fp32")
    w = ckpt.weights_info(root, "transformer")
    assert w.precision == "fp32" and w.bytes > 2.2 * GB
    config = ckpt.read_config(root, "transformer")
    assert (config["num_attention_heads"], config["attention_head_dim"], config["context_in_dim"]) == (32, 128, 4096)
    gc.collect()
    before = rss_bytes()
    m = export_onnx(root, tmp_path / "onnx", precision="fp32",
                    components=("transformer_extract", "transformer_cached"), progress=False)
    cached = m.components["transformer_cached"]
    assert (tmp_path / "onnx" / cached.graph.external_data).stat().st_size > 2**31
    for name, c in m.components.items():
        assert c.peak_rss_bytes - before <= 1.5 * w.bytes + 2 * GB, (name, (c.peak_rss_bytes - before) / GB)
        assert c.check["max_abs_err_vs_eager"] <= 1e-4 * c.check["max_abs_eager"], name
    # independent of export's own check: another layout (text-to-image, batch 1), eager first, then ONNX Runtime
    for name in ("transformer_extract", "transformer_cached"):
        spec = SPECS[name]
        args = spec.sample_inputs(config, batch=1, text=(4, 11), cond=None, target=(6, 4), pad=0, seed=3)
        module = spec.build_module(root, torch.float32)
        with torch.no_grad():
            want = module(*args).float().numpy()
        del module
        gc.collect()
        sess = onnx_io.ort_session(tmp_path / "onnx" / m.components[name].graph.file)
        got = sess.run(None, {n: onnx_io.as_numpy(a) for n, a in zip(spec.input_names, args)})[0]
        del sess
        scale = float(np.abs(want).max())
        assert got.shape == want.shape and np.isfinite(got).all() and scale > 0
        assert float(np.abs(got - want).max()) <= 1e-4 * scale, name
