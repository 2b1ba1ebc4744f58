"""TensorRT engine build logic that needs no GPU: cache key, names, profiles, compatibility, builder calls.

A stand-in `trt` module object checks only which builder-config calls *our* code makes; it never stands
in for an engine. Real builds are in tests/test_tensorrt_gpu.py (skipped without TensorRT and a GPU).
"""

from __future__ import annotations

import logging
import sys
import types

import pytest

from qwen_image_trt.compile import tensorrt_engine as te
from qwen_image_trt.compile.profiles import profile_to_json, transformer_profile, vae_decoder_profile
from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError

PROF = vae_decoder_profile("64x64,96x64", 2)
KEY_ARGS = dict(onnx_sha="ab" * 32, precision="fp8", recipe={"algo": "max", "skip": ["img_mlp"]}, profiles=PROF,
                trt_version="10.13.0.35", compute_capability="9.0")


def test_cache_key_is_pure_and_sensitive():
    key = te.engine_cache_key(**KEY_ARGS)
    assert key == te.engine_cache_key(**KEY_ARGS) and len(key) == 64
    # the same profile written as JSON, and the capability written otherwise, are the same engine
    assert key == te.engine_cache_key(**{**KEY_ARGS, "profiles": profile_to_json(PROF), "compute_capability": (9, 0)})
    changed = [dict(onnx_sha="cd" * 32), dict(precision="int8"), dict(recipe=None), dict(trt_version="10.13.0.36"),
               dict(compute_capability="8.9"), dict(profiles=vae_decoder_profile("64x64", 2))]
    keys = {te.engine_cache_key(**{**KEY_ARGS, **c}) for c in changed}
    assert key not in keys and len(keys) == len(changed)
    assert te.engine_cache_key(**KEY_ARGS, refittable=True) != key


def test_engine_file_name_carries_version_and_cc():
    name = te.engine_file_name("transformer", "fp8", "10.13.0.35", (9, 0), "0123456789abcdef")
    assert name == "transformer.fp8.trt10.13.0.35.sm90.0123456789ab.plan"
    assert te.engine_file_name("vae_decoder", "bf16", "11.0.0", "sm_120", "f" * 64).endswith(".sm120.ffffffffffff.plan")


@pytest.mark.parametrize("cc,want", [((8, 9), "8.9"), ("9.0", "9.0"), ("sm90", "9.0"), ("sm_100", "10.0"), ("12.0", "12.0")])
def test_normalize_cc(cc, want):
    assert te.normalize_cc(cc) == want


def _entry(**kw):
    return {"engine_file": "transformer.plan", "tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", **kw}


def test_check_engine_compatible(caplog):
    te.check_engine_compatible(_entry(), "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(EngineMismatchError, match="TensorRT 10.13.0.35.*10.14.*qitrt build"):
        te.check_engine_compatible(_entry(), "10.14.1", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineMismatchError, match="compute capability 9.0.*8.9.*qitrt build"):
        te.check_engine_compatible(_entry(), "10.13.0.35", "NVIDIA L40S", "8.9")
    with pytest.raises(EngineMismatchError, match="qitrt build"):
        te.check_engine_compatible({"engine_file": "x.plan"}, "10.13.0.35", "H100", "9.0")
    with caplog.at_level(logging.WARNING):
        te.check_engine_compatible(_entry(), "10.13.0.35", "NVIDIA H100 PCIe", "9.0")  # same cc: runs, warns
    assert "H100 PCIe" in caplog.text
    with pytest.raises(EngineMismatchError):
        te.check_engine_compatible(_entry(), "10.13.0.35", "NVIDIA H100 PCIe", "9.0", strict_gpu=True)


def test_resolve_profile_fills_static_dims_from_network():
    tiny = {"in_channels": 64, "joint_attention_dim": 64, "attention_head_dim": 32}
    prof = transformer_profile("64x64", 1, text_len_range=(1, 64))  # made with the real model's widths
    net = {"hidden_states": (-1, -1, 64), "encoder_hidden_states": (-1, -1, 64), "encoder_hidden_states_mask": (-1, -1),
           "timestep": (-1,), "img_rope_cos": (-1, 16), "img_rope_sin": (-1, 16), "txt_rope_cos": (-1, 16),
           "txt_rope_sin": (-1, 16)}
    resolved = te.resolve_profile(net, prof)
    assert resolved == transformer_profile("64x64", 1, text_len_range=(1, 64), config=tiny)
    with pytest.raises(InputError, match="dynamic input"):
        te.resolve_profile({**net, "extra": (-1, 3)}, prof)
    with pytest.raises(InputError):
        te.resolve_profile({"latents": (-1, 16, 1, -1)}, PROF)  # rank mismatch
    with pytest.raises(InputError):
        te.resolve_profile({"other": (1,)}, PROF)  # profile for an unknown input
    assert te.resolve_profile({"static": (1, 3)}, {}) == {}


class _Recorder:
    """Records calls made on it: a stand-in for TensorRT objects, to check our own call sequence."""

    def __init__(self, log, name):
        self._log, self._name = log, name

    def __getattr__(self, attr):
        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attr}", args, kwargs))
            return _Recorder(self._log, attr)
        return call

    def __setattr__(self, attr, value):
        if attr.startswith("_"):
            object.__setattr__(self, attr, value)
        else:
            self._log.append((f"{self._name}.{attr}=", (value,), {}))


