"""TensorRT engine build logic that needs no GPU: identity (cache key), names, profiles, compatibility, and the
TensorRT calls our builder makes, checked against a recording stand-in for the `tensorrt` module.

The stand-in records calls and answers the questions our code asks (network inputs, flags); it never claims
an engine was built: `build_serialized_network` returns None, so every build here ends in the builder's
"could not build" error, after which we check what was called, in which order, and that nothing was written
but the merged timing cache. Real builds are in tests/test_tensorrt_gpu.py (skipped without TensorRT + GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_image_trt.compile import tensorrt_engine as te
from qwen_image_trt.compile.profiles import profile_to_json, transformer_profile, vae_decoder_profile
from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.files import file_sha256
from qwen_image_trt.core.manifest import Component, GraphFile, TensorRTEngine
from qwen_image_trt.core.tensorrt import builder_settings

PROF = vae_decoder_profile("64x64,96x64", 2)
TRT_VERSION = "10.13.0.35"
SETTINGS = builder_settings("fp8")
KEY_ARGS = dict(graph_sha="ab" * 32, weights_sha="cd" * 32, precision="fp8",
                recipe={"algo": "max", "skip": ["img_mlp"]}, profiles=PROF, trt_version=TRT_VERSION,
                compute_capability="9.0", builder=SETTINGS)


# -- identity -------------------------------------------------------------------------------------------
def test_cache_key_covers_everything_an_engine_depends_on():
    key = te.engine_cache_key(**KEY_ARGS)
    assert key == te.engine_cache_key(**KEY_ARGS) and len(key) == 64
    # the same profile written as JSON, and the capability written otherwise, are the same engine
    assert key == te.engine_cache_key(**{**KEY_ARGS, "profiles": profile_to_json(PROF), "compute_capability": (9, 0)})
    changed = [dict(graph_sha="ef" * 32), dict(weights_sha="00" * 32), dict(weights_sha=None), dict(precision="int8"),
               dict(recipe=None), dict(trt_version="10.13.0.36"), dict(compute_capability="8.9"),
               dict(profiles=vae_decoder_profile("64x64", 2))]
    changed += [dict(builder={**SETTINGS, k: v}) for k, v in
                [("optimization_level", 4), ("tf32", False), ("weight_streaming", True), ("workspace_bytes", 1 << 30)]]
    keys = {te.engine_cache_key(**{**KEY_ARGS, **c}) for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_builder_settings_tf32_default_and_checks():
    assert builder_settings("fp32")["tf32"] is False  # fp32 reference builds are meant to be exact
    assert builder_settings("bf16")["tf32"] is True
    assert builder_settings("fp32", tf32=True)["tf32"] is True and builder_settings("bf16", tf32=False)["tf32"] is False
    assert builder_settings("fp8") == {"strongly_typed": True, "optimization_level": 3, "tf32": True,
                                       "weight_streaming": False, "workspace_bytes": None}
    for bad in (dict(opt_level=7), dict(opt_level=True), dict(tf32="yes"), dict(workspace_bytes=0)):
        with pytest.raises(InputError):
            builder_settings("fp16", **bad)
    with pytest.raises(TypeError):
        builder_settings("fp16", refittable=True)  # removed until LoRA refit lands


def test_engine_file_name_carries_version_and_cc():
    name = te.engine_file_name("transformer", "fp8", TRT_VERSION, (9, 0), "0123456789abcdef")
    assert name == "transformer.fp8.trt10.13.0.35.sm90.0123456789ab.plan"
    assert te.engine_file_name("vae_decoder", "bf16", "11.0.0", "sm_120", "f" * 64).endswith(".sm120.ffffffffffff.plan")


@pytest.mark.parametrize("cc,want", [((8, 9), "8.9"), ("9.0", "9.0"), ("sm90", "9.0"), ("sm_100", "10.0"), ("12.0", "12.0")])
def test_normalize_cc(cc, want):
    assert te.normalize_cc(cc) == want


def _engine(**kw):
    return TensorRTEngine(**{"file": "transformer.plan", "bytes": 1, "tensorrt": TRT_VERSION,
                             "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "profiles": {},
                             "cache_key": "k", "builder": SETTINGS, **kw})


def test_check_engine_compatible(caplog):
    te.check_engine_compatible(_engine(), TRT_VERSION, "NVIDIA H100 80GB HBM3", (9, 0))
    with pytest.raises(EngineMismatchError, match="TensorRT 10.13.0.35.*10.14.*qitrt build"):
        te.check_engine_compatible(_engine(), "10.14.1", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(EngineMismatchError, match="compute capability 9.0.*8.9.*qitrt build"):
        te.check_engine_compatible(_engine(), TRT_VERSION, "NVIDIA L40S", "8.9")
    with pytest.raises(EngineMismatchError, match="qitrt build"):
        te.check_engine_compatible({"file": "x.plan"}, TRT_VERSION, "H100", "9.0")
    with caplog.at_level(logging.WARNING):
        te.check_engine_compatible(_engine(), TRT_VERSION, "NVIDIA H100 PCIe", "9.0")  # same cc: runs, warns
    assert "H100 PCIe" in caplog.text
    with pytest.raises(EngineMismatchError):
        te.check_engine_compatible(_engine(), TRT_VERSION, "NVIDIA H100 PCIe", "9.0", strict_gpu=True)


def test_resolve_profile_fills_static_dims_from_network():
    tiny = {"in_channels": 64, "joint_attention_dim": 64, "attention_head_dim": 32}
    prof = transformer_profile("64x64", 1, text_len_range=(1, 64))  # made with the real model's widths
    net = {"hidden_states": (-1, -1, 64), "encoder_hidden_states": (-1, -1, 64), "encoder_hidden_states_mask": (-1, -1),
           "timestep": (-1,), "img_rope_cos": (-1, 16), "img_rope_sin": (-1, 16), "txt_rope_cos": (-1, 16),
           "txt_rope_sin": (-1, 16)}
    assert te.resolve_profile(net, prof) == transformer_profile("64x64", 1, text_len_range=(1, 64), config=tiny)
    with pytest.raises(InputError, match="dynamic input"):
        te.resolve_profile({**net, "extra": (-1, 3)}, prof)
    with pytest.raises(InputError):
        te.resolve_profile({"latents": (-1, 16, 1, -1)}, PROF)  # rank mismatch
    with pytest.raises(InputError):
        te.resolve_profile({"other": (1,)}, PROF)  # profile for an unknown input
    assert te.resolve_profile({"static": (1, 3)}, {}) == {}


def test_limits_from_profiles():
    assert te.limits_from_profiles("vae_decoder", PROF) == {"height": [64, 64], "width": [64, 96], "batch": [1, 2]}
    assert te.limits_from_profiles("transformer", transformer_profile("64x64,128x64", 2)) == \
        {"batch": [1, 2], "image_tokens": [16, 32]}


# -- a small source graph with external data, as export writes them -------------------------------------
def _source(folder: Path, weight: float = 1.0) -> Component:
    """latents [b, 16, 1, h, w] * w -> images: one graph whose weight lives in external data."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(np.full((1, 16, 1, 1, 1), weight, np.float32), "w")
    dims = ["batch", 16, 1, "h", "w"]
    graph = helper.make_graph([helper.make_node("Mul", ["latents", "w"], ["images"])], "g",
                              [helper.make_tensor_value_info("latents", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)], [w])
    path = folder / "vae_decoder.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path),
                    save_as_external_data=True, location="vae_decoder.onnx.data", size_threshold=0)
    data = folder / "vae_decoder.onnx.data"
    gf = GraphFile(file=path.name, sha256=file_sha256(path), external_data=data.name,
                   external_data_sha256=file_sha256(data), bytes=path.stat().st_size + data.stat().st_size)
    info = {"name": "latents", "dtype": "float32", "shape": dims}
    return Component(graph=gf, precision="fp32", source={}, inputs=[info], outputs=[{**info, "name": "images"}],
                     dynamic_axes={})


