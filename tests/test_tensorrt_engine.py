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
    assert builder_settings("fp16", refittable=True)["refittable"] is True  # run-time LoRA: refit by name
    assert "refittable" not in builder_settings("fp16")  # absent unless asked: older engines keep their cache key


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
    trt.BuilderFlag = types.SimpleNamespace(TF32=_Flag("TF32", 7), WEIGHT_STREAMING=_Flag("WEIGHT_STREAMING", 21),
                                            REFIT=_Flag("REFIT", 1))
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
    assert call["builder.create_network"][1] == (1 << 1,), \
        "the network was created without the STRONGLY_TYPED flag: precision would come from builder flags, not the graph"
    assert call["config.builder_optimization_level="][1] == (4,), "the builder optimization level asked was not set"
    assert call["config.clear_flag"][1] == (sys.modules["tensorrt"].BuilderFlag.TF32,), \
        "an fp32 reference build must clear TF32 (TensorRT enables it by default)"
    assert not any(n == "config.set_flag" for n in names), \
        "a strongly typed fp32 build sets no builder flag (no precision flags, no REFIT, no weight streaming)"
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
    assert ("config.set_flag", (trt.BuilderFlag.REFIT,), {}) not in log

    log.clear()
    with pytest.raises(QitrtError, match="could not build"):
        _build(tmp_path, precision="fp16", refittable=True)  # run-time LoRA: every weight refittable by name
    assert ("config.set_flag", (trt.BuilderFlag.REFIT,), {}) in log


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


# -- every number and name the builder writes, pinned (mutation testing: docs/testing.md) --------------------------
# From here on some tests let the stand-in's build return a few bytes as the plan (`_plan_builds`), to check what our
# code does with a build's result: the plan file, its profile file, the manifest entry, reuse by cache key. Those
# bytes are never deserialized or run: that still needs TensorRT and a GPU (tests/test_tensorrt_gpu.py).
def _refused(excinfo, field, value, allowed):
    """An InputError names the field, the value given and what is allowed (core/errors.py)."""
    e = excinfo.value
    assert (e.field, e.value, e.allowed) == (field, value, allowed)


def test_cache_key_is_stable_across_releases():
    """The key formula is part of the engine folder's contract: the same inputs give this exact key, so a release
    that renames a field or serializes differently (and would rebuild every engine) fails here first."""
    key = te.engine_cache_key(**KEY_ARGS)
    assert key == "d8a9f5052be34ff3905ddd9cb149126dc6d4e3cf52a585aaa23f768e2953c7f9", key
    no_profile = te.engine_cache_key(**{**KEY_ARGS, "profiles": None, "recipe": {"when": Path("/x")}})
    assert no_profile == "19a05a334174f270f6e03a9f71423d43feefd42fbe9ec2f8a545e6401ebb0a93", no_profile


def test_builder_settings_bounds_and_messages():
    assert builder_settings("fp16", opt_level=0)["optimization_level"] == 0
    assert builder_settings("fp16", opt_level=5)["optimization_level"] == 5
    assert builder_settings("fp16", workspace_bytes=1)["workspace_bytes"] == 1
    assert builder_settings("fp16", weight_streaming=1)["weight_streaming"] is True
    for bad in (6, -1, 2.0):
        with pytest.raises(InputError) as e:
            builder_settings("fp16", opt_level=bad)
        _refused(e, "opt_level", bad, "an integer in [0, 5] (TensorRT builder optimization level)")
    with pytest.raises(InputError) as e:
        builder_settings("fp16", tf32=1)
    _refused(e, "tf32", 1, "True, False or None (None: off for fp32 builds, on otherwise)")
    for bad in (0, -5, True, 1.5):
        with pytest.raises(InputError) as e:
            builder_settings("fp16", workspace_bytes=bad)
        _refused(e, "workspace_bytes", bad, "a positive number of bytes, or None (TensorRT's default)")


@pytest.mark.parametrize("text", ["9", "ab", "", "sm", (9,)])
def test_normalize_cc_refuses_what_is_not_a_capability(text):
    with pytest.raises((InputError, IndexError)) as e:
        te.normalize_cc(text)
    if not isinstance(text, tuple):
        _refused(e, "compute_capability", text, 'e.g. "9.0", (9, 0) or "sm90"')


