"""Real TensorRT builds and runs of the tiny model, compared with ONNX Runtime.

These need TensorRT >= 10 and an NVIDIA GPU; they skip (with the reason) everywhere else, including this
project's CI machines, where TensorRT cannot be installed. Run them on a GPU machine with:
    pip install tensorrt-cu12  # from NVIDIA's index
    pytest -m tensorrt tests/test_tensorrt_gpu.py
What only they show: the builder accepts our flags and profiles, the plan deserializes from a memory map,
USER_MANAGED contexts run in the shared arena, streams are ordered, CUDA graphs replay correctly and are
recaptured after the arena moves, and weight streaming runs.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")  # session, like tiny_engines: listed first, it skips before the export runs
def trt_module():
    return _tensorrt_or_skip()


def _config(tiny_checkpoint, part):
    from qwen_image_trt.models import checkpoint as ckpt

    return ckpt.read_config(tiny_checkpoint, part)


def _build(tiny_engines, out, component, profiles, **kw):
    from qwen_image_trt.compile.tensorrt_engine import build_tensorrt_engine
    from qwen_image_trt.core.manifest import read_manifest

    source = read_manifest(tiny_engines).components[component]
    return build_tensorrt_engine(tiny_engines, source, out, component, profiles,
                                 **{"precision": "fp32", "timing_cache": out / "timing.cache", "progress": False, **kw})


def _runner(out, component, engine, **kw):
    from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(component, out / engine.file, device="cuda", entry=engine, **kw)


def _reference(tiny_engines, component):
    from qwen_image_trt.runtime.backends import make_runner

    return make_runner("onnxruntime", component, engines_dir=tiny_engines)


def _close(got, want, what):
    g, w = got.float().cpu().numpy(), want.float().numpy()
    cos = float((g * w).sum() / (np.linalg.norm(g) * np.linalg.norm(w) + 1e-12))
    assert g.shape == w.shape and np.isfinite(g).all()
    assert cos > 0.9999, f"{what}: cosine {cos}"
    np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-2)


def _transformer_feeds(config, batch, grid, text, seed):
    from qwen_image_trt.models.specs import TRANSFORMER
    from qwen_image_trt.models.transformer_export import sample_inputs

    return dict(zip(TRANSFORMER.input_names, sample_inputs(config, batch=batch, grid=grid, text_len=text, seed=seed)))


def test_tiny_transformer_engine_matches_onnxruntime(trt_module, tiny_engines, tiny_checkpoint, tmp_path):
    from qwen_image_trt.compile.profiles import transformer_profile
    from qwen_image_trt.runtime.backends.tensorrt_runner import shared_arena

    config = _config(tiny_checkpoint, "transformer")
    profiles = transformer_profile("64x64,128x96", 2, text_len_range=(1, 64), text_bucket=32, config=config)
    engine = _build(tiny_engines, tmp_path, "transformer", profiles)
    assert (tmp_path / engine.file).is_file() and (tmp_path / "timing.cache").stat().st_size > 0
    assert engine.tensorrt == trt_module.__version__ and f".trt{trt_module.__version__}." in engine.file
    assert engine.builder["tf32"] is False and engine.seconds is not None  # fp32 reference: TF32 cleared
    ref = _reference(tiny_engines, "transformer")
    with _runner(tmp_path, "transformer", engine) as runner:
        assert runner.stream.cuda_stream != torch.cuda.default_stream().cuda_stream  # its own stream
        assert runner._arena is shared_arena(torch.cuda.current_device()) and runner._arena.size > 0
        for batch, grid, text in [(2, (4, 4), 32), (4, (6, 8), 64), (1, (4, 6), 32)]:
            feeds = _transformer_feeds(config, batch, grid, text, seed=batch)
            got = runner.infer({k: v.cuda() for k, v in feeds.items()})["noise_pred"]
            _close(got, ref.infer(feeds)["noise_pred"], f"transformer b{batch} {grid} t{text}")
    again = _build(tiny_engines, tmp_path, "transformer", profiles)  # same key: reused, not rebuilt
    assert again.file == engine.file and again.seconds is None


def test_tiny_vae_decoder_cuda_graphs_and_arena_moves(trt_module, tiny_engines, tmp_path):
    from qwen_image_trt.compile.profiles import vae_decoder_profile

    engine = _build(tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64,96x64", 2))
    ref = _reference(tiny_engines, "vae_decoder")
    g = torch.Generator().manual_seed(0)
    with _runner(tmp_path, "vae_decoder", engine, cuda_graphs=True) as runner:
        def check(n):
            for _ in range(n):  # new inputs every call, so a stale replay would show
                latents = torch.randn(2, 16, 1, 8, 12, generator=g)
                _close(runner.infer({"latents": latents.cuda()})["images"], ref.infer({"latents": latents})["images"],
                       "vae_decoder")
        check(4)  # eager, capture, replay, replay
        assert runner._graphs, "no CUDA graph was captured"
        generation = runner._arena.generation
        runner._arena.reserve(runner._arena.size + 1)  # another engine needed more: the arena moved
        check(4)
        assert runner.graphs.generation == runner._arena.generation != generation and runner._graphs


def test_two_engines_share_one_arena(trt_module, tiny_engines, tiny_checkpoint, tmp_path):
    from qwen_image_trt.compile.profiles import transformer_profile, vae_decoder_profile

    config = _config(tiny_checkpoint, "transformer")
    t_engine = _build(tiny_engines, tmp_path, "transformer",
                      transformer_profile("64x64", 1, text_len_range=(1, 32), config=config))
    v_engine = _build(tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64", 1))
    t_ref, v_ref = _reference(tiny_engines, "transformer"), _reference(tiny_engines, "vae_decoder")
    with _runner(tmp_path, "transformer", t_engine) as t, _runner(tmp_path, "vae_decoder", v_engine) as v:
        assert t._arena is v._arena and t._arena.users >= 2
        for seed in range(3):  # interleaved: each waits for the other's use of the arena
            feeds = _transformer_feeds(config, 2, (4, 4), 32, seed)
            latents = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
            noise = t.infer({k: x.cuda() for k, x in feeds.items()})["noise_pred"]
            images = v.infer({"latents": latents.cuda()})["images"]
            _close(noise, t_ref.infer(feeds)["noise_pred"], "transformer")
            _close(images, v_ref.infer({"latents": latents})["images"], "vae_decoder")


def test_weight_streaming_budget(trt_module, tiny_engines, tmp_path):
    from qwen_image_trt.compile.profiles import vae_decoder_profile
    from qwen_image_trt.core.errors import InputError

    plain = _build(tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64", 1))
    with pytest.raises(InputError, match="built without weight streaming"):
        _runner(tmp_path, "vae_decoder", plain, weight_streaming_budget=0.5)
    streamed = _build(tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64", 1), weight_streaming=True)
    assert streamed.file != plain.file and streamed.builder["weight_streaming"] is True
    latents = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with _runner(tmp_path, "vae_decoder", streamed, weight_streaming_budget=0.5) as runner:
        assert runner.engine.weight_streaming_budget_v2 <= runner.engine.streamable_weights_size
        _close(runner.infer({"latents": latents.cuda()})["images"],
               _reference(tiny_engines, "vae_decoder").infer({"latents": latents})["images"], "streamed vae_decoder")


def test_engine_refused_on_version_mismatch(trt_module, tiny_engines, tmp_path):
    from qwen_image_trt.compile.profiles import vae_decoder_profile
    from qwen_image_trt.core.errors import EngineMismatchError, InputError

    engine = _build(tiny_engines, tmp_path, "vae_decoder", vae_decoder_profile("64x64", 1))
    runner = _runner(tmp_path, "vae_decoder", engine)
    with pytest.raises(InputError, match="profile"):
        runner.infer({"latents": torch.zeros(2, 16, 1, 8, 8, device="cuda")})  # batch 2 > profile max 1
    runner.deactivate()
    with pytest.raises(EngineMismatchError, match="qitrt build"):
        _runner(tmp_path, "vae_decoder", engine.model_copy(update={"tensorrt": "9.9.9"})).activate()


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