def test_graph_identity_comes_from_the_manifest(tmp_path):
    src = _source(tmp_path / "g")
    path, graph_sha, weights_sha = te.graph_identity(tmp_path / "g", src)
    assert path.name == "vae_decoder.onnx" and weights_sha == src.graph.external_data_sha256
    # the weights' hash is the manifest's: not re-read (40 GB), so a manifest without it is refused
    unhashed = src.model_copy(update={"graph": src.graph.model_copy(update={"external_data_sha256": None})})
    with pytest.raises(EngineMismatchError, match="no sha256 for its external data"):
        te.graph_identity(tmp_path / "g", unhashed)
    (tmp_path / "g" / "vae_decoder.onnx").write_bytes(path.read_bytes() + b" ")  # edited since the manifest
    with pytest.raises(EngineMismatchError, match="changed since"):
        te.graph_identity(tmp_path / "g", src)
    with pytest.raises(InputError):
        te.graph_identity(tmp_path / "missing", src)


def test_changed_weight_changes_key(tmp_path):
    a, b = _source(tmp_path / "a", 1.0), _source(tmp_path / "b", 2.0)
    assert a.graph.sha256 == b.graph.sha256  # same structure: only the external data differs
    keys = {te.engine_cache_key(*te.graph_identity(tmp_path / n, c)[1:], "fp32", None, PROF, TRT_VERSION, "9.0",
                                builder_settings("fp32")) for n, c in (("a", a), ("b", b))}
    assert len(keys) == 2