def test_normalize_cc_more_spellings():
    assert te.normalize_cc("SM_89") == "8.9" and te.normalize_cc(9.0) == "9.0" and te.normalize_cc([12, 1]) == "12.1"
    assert te.normalize_cc("sm100") == "10.0" and te.normalize_cc("10.3") == "10.3"


def test_check_engine_compatible_names_the_engine_and_both_sides(caplog):
    fix = "rebuild with `qitrt build ... --target tensorrt` on this machine"
    entry = {"engine_file": "old.plan", "tensorrt": "10.1", "compute_capability": "9.0", "gpu": "NVIDIA H100"}
    with pytest.raises(EngineMismatchError) as e:
        te.check_engine_compatible(entry, "10.2", "NVIDIA H100", "9.0")
    assert str(e.value) == f"old.plan was built with TensorRT 10.1, this machine has TensorRT 10.2: {fix}"
    with pytest.raises(EngineMismatchError) as e:
        te.check_engine_compatible({**entry, "file": "new.plan"}, "10.1", "NVIDIA L40S", (8, 9))
    assert str(e.value) == f"new.plan was built for compute capability 9.0 (NVIDIA H100), this GPU (NVIDIA L40S) is " \
                           f"8.9: {fix}"
    for partial in ({"tensorrt": "10.1"}, {"compute_capability": "9.0"}, {}):
        with pytest.raises(EngineMismatchError) as e:
            te.check_engine_compatible(partial, "10.1", "NVIDIA H100", "9.0")
        assert str(e.value) == f"engine: the manifest entry does not say which TensorRT/GPU built it; {fix}"
    with pytest.raises(EngineMismatchError) as e:
        te.check_engine_compatible(entry, "10.1", "NVIDIA H100 PCIe", "9.0", strict_gpu=True)
    assert str(e.value) == ("old.plan was built on NVIDIA H100, running on NVIDIA H100 PCIe (same compute capability "
                            f"9.0): it runs, but tactics were timed on the other GPU; {fix}")
    with caplog.at_level(logging.WARNING):
        te.check_engine_compatible({**entry, "gpu": None}, "10.1", "NVIDIA H100 PCIe", "9.0", strict_gpu=True)
        te.check_engine_compatible(entry, "10.1", "", "9.0", strict_gpu=True)  # the GPU's name is unknown here
        te.check_engine_compatible(entry, "10.1", "NVIDIA H100", "9.0", strict_gpu=True)
    assert not caplog.records


