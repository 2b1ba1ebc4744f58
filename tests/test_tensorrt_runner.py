"""TensorRT runner logic that needs no GPU: binding plan, dtype mapping, feed checks, CUDA-graph policy.

The engine/context stand-ins below only answer the metadata questions our pure functions ask; nothing
here runs an engine (see tests/test_tensorrt_gpu.py for that, skipped without TensorRT and a GPU).
"""

from __future__ import annotations

import types

import pytest
import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.backends import tensorrt_runner as tr

INPUT, OUTPUT = "INPUT", "OUTPUT"


class _Meta:
    """Metadata of a transformer engine as ICudaEngine reports it (names, modes, dtypes, shapes)."""

    tensors = [("hidden_states", INPUT, "FLOAT", (-1, -1, 64)), ("encoder_hidden_states_mask", INPUT, "BOOL", (-1, -1)),
               ("timestep", INPUT, "FLOAT", (-1,)), ("noise_pred", OUTPUT, "FLOAT", (-1, -1, 64))]
    num_io_tensors = len(tensors)

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def _t(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name):
        return self._t(name)[1]

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self._t(name)[2])  # like tensorrt.DataType.FLOAT

    def get_tensor_shape(self, name):
        return self._t(name)[3]


def test_binding_plan_splits_inputs_and_outputs():
    plan = tr.binding_plan(_Meta(), INPUT)
    assert plan.input_names == ["hidden_states", "encoder_hidden_states_mask", "timestep"]
    assert plan.output_names == ["noise_pred"]
    assert plan.inputs[1].dtype == torch.bool and plan.outputs[0].shape == (-1, -1, 64)


def test_output_shapes_from_context():
    plan = tr.binding_plan(_Meta(), INPUT)
    ctx = types.SimpleNamespace(get_tensor_shape=lambda name: (2, 4096, 64))
    assert tr.output_shapes(ctx, plan) == {"noise_pred": (2, 4096, 64)}
    unset = types.SimpleNamespace(get_tensor_shape=lambda name: (-1, 4096, 64))
    with pytest.raises(RuntimeError, match="noise_pred"):
        tr.output_shapes(unset, plan)


@pytest.mark.parametrize("name,dtype", [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
                                        ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool),
                                        ("INT8", torch.int8), ("UINT8", torch.uint8)])
def test_torch_dtype(name, dtype):
    assert tr.torch_dtype(name) == dtype
    assert tr.torch_dtype(types.SimpleNamespace(name=name)) == dtype


def test_torch_dtype_unknown():
    with pytest.raises(TypeError, match="INT4"):
        tr.torch_dtype("INT4")


def test_check_feed_and_signature():
    spec = tr.TensorSpec("hidden_states", torch.float32, (-1, -1, 64))
    tr.check_feed(spec, torch.zeros(2, 16, 64))
    for bad in (torch.zeros(2, 16, 32), torch.zeros(16, 64)):
        with pytest.raises(InputError):
            tr.check_feed(spec, bad)
    feeds = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert tr.shape_signature(feeds, ["a", "b"]) == (("a", (2, 3)), ("b", (4,)))


def test_cuda_graph_policy_warmup_capture_replay():
    p = tr.CudaGraphPolicy(enabled=True, warmup=1, max_graphs=2)
    a, b, c = (("x", (1, 16)),), (("x", (2, 16)),), (("x", (4, 16)),)
    assert [p.decide(a), p.decide(a)] == ["eager", "capture"]
    assert p.captured_ok(a) == []
    assert p.decide(a) == "replay"
    assert [p.decide(b), p.decide(b)] == ["eager", "capture"]
    p.captured_ok(b)
    assert p.decide(a) == "replay"  # a is now most recently used
    assert [p.decide(c), p.decide(c)] == ["eager", "capture"]
    assert p.captured_ok(c) == [b]  # least recently used evicted
    assert p.decide(b) == "eager"  # evicted signatures start over
    p.capture_failed(c)
    assert p.decide(c) == p.decide(a) == "eager"


def test_cuda_graph_policy_disabled_and_warmup():
    p = tr.CudaGraphPolicy(enabled=False)
    assert {p.decide((("x", (1,)),)) for _ in range(5)} == {"eager"}
    p = tr.CudaGraphPolicy(warmup=3)
    assert [p.decide("s") for _ in range(4)] == ["eager"] * 3 + ["capture"]
    with pytest.raises(InputError):
        tr.CudaGraphPolicy(warmup=0)


def test_runner_is_cheap_to_make_and_refuses_cpu(tmp_path):
    manifest = {"components": {"vae_decoder": {"engine_file": "x.plan", "profiles": {
        "latents": {"min": [1, 16, 1, 4, 4], "opt": [1, 16, 1, 8, 8], "max": [2, 16, 1, 8, 8]}}}}}
    r = tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", device="cpu", manifest=manifest)
    assert not r.is_active and r._profile["latents"][2] == (2, 16, 1, 8, 8)
    with pytest.raises(InputError, match="CUDA"):
        r.activate()


def test_make_runner_builds_tensorrt_runner_without_importing_tensorrt(tmp_path):
    import json
    import sys

    from qwen_image_trt.runtime.backends import make_runner

    (tmp_path / "manifest.json").write_text(json.dumps({"components": {"transformer": {
        "file": "transformer.onnx", "engine_file": "transformer.fp16.trt10.13.0.35.sm90.0123456789ab.plan"}}}))
    had = "tensorrt" in sys.modules
    r = make_runner("tensorrt", "transformer", engines_dir=tmp_path, device="cuda")
    assert isinstance(r, tr.TensorRTRunner) and r.engine_path.name.endswith(".plan")
    assert ("tensorrt" in sys.modules) == had