# -- the recording stand-in for `tensorrt` -------------------------------------------------------------
class _Flag(int):
    """An enum member: int() of it is its value, like tensorrt's pybind enums."""

    def __new__(cls, name, value):
        obj = int.__new__(cls, value)
        obj.name = name
        return obj

    def __repr__(self):
        return self.name


class _Rec:
    """Records every method call and attribute set on it; `answers` gives return values by method name."""

    def __init__(self, log, name, **answers):
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_answers", answers)

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        answer = self._answers.get(attr)

        def call(*args, **kwargs):
            self._log.append((f"{self._name}.{attr}", args, kwargs))
            return answer(*args, **kwargs) if callable(answer) else answer
        return call

    def __setattr__(self, attr, value):
        self._log.append((f"{self._name}.{attr}=", (value,), {}))


class _Cache:
    """A timing cache as a set of entries: combine is a union, serialize is JSON."""

    def __init__(self, log, entries=(), *, ok=True):
        self.log, self.entries, self.ok = log, set(entries), ok

    def combine(self, other, ignore_mismatch):
        self.log.append(("cache.combine", (sorted(other.entries), ignore_mismatch), {}))
        if self.ok:
            self.entries |= other.entries
        return self.ok

    def serialize(self):
        self.log.append(("cache.serialize", (), {}))
        return json.dumps(sorted(self.entries)).encode()