def test_require_tensorrt_checks_the_gpu_it_is_asked_for(monkeypatch):
    import torch

    trt = types.SimpleNamespace(__version__="10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert te.require_tensorrt() is trt and te.require_tensorrt(0) is trt
    with pytest.raises(QitrtError, match="no CUDA GPU 1 is visible"):
        te.require_tensorrt(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QitrtError, match=r"no CUDA GPU 0 is visible .*TensorRT engines are built and run on an "
                                         r"NVIDIA GPU$"):
        te.require_tensorrt(0)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(QitrtError, match=r"^TensorRT is not available here \(ModuleNotFoundError: "):
        te.require_tensorrt()


def test_trt_major_of_odd_versions():
    from qwen_image_trt.core.tensorrt import _major

    assert te.trt_major(types.SimpleNamespace()) == 0 and te.trt_major(types.SimpleNamespace(__version__="11.2")) == 11
    assert _major("rc1") == 0 and _major(10) == 10 and _major("10.13.0.35") == 10


def test_gpu_info_reads_the_device_asked_for(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: seen.append(d) or (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: seen.append(d) or "NVIDIA L40S")
    from qwen_image_trt.core.tensorrt import gpu_info

    assert gpu_info(3) == ("NVIDIA L40S", "8.9") and seen == [3, 3]
    assert te._cuda_device(2).idx == 2  # torch.cuda.device(2): entered only around the build


def test_resolve_profile_edge_cases(caplog):
    with pytest.raises(InputError) as e:
        te.resolve_profile({"latents": (-1, 16)}, {"other": ((1,), (1,), (1,))})
    _refused(e, "profiles", ["other"], "profiles for the network's inputs ['latents']")
    with pytest.raises(InputError) as e:
        te.resolve_profile({"latents": (1, 16), "extra": (2, -1)}, {"latents": ((1, 16), (1, 16), (1, 16))})
    _refused(e, "profiles", ["latents"], "a profile for dynamic input 'extra' [2, -1]")
    with pytest.raises(InputError) as e:
        te.resolve_profile({"latents": (-1, 16, 1)}, {"latents": ((1, 16), (1, 16), (2, 16))})
    _refused(e, "profiles[latents]", [[1, 16], [1, 16], [2, 16]], "shapes of rank 3 (network input [-1, 16, 1])")
    # static inputs (0-sized dims included) need no profile, and do not stop the inputs after them
    net = {"static": (1, 3), "empty": (0, 4), "latents": (-1, 0, -1)}
    prof = {"latents": ((1, 0, 4), (2, 0, 8), (4, 0, 16))}
    with caplog.at_level(logging.WARNING):
        assert te.resolve_profile(net, prof) == prof
    assert not caplog.records  # the profile agrees with the network: nothing to say
    with caplog.at_level(logging.WARNING):
        assert te.resolve_profile(net, {"latents": ((1, 5, 4), (2, 5, 8), (4, 6, 16))}) == prof
    assert [r.getMessage() for r in caplog.records] == \
        ["profile for latents: static dims taken from the network [-1, 0, -1] (profile said [1, 5, 4]..[4, 6, 16])"]


def test_limits_from_profiles_per_component():
    dec = {"latents": ((1, 16, 1, 4, 6), (1, 16, 1, 8, 8), (3, 16, 1, 10, 12))}
    enc = {"images": ((1, 3, 1, 32, 48), (2, 3, 1, 64, 64), (4, 3, 1, 80, 96))}
    tx = {"hidden_states": ((1, 16, 64), (2, 64, 64), (3, 256, 64))}
    assert te.limits_from_profiles("vae_decoder", dec) == {"height": [32, 80], "width": [48, 96], "batch": [1, 3]}
    assert te.limits_from_profiles("vae_encoder", enc) == {"height": [32, 80], "width": [48, 96], "batch": [1, 4]}
    assert te.limits_from_profiles("transformer", tx) == {"batch": [1, 1], "image_tokens": [16, 256]}
    assert te.limits_from_profiles("transformer", tx, cfg=False) == {"batch": [1, 3], "image_tokens": [16, 256]}
    one = {"hidden_states": ((1, 16, 64), (1, 16, 64), (1, 16, 64))}
    assert te.limits_from_profiles("transformer", one) == {"batch": [1, 1], "image_tokens": [16, 16]}
    # a profile says something only about its own component's input
    for component, p in (("transformer", dec), ("vae_decoder", enc), ("transformer", enc), ("vae_encoder", tx),
                         ("vae_decoder", tx), ("text_encoder", dec), ("vae_encoder", dec)):
        assert te.limits_from_profiles(component, p) == {}, component


def test_graph_identity_messages(tmp_path):
    src = _source(tmp_path / "g")
    with pytest.raises(InputError) as e:
        te.graph_identity(tmp_path / "missing", src)
    path = str(tmp_path / "missing" / "vae_decoder.onnx")
    _refused(e, "source", path, "an existing .onnx graph (run `qitrt export` first)")
    unhashed = src.model_copy(update={"graph": src.graph.model_copy(update={"external_data_sha256": None})})
    with pytest.raises(EngineMismatchError) as e:
        te.graph_identity(tmp_path / "g", unhashed)
    assert str(e.value).endswith("'vae_decoder.onnx.data', so an engine built from it could go stale unnoticed: "
                                 "re-export with this version of qwen-image-trt")
    (tmp_path / "g" / "vae_decoder.onnx.data").write_bytes(b"\0" * 65)  # other weights under the manifest's name
    with pytest.raises(EngineMismatchError) as e:
        te.graph_identity(tmp_path / "g", src)
    assert str(e.value).endswith("changed since its manifest was written: re-run `qitrt export`/`qitrt quantize` "
                                 "(or `qitrt build --force`)")


def test_network_flags_and_strong_typing_by_version():
    flag = _Flag("STRONGLY_TYPED", 1)
    assert te.network_flags(types.SimpleNamespace(__version__="11.0.0")) == 0  # no flag enum at all
    with pytest.raises(QitrtError, match=r"^TensorRT 10.3 has no STRONGLY_TYPED network flag: TensorRT >= 10 is "):
        te.network_flags(types.SimpleNamespace(__version__="10.3"))
    for version in ("10.13", "11.0"):
        trt = types.SimpleNamespace(__version__=version,
                                    NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=flag))

        class Network:  # says whether it is strongly typed only when asked for that flag
            def get_flag(self, f):
                return f is not flag

        net = Network()
        builder = types.SimpleNamespace(create_network=lambda flags, net=net: net)
        if version == "11.0":  # TensorRT 11 networks are always strongly typed: not asked
            assert te.create_network(trt, builder) is net
        else:
            with pytest.raises(QitrtError) as e:
                te.create_network(trt, builder)
            assert str(e.value) == ("TensorRT created a network that is not strongly typed: the graph's Q/DQ nodes "
                                    "and casts would not fix its precision")
        old = types.SimpleNamespace()  # a network that cannot say (no get_flag): taken as created
        assert te.create_network(trt, types.SimpleNamespace(create_network=lambda flags, old=old: old)) is old


def test_configure_builder_passes_the_objects_it_made():
    log = []
    trt = _fake_trt(log)
    builder = trt.Builder(None)
    network = builder.create_network(2)
    monitor = object()
    _, resolved = te.configure_builder(trt, builder, network, PROF, SETTINGS, progress_monitor=monitor)
    assert resolved == PROF
    calls = {c[0]: c for c in log}
    profile = [c for c in log if c[0] == "builder.create_optimization_profile"]
    assert len(profile) == 1 and calls["config.add_optimization_profile"][1][0]._name == "profile"
    assert calls["config.progress_monitor="][1] == (monitor,)
    assert calls["config.set_timing_cache"][2] == {"ignore_mismatch": False}
    log.clear()
    static = _Rec(log, "static")
    object.__setattr__(static, "num_inputs", 0)
    te.configure_builder(trt, builder, static, {}, SETTINGS)  # nothing dynamic
    assert "builder.create_optimization_profile" not in _names(log) and "config.progress_monitor=" not in _names(log)


class _StrictConfig:
    """An IBuilderConfig's timing-cache calls: garbage is not a cache, set_timing_cache takes only caches."""

    def __init__(self, log, on_disk_ok=True):
        self.log, self.on_disk_ok = log, on_disk_ok

    def create_timing_cache(self, data):
        self.log.append(("create", bytes(data)))
        if data and not bytes(data).startswith(b"["):
            raise RuntimeError("not a timing cache")
        return _Cache(self.log, json.loads(bytes(data)) if data else ())

    def set_timing_cache(self, cache, ignore_mismatch):
        self.log.append(("set", sorted(cache.entries), ignore_mismatch))
        return isinstance(cache, _Cache) and self.on_disk_ok

    def get_timing_cache(self):
        return None


def test_timing_cache_that_is_not_one_starts_empty(caplog):
    log = []
    with caplog.at_level(logging.WARNING):
        te._set_timing_cache(_StrictConfig(log), b"garbage")
    assert log == [("create", b"garbage"), ("create", b""), ("set", [], False)]
    assert caplog.records[0].getMessage() == (
        "tensorrt: the timing cache file is unreadable or was made by another TensorRT version or GPU; starting from "
        "an empty cache (use one timing cache file per GPU model)")
    log.clear()
    te._set_timing_cache(_StrictConfig(log), b'["a"]')
    assert log == [("create", b'["a"]'), ("set", ["a"], False)]  # a good cache is used as it is, mismatches refused
    log.clear()
    te._set_timing_cache(_StrictConfig(log, on_disk_ok=False), b'["a"]')  # TensorRT refused it (other GPU)
    assert log[-2:] == [("create", b""), ("set", [], False)]


def test_merge_timing_cache_edge_cases(tmp_path, caplog):
    log = []
    assert te.merge_timing_cache(_StrictConfig(log), tmp_path / "x.cache") is False  # the build made no cache
    assert not (tmp_path / "x.cache").exists()
    config = _config(log, ["mine"], new_entries=["new"])
    path = tmp_path / "new" / "dir" / "timing.cache"  # first build: no file, no folder yet
    assert te.merge_timing_cache(config, path) is True
    assert json.loads(path.read_text()) == ["mine", "new"]
    path.write_bytes(b"")  # an empty file (a crashed writer) is replaced, not read
    assert te.merge_timing_cache(_config(log, ["mine"], new_entries=[]), path) is True
    assert json.loads(path.read_text()) == ["mine"]
    path.write_bytes(b"not a cache")
    strict = _StrictConfig(log)
    strict.get_timing_cache = lambda: _Cache(log, ["mine"])
    with caplog.at_level(logging.WARNING):
        assert te.merge_timing_cache(strict, path) is False
    assert path.read_bytes() == b"not a cache"
    assert caplog.records[-1].getMessage() == (
        f"tensorrt: {path} holds a timing cache of another TensorRT version or GPU; left unchanged, this build's "
        "timings are not saved")


def test_parser_errors_show_the_first_twenty(tmp_path):
    log = []
    trt = _fake_trt(log)
    made = []

    def parser(net, logger):
        made.append((net, logger))
        p = _Rec(log, "parser", parse_from_file=lambda path: False, get_error=lambda i: f"e{i}")
        object.__setattr__(p, "num_errors", 25)
        return p
    trt.OnnxParser = parser
    network, logger = object(), object()
    with pytest.raises(QitrtError) as e:
        te._parse_onnx(trt, network, logger, tmp_path / "g.onnx")
    assert made == [(network, logger)]
    assert str(e.value) == (f"TensorRT's ONNX parser rejected {tmp_path / 'g.onnx'} (25 error(s)):\n  "
                            + "\n  ".join(f"e{i}" for i in range(20)) + f"\nrun `qitrt lint {tmp_path / 'g.onnx'}` "
                            "for a static check")


def test_build_plan_wires_one_logger_network_and_config(tmp_path, caplog):
    log = []
    trt = _fake_trt(log)
    builder = trt.Builder(None)
    seen = {}
    builder._answers["build_serialized_network"] = lambda net, cfg: seen.update(net=net, cfg=cfg) or b"PLAN"
    trt.Builder = lambda logger: (seen.update(builder_logger=logger), builder)[1]
    parsers = []
    trt.OnnxParser = lambda net, logger: (parsers.append((net, logger)),
                                          _Rec(log, "parser", parse_from_file=lambda p: True))[1]
    loggers = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: loggers.append((self, level))})
    plan, resolved = te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS)
    assert plan == b"PLAN" and resolved == PROF
    (logger, level), = loggers
    assert level == 2 and seen["builder_logger"] is logger
    assert parsers[0][1] is logger and parsers[0][0] is seen["net"] and seen["net"]._name == "network"
    assert seen["cfg"]._name == "config"
    # a failed build still merges its timing cache; an unsavable cache is a warning, not a second error
    builder._answers["build_serialized_network"] = lambda net, cfg: None
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING), pytest.raises(QitrtError, match="could not build"):
        te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS, timing_cache=tmp_path / "file" / "timing.cache")
    msg = caplog.records[-1].getMessage()
    assert msg.startswith(f"tensorrt: could not save the timing cache to {tmp_path / 'file' / 'timing.cache'}: ") \
        and "Errno" in msg