class _Net:
    num_inputs = 1

    def get_input(self, i):
        return types.SimpleNamespace(name="latents", shape=(-1, 16, 1, -1, -1))


def _fake_trt():
    return types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(REFIT="REFIT", WEIGHT_STREAMING="WEIGHT_STREAMING"),
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


def test_configure_builder_calls():
    calls = []
    builder = _Recorder(calls, "builder")
    _, resolved = te.configure_builder(_fake_trt(), builder, _Net(), PROF, opt_level=4, refittable=True,
                                       weight_streaming=True, timing_cache_bytes=b"cache", workspace_bytes=1 << 30)
    names = [c[0] for c in calls]
    assert names[:2] == ["builder.create_builder_config", "create_builder_config.builder_optimization_level="]
    assert calls[1][1] == (4,)
    shape = [c for c in calls if c[0] == "create_optimization_profile.set_shape"]
    assert shape == [("create_optimization_profile.set_shape", ("latents", *PROF["latents"]), {})]
    assert ("create_builder_config.create_timing_cache", (b"cache",), {}) in calls
    assert ("create_builder_config.set_flag", ("REFIT",), {}) in calls
    assert ("create_builder_config.set_flag", ("WEIGHT_STREAMING",), {}) in calls
    assert any(c[0] == "create_builder_config.set_memory_pool_limit" for c in calls)
    assert "create_builder_config.add_optimization_profile" in names
    assert resolved == PROF

    calls.clear()
    te.configure_builder(_fake_trt(), _Recorder(calls, "builder"), _Net(), PROF)
    assert not any(c[0].endswith("set_flag") for c in calls)  # strongly typed: no precision flags, nothing unasked
    assert ("create_builder_config.create_timing_cache", (b"",), {}) in calls
    with pytest.raises(InputError):
        te.configure_builder(_fake_trt(), _Recorder([], "builder"), _Net(), PROF, opt_level=7)


def test_require_tensorrt_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on this machine
    with pytest.raises(QitrtError, match="TensorRT is not available.*--target onnxruntime"):
        te.require_tensorrt()


def test_require_tensorrt_version_and_gpu(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(QitrtError, match="too old"):
        te.require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.0.35"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QitrtError, match="no CUDA GPU"):
        te.require_tensorrt()


def test_build_checks_arguments_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(InputError):
        te.build_tensorrt_engine(tmp_path / "x.onnx", tmp_path, "vae_decoder", PROF, precision="int4")
    with pytest.raises(InputError):
        te.build_tensorrt_engine(tmp_path / "missing.onnx", tmp_path, "vae_decoder", PROF, precision="fp16")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(QitrtError, match="TensorRT is not available"):
        te.build_tensorrt_engine(tmp_path / "x.onnx", tmp_path / "out", "vae_decoder", PROF, precision="fp16")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_engine_entry_and_source_check(tiny_engines):
    from qwen_image_trt.core.manifest import file_sha256, read_manifest

    manifest = read_manifest(tiny_engines)
    onnx_path = tiny_engines / "vae_decoder.onnx"
    sha = file_sha256(onnx_path)
    src = te.source_entry_for(manifest, "vae_decoder", onnx_path, sha)
    with pytest.raises(EngineMismatchError, match="changed since"):
        te.source_entry_for(manifest, "vae_decoder", onnx_path, "0" * 64)
    key = te.engine_cache_key(sha, "fp16", None, PROF, "10.13.0.35", "9.0")
    entry = te.engine_entry(component="vae_decoder", engine_file=te.engine_file_name("vae_decoder", "fp16", "10.13.0.35",
                            "9.0", key), onnx_file="vae_decoder.onnx", onnx_sha=sha, precision="fp16", recipe=None,
                            profiles=PROF, trt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3",
                            compute_capability=(9, 0), cache_key=key, limits=None, opt_level=3, refittable=False,
                            weight_streaming=False, source_entry=src)
    assert entry["engine_file"].startswith("vae_decoder.fp16.trt10.13.0.35.sm90.")
    assert entry["limits"] == {"height": [64, 64], "width": [64, 96], "batch": [1, 2]}
    assert entry["profiles"]["latents"]["max"] == [2, 16, 1, 8, 12]
    assert entry["inputs"] == src["inputs"] and entry["source_sha256"] == sha
    te.check_engine_compatible(entry, "10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
    assert te.limits_from_profiles("transformer", transformer_profile("64x64,128x64", 2)) == \
        {"batch": [1, 2], "image_tokens": [16, 32]}