def _fake_trt(log, *, strongly_typed=True, inputs=(("latents", (-1, 16, 1, -1, -1)),), version=TRT_VERSION,
              new_entries=("tactic-new",), combine_ok=True, cache_loads=True):
    """A `tensorrt` module stand-in. `new_entries`: what this build's timing cache learns."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=_Flag("STRONGLY_TYPED", 1))
    trt.BuilderFlag = types.SimpleNamespace(TF32=_Flag("TF32", 7), WEIGHT_STREAMING=_Flag("WEIGHT_STREAMING", 21))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=_Flag("WORKSPACE", 0))
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: log.append(("Logger", (level,), {}))})

    class IProgressMonitor:
        def __init__(self):
            log.append(("IProgressMonitor", (), {}))
    trt.IProgressMonitor = IProgressMonitor
    state = {}

    def create_timing_cache(data):
        if data and not cache_loads:
            return None
        return _Cache(log, json.loads(bytes(data)) if data else (), ok=combine_ok)

    def set_timing_cache(cache, ignore_mismatch):
        state["cache"] = cache
        return True

    def get_timing_cache():
        state["cache"].entries |= set(new_entries)  # what the build timed
        return state["cache"]

    config = _Rec(log, "config", create_timing_cache=create_timing_cache, set_timing_cache=set_timing_cache,
                  get_timing_cache=get_timing_cache)
    net_inputs = [types.SimpleNamespace(name=n, shape=s) for n, s in inputs]
    network = _Rec(log, "network", get_flag=lambda flag: strongly_typed, get_input=lambda i: net_inputs[i])
    object.__setattr__(network, "num_inputs", len(net_inputs))
    builder = _Rec(log, "builder", create_network=lambda flags: network, create_builder_config=lambda: config,
                   create_optimization_profile=lambda: _Rec(log, "profile"),
                   build_serialized_network=lambda net, cfg: None)  # never claims an engine was built
    trt.Builder = lambda logger: (log.append(("Builder", (), {})), builder)[1]
    trt.OnnxParser = lambda net, logger: (log.append(("OnnxParser", (), {})),
                                          _Rec(log, "parser", parse_from_file=lambda p: True))[1]
    return trt


@pytest.fixture()
def fake_gpu(monkeypatch):
    """TensorRT importable (the stand-in), torch sees one GPU, and entering the CUDA device is recorded."""
    import torch

    log = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(te, "gpu_info", lambda device: ("NVIDIA H100 80GB HBM3", "9.0"))

    @contextlib.contextmanager
    def cuda_device(index):
        log.append(("cuda.device", (index,), {}))
        try:
            yield
        finally:
            log.append(("cuda.device.exit", (index,), {}))

    real_lock, real_write = te.file_lock, te.write_atomic

    @contextlib.contextmanager
    def lock(path):
        with real_lock(path):
            log.append(("lock", (Path(path).name,), {}))
            try:
                yield
            finally:
                log.append(("unlock", (Path(path).name,), {}))

    monkeypatch.setattr(te, "_cuda_device", cuda_device)
    monkeypatch.setattr(te, "file_lock", lock)
    monkeypatch.setattr(te, "write_atomic", lambda p, d: (log.append(("write", (Path(p).name, bytes(d)), {})),
                                                          real_write(p, d))[1])

    def install(**kw):
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt(log, **kw))
        return log
    return install


def _names(log):
    return [c[0] for c in log]


def _build(tmp_path, **kw):
    src = _source(tmp_path / "onnx")
    opts = dict(precision="fp32", timing_cache=tmp_path / "timing.cache", device=1, progress=False)
    return te.build_tensorrt_engine(tmp_path / "onnx", src, tmp_path / "out", "vae_decoder", PROF, **{**opts, **kw})


def test_build_call_order_against_the_stand_in(tmp_path, fake_gpu):
    log = fake_gpu()
    (tmp_path / "timing.cache").write_bytes(json.dumps(["tactic-old"]).encode())
    with pytest.raises(QitrtError, match="could not build"):
        _build(tmp_path, opt_level=4, progress=True)
    names = _names(log)
    # everything TensorRT does happens on the GPU named by `device`
    assert names[0] == "cuda.device" and log[0][1] == (1,) and names[-1] == "cuda.device.exit"
    order = ["Builder", "builder.create_network", "network.get_flag", "OnnxParser", "parser.parse_from_file",
             "builder.create_builder_config", "config.builder_optimization_level=", "config.clear_flag",
             "builder.create_optimization_profile", "profile.set_shape", "config.add_optimization_profile",
             "config.create_timing_cache", "config.set_timing_cache", "config.progress_monitor=",
             "builder.build_serialized_network", "config.get_timing_cache", "lock", "config.create_timing_cache",
             "cache.combine", "cache.serialize", "write", "unlock"]
    it = iter(names)
    assert all(step in it for step in order), names  # in this order (other calls may come between)
    call = dict((c[0], c) for c in log)
    assert call["builder.create_network"][1] == (1 << 1,)  # 1 << STRONGLY_TYPED: dropping it fails here
    assert call["config.builder_optimization_level="][1] == (4,)
    assert call["config.clear_flag"][1] == (sys.modules["tensorrt"].BuilderFlag.TF32,)  # fp32: TF32 cleared
    assert not any(n == "config.set_flag" for n in names)  # no precision flags, no REFIT, no weight streaming
    assert call["profile.set_shape"][1] == ("latents", *PROF["latents"])  # one min/opt/max per dynamic input
    assert call["parser.parse_from_file"][1] == (str(tmp_path / "onnx" / "vae_decoder.onnx"),)  # finds the data
    loads = [c for c in log if c[0] == "config.create_timing_cache"]
    assert loads[0][1] == (json.dumps(["tactic-old"]).encode(),)  # the existing cache, before the build
    assert call["cache.combine"][1] == (["tactic-old"], False)  # mismatched caches are not mixed
    # the timing cache keeps the old and the new entries; no engine (nor its profile) was written
    assert json.loads((tmp_path / "timing.cache").read_text()) == ["tactic-new", "tactic-old"]
    assert not list((tmp_path / "out").glob("*.plan")) and not list((tmp_path / "out").glob("*.json"))


def test_build_flags_follow_the_settings(tmp_path, fake_gpu):
    log = fake_gpu()
    with pytest.raises(QitrtError, match="could not build"):
        _build(tmp_path, precision="bf16", weight_streaming=True, workspace_bytes=1 << 30, timing_cache=None)
    trt = sys.modules["tensorrt"]
    flags = [(c[0], c[1][0]) for c in log if c[0] in ("config.set_flag", "config.clear_flag")]
    assert flags == [("config.set_flag", trt.BuilderFlag.TF32), ("config.set_flag", trt.BuilderFlag.WEIGHT_STREAMING)]
    assert ("config.set_memory_pool_limit", (trt.MemoryPoolType.WORKSPACE, 1 << 30), {}) in log
    assert "config.progress_monitor=" not in _names(log)  # progress=False
    assert [c[1] for c in log if c[0] == "config.create_timing_cache"] == [(b"",)]  # no file: an empty cache
    assert "lock" not in _names(log)

    log.clear()
    with pytest.raises(QitrtError, match="could not build"):
        _build(tmp_path, precision="fp32", tf32=True)  # forced on for an fp32 build
    assert ("config.set_flag", (trt.BuilderFlag.TF32,), {}) in log


def test_not_strongly_typed_network_is_refused(tmp_path, fake_gpu):
    log = fake_gpu(strongly_typed=False)
    with pytest.raises(QitrtError, match="not strongly typed"):
        _build(tmp_path)
    assert "builder.build_serialized_network" not in _names(log)


def test_network_flags_across_versions():
    trt = _fake_trt([])
    assert te.network_flags(trt) == 1 << 1
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace()
    with pytest.raises(QitrtError, match="STRONGLY_TYPED"):
        te.network_flags(trt)  # TensorRT 10 without the flag: refuse rather than build weakly typed
    trt.__version__ = "11.0.0"
    assert te.network_flags(trt) == 0  # TensorRT 11: always strongly typed


def test_parser_errors_are_reported(tmp_path, fake_gpu):
    log = fake_gpu()
    trt = sys.modules["tensorrt"]
    parser = _Rec(log, "parser", parse_from_file=lambda p: False, get_error=lambda i: f"unsupported op #{i}")
    object.__setattr__(parser, "num_errors", 2)
    trt.OnnxParser = lambda net, logger: parser
    with pytest.raises(QitrtError, match=r"(?s)rejected .*2 error\(s\).*unsupported op #1.*qitrt lint"):
        _build(tmp_path)


def test_stale_engine_is_not_reused_after_a_weight_change(tmp_path, fake_gpu):
    log = fake_gpu()
    old = _source(tmp_path / "onnx", 1.0)
    settings = builder_settings("fp32")
    key = te.engine_cache_key(old.graph.sha256, old.graph.external_data_sha256, "fp32", None, PROF, TRT_VERSION,
                              "9.0", settings)
    stale = tmp_path / "out" / te.engine_file_name("vae_decoder", "fp32", TRT_VERSION, "9.0", key)
    stale.parent.mkdir()
    stale.write_bytes(b"an engine built from the old weights")  # stands in for an old plan; never loaded
    stale.with_suffix(".profile.json").write_text(json.dumps(profile_to_json(PROF)))
    new = _source(tmp_path / "onnx", 2.0)  # same graph file, new external data and manifest hash
    with pytest.raises(QitrtError, match="could not build"):
        te.build_tensorrt_engine(tmp_path / "onnx", new, tmp_path / "out", "vae_decoder", PROF, precision="fp32",
                                 progress=False)
    assert "builder.build_serialized_network" in _names(log)  # a new key: built again, not reused


# -- timing cache ----------------------------------------------------------------------------------------
def _config(log, path_entries=None, **kw):
    trt = _fake_trt(log, **kw)
    config = trt.Builder(None).create_builder_config()
    te._set_timing_cache(config, json.dumps(path_entries).encode() if path_entries is not None else None)
    return config


def test_concurrent_builds_keep_each_others_timing_entries(tmp_path):
    """Two builds start from the same file; each merges under the lock, re-reading what the other wrote."""
    path = tmp_path / "timing.cache"
    path.write_bytes(json.dumps(["shared"]).encode())
    log = []
    a = _config(log, ["shared"], new_entries=["from-a"])
    b = _config(log, ["shared"], new_entries=["from-b"])
    assert te.merge_timing_cache(a, path) and te.merge_timing_cache(b, path)
    assert json.loads(path.read_text()) == ["from-a", "from-b", "shared"]


def test_timing_cache_of_another_gpu_is_left_alone(tmp_path, caplog):
    path = tmp_path / "timing.cache"
    path.write_bytes(json.dumps(["other-gpu"]).encode())
    config = _config([], None, combine_ok=False)
    with caplog.at_level(logging.WARNING):
        assert te.merge_timing_cache(config, path) is False
    assert json.loads(path.read_text()) == ["other-gpu"] and "left unchanged" in caplog.text


def test_unloadable_timing_cache_starts_empty(caplog):
    log = []
    with caplog.at_level(logging.WARNING):
        _config(log, ["x"], cache_loads=False)
    assert [c[1] for c in log if c[0] == "config.create_timing_cache"] == [(b'["x"]',), (b"",)]
    assert "empty cache" in caplog.text


# -- gates before any work ---------------------------------------------------------------------------------
def test_require_tensorrt_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on this machine
    with pytest.raises(QitrtError, match="TensorRT is not available.*--target onnxruntime"):
        te.require_tensorrt()


def test_require_tensorrt_version_and_gpu(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(QitrtError, match="too old"):
        te.require_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__=TRT_VERSION))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QitrtError, match="no CUDA GPU"):
        te.require_tensorrt()


def test_build_checks_arguments_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    src = _source(tmp_path / "onnx")
    build = lambda **kw: te.build_tensorrt_engine(tmp_path / "onnx", src, tmp_path / "out", "vae_decoder", PROF,
                                                  **{"precision": "fp16", **kw})
    for bad in (dict(precision="int4"), dict(opt_level=9), dict(tf32="on")):
        with pytest.raises(InputError):
            build(**bad)
    with pytest.raises(QitrtError, match="TensorRT is not available"):
        build()
    assert not (tmp_path / "out").exists()  # refused before any work