def test_progress_bars_nest_by_phase():
    inits = []

    class IProgressMonitor:
        def __init__(self):
            inits.append(self)

    trt = types.SimpleNamespace(IProgressMonitor=IProgressMonitor)
    assert te._progress_monitor(types.SimpleNamespace(), "x") is None  # TensorRT without progress monitors
    mon = te._progress_monitor(trt, "vae_decoder")
    assert inits == [mon] and mon.bars == {}
    mon.phase_start("build", None, 10)
    mon.phase_start("tactics", "build", 4)
    mon.phase_start("layer", "tactics", 2)
    bars = {k: v[0] for k, v in mon.bars.items()}
    assert {k: v[1] for k, v in mon.bars.items()} == {"build": None, "tactics": "build", "layer": "tactics"}
    assert [(b.total, b.desc, b.leave, b.pos) for b in bars.values()] == [
        (10, "vae_decoder: build", True, 0), (4, "vae_decoder: tactics", False, -1),
        (2, "vae_decoder: layer", False, -2)]
    assert mon.step_complete("build", 2) is True and bars["build"].n == 3
    assert mon.step_complete("build", 6) is True and bars["build"].n == 7  # steps are 0-based, the bar counts done
    assert mon.step_complete("unknown", 1) is True  # a phase we never saw start: no bar, build goes on
    mon.phase_finish("layer")
    assert "layer" not in mon.bars and bars["layer"].disable and not bars["build"].disable
    mon.phase_finish("never-started")
    mon.phase_finish("tactics"), mon.phase_finish("build")
    assert mon.bars == {} and bars["build"].disable


