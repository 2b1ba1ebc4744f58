"""Real TensorRT builds and runs of the tiny model, compared with ONNX Runtime.

These need TensorRT >= 10 and an NVIDIA GPU; they skip (with the reason) everywhere else, including this
project's CI machines, where TensorRT cannot be installed. Run them on a GPU machine with:
    pip install tensorrt-cu12  # from NVIDIA's index
    pytest -m tensorrt tests/test_tensorrt_gpu.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.tensorrt


def _tensorrt_or_skip():
    try:
        import tensorrt as trt
    except Exception as e:  # not installed, or its CUDA libraries fail to load
        pytest.skip(f"needs TensorRT (import tensorrt failed: {type(e).__name__}: {e})")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU: torch.cuda.is_available() is False")
    if int(trt.__version__.split(".")[0]) < 10:
        pytest.skip(f"needs TensorRT >= 10 (strongly typed networks), found {trt.__version__}")
    return trt


@pytest.fixture(scope="module")
def trt_module():
    return _tensorrt_or_skip()


def _config(tiny_checkpoint, part):
    from qwen_image_trt.models import checkpoint as ckpt

    return ckpt.read_config(tiny_checkpoint, part)


def _compare(engines_dir, component, feeds, ort_dir, *, cuda_graphs=False, calls=1):
    from qwen_image_trt.runtime.backends import make_runner
    from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner

    ref = make_runner("onnxruntime", component, engines_dir=ort_dir).infer(feeds)
    manifest = json.loads((engines_dir / "manifest.json").read_text())
    entry = manifest["components"][component]
    with TensorRTRunner(component, engines_dir / entry["engine_file"], device="cuda", manifest=manifest,
                        cuda_graphs=cuda_graphs) as runner:
        cuda_feeds = {k: v.cuda() for k, v in feeds.items()}
        for _ in range(calls):
            got = runner.infer(cuda_feeds)
        torch.cuda.synchronize()
    for name, want in ref.items():
        g = got[name].float().cpu().numpy()
        w = want.float().numpy()
        cos = float((g * w).sum() / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-12))
        assert g.shape == w.shape and np.isfinite(g).all()
        assert cos > 0.9999, f"{component}.{name}: cosine {cos}"
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2)


def _build(trt_module, tiny_engines, out, component, profiles, **kw):
    from qwen_image_trt.core.manifest import read_manifest, write_manifest
    from qwen_image_trt.compile.tensorrt_engine import build_tensorrt_engine

    manifest = read_manifest(tiny_engines)
    entry = build_tensorrt_engine(tiny_engines / f"{component}.onnx", out, component, profiles, precision="fp32",
                                  source_manifest=manifest, timing_cache=out / "timing.cache", progress=False, **kw)
    existing = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else \
        {**manifest, "components": {}}
    existing["components"][component] = entry
    write_manifest(out, existing)
    return entry


def test_tiny_transformer_engine_matches_onnxruntime(trt_module, tiny_engines, tiny_checkpoint, tmp_path):
    from qwen_image_trt.compile.profiles import transformer_profile
    from qwen_image_trt.models.transformer_export import sample_inputs
    from qwen_image_trt.models.specs import TRANSFORMER

    config = _config(tiny_checkpoint, "transformer")
    profiles = transformer_profile("64x64,128x96", 2, text_len_range=(1, 64), text_bucket=32, config=config)
    entry = _build(trt_module, tiny_engines, tmp_path, "transformer", profiles)
    assert (tmp_path / entry["engine_file"]).is_file() and (tmp_path / "timing.cache").is_file()
    assert entry["tensorrt"] == trt_module.__version__ and f".trt{trt_module.__version__}." in entry["engine_file"]
    for batch, grid, text in [(2, (4, 4), 32), (4, (6, 8), 64), (1, (4, 6), 32)]:
        args = sample_inputs(config, batch=batch, grid=grid, text_len=text, seed=batch)
        feeds = dict(zip(TRANSFORMER.input_names, args))
        _compare(tmp_path, "transformer", feeds, tiny_engines)
    # the same build again is a cache hit (same key, same file)
    again = _build(trt_module, tiny_engines, tmp_path, "transformer", profiles)
    assert again["engine_file"] == entry["engine_file"] and "build_seconds" not in again


def test_tiny_vae_decoder_engine_with_cuda_graphs(trt_module, tiny_engines, tiny_checkpoint, tmp_path):
    from qwen_image_trt.compile.profiles import vae_decoder_profile

    from qwen_image_trt.runtime.backends import make_runner
    from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner

    _build(trt_module, tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64,96x64", 2))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["components"]["vae_decoder"]
    ref = make_runner("onnxruntime", "vae_decoder", engines_dir=tiny_engines)
    g = torch.Generator().manual_seed(0)
    with TensorRTRunner("vae_decoder", tmp_path / entry["engine_file"], device="cuda", manifest=manifest,
                        cuda_graphs=True) as runner:
        for _ in range(4):  # eager, capture, replay, replay: new inputs every call, so a stale replay would show
            latents = torch.randn(2, 16, 1, 8, 12, generator=g)
            got = runner.infer({"latents": latents.cuda()})["images"].float().cpu()
            want = ref.infer({"latents": latents})["images"]
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-2, atol=1e-2)
        assert runner._graphs, "no CUDA graph was captured"


def test_engine_refused_on_version_mismatch(trt_module, tiny_engines, tmp_path):
    from qwen_image_trt.compile.profiles import vae_decoder_profile
    from qwen_image_trt.core.errors import EngineMismatchError, InputError
    from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner

    entry = _build(trt_module, tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64", 1))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    runner = TensorRTRunner("vae_decoder", tmp_path / entry["engine_file"], device="cuda", manifest=manifest)
    with pytest.raises(InputError, match="profile"):
        runner.infer({"latents": torch.zeros(2, 16, 1, 8, 8, device="cuda")})  # batch 2 > profile max 1
    manifest["components"]["vae_decoder"]["tensorrt"] = "9.9.9"
    with pytest.raises(EngineMismatchError, match="qitrt build"):
        TensorRTRunner("vae_decoder", tmp_path / entry["engine_file"], device="cuda", manifest=manifest).activate()


def test_skip_reason_is_clear_here():
    """On machines without TensorRT this module's tests skip with the reason; this one documents it."""
    try:
        import tensorrt  # noqa: F401
    except Exception:
        with pytest.raises(pytest.skip.Exception, match="needs TensorRT"):
            _tensorrt_or_skip()
        return
    if not torch.cuda.is_available():
        with pytest.raises(pytest.skip.Exception, match="GPU"):
            _tensorrt_or_skip()