def _plan_builds(fake_gpu, monkeypatch, plan=b"PLAN-BYTES", **kw):
    """The stand-in, with a builder that returns `plan` (bytes TensorRT would serialize; never loaded here)."""
    log = fake_gpu(**kw)
    from qwen_image_trt.core.files import write_atomic

    monkeypatch.setattr(te, "write_atomic", lambda p, d: (log.append(("write", (Path(p).name, d), {})),
                                                          write_atomic(p, d))[1])
    builder = sys.modules["tensorrt"].Builder(None)
    builder._answers["build_serialized_network"] = lambda net, cfg: plan
    log.clear()
    return log


def test_successful_build_writes_plan_profile_and_entry(tmp_path, fake_gpu, monkeypatch, caplog):
    log = _plan_builds(fake_gpu, monkeypatch)
    devices = []
    monkeypatch.setattr(te, "gpu_info", lambda device: devices.append(device) or ("NVIDIA H100 80GB HBM3", "9.0"))
    src = _source(tmp_path / "onnx")
    out = tmp_path / "deep" / "er" / "out"
    settings = builder_settings("fp32")
    key = te.engine_cache_key(src.graph.sha256, src.graph.external_data_sha256, "fp32", {"r": 1}, PROF, TRT_VERSION,
                              "9.0", settings)
    name = f"vae_decoder.fp32.trt{TRT_VERSION}.sm90.{key[:12]}.plan"
    kw = dict(precision="fp32", recipe={"r": 1}, device=1, progress=False)
    with caplog.at_level(logging.INFO, logger=te.log.name):
        entry = te.build_tensorrt_engine(tmp_path / "onnx", src, out, "vae_decoder", PROF, **kw)
    assert devices == [1] and "builder.build_serialized_network" in _names(log)
    assert (out / name).read_bytes() == b"PLAN-BYTES"
    assert json.loads((out / name.replace(".plan", ".profile.json")).read_text()) == profile_to_json(PROF)
    dumped = entry.model_dump()
    seconds = dumped.pop("seconds")
    assert isinstance(seconds, float) and 0 <= seconds < 60 and seconds == round(seconds, 3)
    want = {"file": name, "bytes": 10, "tensorrt": TRT_VERSION, "gpu": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", "profiles": profile_to_json(PROF), "cache_key": key, "builder": settings,
            "limits": {"height": [64, 64], "width": [64, 96], "batch": [1, 2]}}
    assert {k: dumped[k] for k in want} == want
    assert [r.getMessage() for r in caplog.records] == [
        f"tensorrt: building {name} from vae_decoder.onnx (fp32, opt level 3, TF32 off)"]
    # the same key again: reused as it is, not rebuilt; the entry is the fresh build's but for its seconds
    log.clear(), caplog.clear()
    with caplog.at_level(logging.INFO, logger=te.log.name):
        again = te.build_tensorrt_engine(tmp_path / "onnx", src, out, "vae_decoder", PROF, **kw)
    assert "builder.build_serialized_network" not in _names(log)
    assert again.model_dump() == {**dumped, "seconds": None}
    assert [r.getMessage() for r in caplog.records] == [
        f"tensorrt: {name} is up to date (cache key {key[:12]}), not rebuilt"]
    # force rebuilds; explicit limits are recorded as given
    entry = te.build_tensorrt_engine(tmp_path / "onnx", src, out, "vae_decoder", PROF, **kw, force=True,
                                     limits={"batch": [1, 1]})
    assert "builder.build_serialized_network" in _names(log) and entry.limits == {"batch": [1, 1]}
    assert entry.seconds is not None
    # a plan without its profile file is not trusted: rebuilt
    (out / name.replace(".plan", ".profile.json")).unlink()
    log.clear()
    te.build_tensorrt_engine(tmp_path / "onnx", src, out, "vae_decoder", PROF, **kw)
    assert "builder.build_serialized_network" in _names(log)


def test_build_key_covers_its_arguments(tmp_path, fake_gpu, monkeypatch):
    """Each argument that changes the engine changes its file name (the cache key), so nothing stale is reused."""
    _plan_builds(fake_gpu, monkeypatch)
    src = _source(tmp_path / "onnx")
    base = dict(precision="fp16", recipe=None, progress=False)

    def build(out, profiles=PROF, **kw):
        return te.build_tensorrt_engine(tmp_path / "onnx", src, tmp_path / out, "vae_decoder", profiles,
                                        **{**base, **kw}).file
    names = {build("a"), build("b", recipe={"x": 1}), build("c", precision="bf16"),
             build("d", profiles=vae_decoder_profile("64x64", 1)), build("e", opt_level=2)}
    assert len(names) == 5
    assert build("a").startswith("vae_decoder.fp16.trt10.13.0.35.sm90.")
    with pytest.raises(InputError) as e:
        build("f", precision="int4")
    _refused(e, "precision", "int4", "one of fp32, fp16, bf16, int8, fp8")


def test_build_logs_tf32_on_for_reduced_precision(tmp_path, fake_gpu, monkeypatch, caplog):
    _plan_builds(fake_gpu, monkeypatch)
    src = _source(tmp_path / "onnx")
    with caplog.at_level(logging.INFO, logger=te.log.name):
        e = te.build_tensorrt_engine(tmp_path / "onnx", src, tmp_path / "o", "vae_decoder", PROF, precision="bf16",
                                     opt_level=5, progress=False)
    assert caplog.records[0].getMessage() == f"tensorrt: building {e.file} from vae_decoder.onnx (bf16, opt level 5, " \
                                             "TF32 on)"


def test_build_defaults_gpu_zero_with_progress_bars(tmp_path, fake_gpu, monkeypatch):
    import time

    from qwen_image_trt.core.tensorrt import gpu_info

    log = _plan_builds(fake_gpu, monkeypatch)
    builder = sys.modules["tensorrt"].Builder(None)
    builder._answers["build_serialized_network"] = lambda net, cfg: time.sleep(0.02) or b"PLAN"  # a build takes time
    devices = []
    monkeypatch.setattr(te, "gpu_info", lambda device: devices.append(device) or ("NVIDIA H100 80GB HBM3", "9.0"))
    seen = []
    monkeypatch.setattr(torch_cuda(), "get_device_capability", lambda d=None: seen.append(d) or (9, 0))
    monkeypatch.setattr(torch_cuda(), "get_device_name", lambda d=None: seen.append(d) or "H100")
    assert gpu_info() == ("H100", "9.0") and seen == [0, 0]
    src = _source(tmp_path / "onnx")
    entry = te.build_tensorrt_engine(tmp_path / "onnx", src, tmp_path / "out", "vae_decoder", PROF, precision="fp16")
    assert devices == [0] and [c[1] for c in log if c[0] == "cuda.device"] == [(0,)]
    assert 0.02 <= entry.seconds < 2.5  # the build's own time, in seconds, to the millisecond
    monitor = next(c[1][0] for c in log if c[0] == "config.progress_monitor=")
    monitor.phase_start("build", None, 3)
    assert monitor.bars["build"][0].desc == "vae_decoder: build"
    monitor.phase_finish("build")


def torch_cuda():
    import torch

    return torch.cuda


def test_build_plan_merges_the_timing_cache_however_the_build_ends(tmp_path):
    log = []
    trt = _fake_trt(log, new_entries=["timed"])
    builder = trt.Builder(None)
    cache = tmp_path / "timing.cache"
    builder._answers["build_serialized_network"] = lambda net, cfg: b"PLAN"
    assert te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS, timing_cache=cache)[0] == b"PLAN"
    assert json.loads(cache.read_text()) == ["timed"]
    # a successful build whose timing cache cannot be saved says so (the engine is fine, the cache is not)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS, timing_cache=tmp_path / "file" / "timing.cache")

    def out_of_memory(net, cfg):
        raise MemoryError("out of GPU memory")
    builder._answers["build_serialized_network"] = out_of_memory
    cache.unlink()
    with pytest.raises(MemoryError, match="out of GPU memory"):  # the build's own error, after the merge
        te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS, timing_cache=cache)
    assert json.loads(cache.read_text()) == ["timed"]
    with pytest.raises(MemoryError):
        te.build_plan(trt, tmp_path / "g.onnx", PROF, SETTINGS)  # no cache file asked: nothing written
    assert {p.name for p in tmp_path.iterdir()} <= {"file", "timing.cache", "timing.cache.lock"}


def test_cuda_device_is_the_one_asked_for():
    assert te._cuda_device(0).idx == 0 and te._cuda_device(3).idx == 3
