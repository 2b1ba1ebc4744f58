"""TensorRT runner logic that needs no GPU: binding plan, dtypes, feed checks, CUDA-graph policy, output LRU,
the shared activation arena, weight-streaming budgets, mmap deserialization, and the order of the calls one
inference makes (streams, arena, context), recorded on stand-ins.

The stand-ins answer metadata questions and record calls; none of them computes anything: the recorded
context refuses to enqueue, so no test here pretends an engine ran (see tests/test_tensorrt_gpu.py for that,
skipped without TensorRT and a GPU).
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import types

import pytest
import torch

from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.manifest import TensorRTEngine
from qwen_image_trt.core.tensorrt import builder_settings
from qwen_image_trt.runtime.backends import tensorrt_memory as tm, tensorrt_runner as tr

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


# -- CUDA graphs ---------------------------------------------------------------------------------------------
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


def test_cuda_graphs_are_dropped_when_the_arena_moves():
    p = tr.CudaGraphPolicy(warmup=1)
    assert p.sync_generation(1) is False  # first sight of the arena: nothing captured yet
    p.decide("s"), p.decide("s"), p.captured_ok("s")
    assert p.sync_generation(1) is False and p.decide("s") == "replay"
    assert p.sync_generation(2) is True  # the arena moved: the graph holds a freed address
    assert [p.decide("s"), p.decide("s")] == ["eager", "capture"]  # warm up and capture again


# -- output buffers ------------------------------------------------------------------------------------------
def test_output_buffers_are_a_bounded_lru():
    made = []
    bufs = tm.OutputBuffers(2, lambda shape, dtype: made.append(shape) or torch.empty(shape, dtype=dtype))
    a = bufs.get("y", (1, 4), torch.float32)
    assert bufs.get("y", (1, 4), torch.float32) is a and made == [(1, 4)]  # reused, not reallocated
    bufs.get("y", (2, 4), torch.float32)
    bufs.get("y", (1, 4), torch.float32)  # (1, 4) is now the most recently used
    bufs.get("y", (3, 4), torch.float32)
    assert len(bufs) == 2
    assert bufs.get("y", (1, 4), torch.float32) is a  # kept
    bufs.get("y", (2, 4), torch.float32)
    assert made == [(1, 4), (2, 4), (3, 4), (2, 4)]  # (2, 4) was evicted and made again
    with pytest.raises(InputError):
        tm.OutputBuffers(0, None)


# -- the shared activation arena -------------------------------------------------------------------------------
class _Buf:
    def __init__(self, log, n):
        self.n, self.addr = n, 0x10000 * (len(log) + 1)
        log.append(("alloc", n))

    def data_ptr(self):
        return self.addr


class _Event:
    def __init__(self, log):
        self.log = log

    def record(self, stream):
        self.log.append(("event.record", stream.name))

    def synchronize(self):
        self.log.append(("event.synchronize",))


class _Stream:
    def __init__(self, log, name, handle=0):
        self.log, self.name, self.cuda_stream = log, name, handle

    def wait_event(self, event):
        self.log.append((f"{self.name}.wait_event",))

    def wait_stream(self, other):
        self.log.append((f"{self.name}.wait_stream", other.name))

    def synchronize(self):
        self.log.append((f"{self.name}.synchronize",))


def _arena(log, align=256):
    return tm.DeviceArena(lambda n: _Buf(log, n), lambda: _Event(log), align=align)


def test_arena_grows_to_the_largest_need_and_counts_moves():
    log = []
    arena = _arena(log)
    assert arena.reserve(1000) is True and (arena.size, arena.generation) == (1024, 1)  # rounded to the alignment
    ptr = arena.ptr
    assert arena.reserve(500) is False and arena.reserve(1024) is False and arena.ptr == ptr  # never shrinks
    with arena.use(_Stream(log, "a")):
        pass
    log.clear()
    assert arena.reserve(3000) is True and (arena.size, arena.generation) == (3072, 2) and arena.ptr != ptr
    # the old buffer is freed only after its last user's work finished, and before the new one is made
    assert log == [("event.synchronize",), ("alloc", 3072)]


def test_arena_orders_its_users_through_one_event():
    log = []
    arena = _arena(log)
    arena.reserve(100)
    a, b = _Stream(log, "a"), _Stream(log, "b")
    with arena.use(a):
        log.append(("work", "a"))
    with arena.use(b):
        log.append(("work", "b"))
    assert log[1:] == [("work", "a"), ("event.record", "a"),
                       ("b.wait_event",), ("work", "b"), ("event.record", "b")]


def test_arena_is_freed_when_its_last_runner_leaves():
    log = []
    arena = _arena(log)
    arena.attach(), arena.attach()
    arena.reserve(100)
    arena.detach()
    assert arena.size == 256
    arena.detach()
    assert arena.size == 0 and arena.ptr == 0 and arena.generation == 2


def test_shared_arena_is_one_per_device():
    assert tm.shared_arena(0) is tm.shared_arena(0) and tm.shared_arena(0) is not tm.shared_arena(1)
    assert tm.shared_arena(0).size == 0  # nothing is allocated until an engine asks
    assert tm.engine_memory_size(types.SimpleNamespace(device_memory_size_v2=5, device_memory_size=3)) == 5
    assert tm.engine_memory_size(types.SimpleNamespace(device_memory_size=3)) == 3  # TensorRT 10.0


# -- weight streaming -------------------------------------------------------------------------------------------
class _StreamingEngine:
    streamable_weights_size = 1000
    weight_streaming_budget_v2 = None

    def get_weight_streaming_automatic_budget(self):
        return 640


@pytest.mark.parametrize("budget,kept", [(300, 300), (5000, 1000), (0.25, 250), (1.0, 1000), ("auto", 640), (-1, 640)])
def test_weight_streaming_budget(budget, kept):
    engine = _StreamingEngine()
    assert tm.apply_weight_streaming_budget(engine, budget, True, "transformer") == kept
    assert engine.weight_streaming_budget_v2 == kept


def test_weight_streaming_budget_refusals():
    assert tm.apply_weight_streaming_budget(_StreamingEngine(), None, False, "t") is None  # nothing asked
    for bad in (-2, 0.0, 1.5, "half", True):
        with pytest.raises(InputError):
            tm.check_budget_value(bad)
    with pytest.raises(InputError, match="built without weight streaming.*--weight-streaming"):
        tm.apply_weight_streaming_budget(_StreamingEngine(), 0.5, False, "t")
    none_streamable = _StreamingEngine()
    none_streamable.streamable_weights_size = 0
    with pytest.raises(InputError, match="no streamable weights"):
        tm.apply_weight_streaming_budget(none_streamable, 0.5, None, "t")  # no manifest: the engine says so
    with pytest.raises(QitrtError, match="10.1"):
        tm.apply_weight_streaming_budget(types.SimpleNamespace(), 0.5, True, "t")


def test_context_is_user_managed_and_sized_after_the_budget():
    log = []

    class Engine(_StreamingEngine):
        device_memory_size_v2 = 3000

        def __setattr__(self, name, value):
            log.append(("engine." + name, value))
            object.__setattr__(self, name, value)

        def create_execution_context(self, strategy):
            log.append(("create_execution_context", strategy))
            return "context"

    trt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"))
    arena = _arena(log)
    assert tm.open_context(trt, Engine(), arena, budget=0.5, built_with=True, name="t") == "context"
    assert log == [("engine.weight_streaming_budget_v2", 500), ("create_execution_context", "USER_MANAGED"),
                   ("alloc", 3072)]  # no static per-context block: the shared arena, sized to the need
    assert arena.users == 1
    trt_none = types.SimpleNamespace(ExecutionContextAllocationStrategy=trt.ExecutionContextAllocationStrategy)
    with pytest.raises(QitrtError, match="execution context"):
        tm.open_context(trt_none, types.SimpleNamespace(create_execution_context=lambda s: None), arena, budget=None,
                        built_with=None, name="t")


def _entry(weight_streaming=False, **kw):
    return TensorRTEngine(**{"file": "x.plan", "bytes": 1, "tensorrt": "10.13.0.35", "gpu": "NVIDIA H100",
                             "compute_capability": "9.0", "cache_key": "k",
                             "profiles": {"latents": {"min": [1, 16, 1, 4, 4], "opt": [1, 16, 1, 8, 8],
                                                      "max": [2, 16, 1, 8, 8]}},
                             "builder": builder_settings("fp16", weight_streaming=weight_streaming), **kw})


def test_runner_is_cheap_to_make_and_refuses_early(tmp_path):
    r = tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", device="cpu", entry=_entry(), cuda_graphs=True)
    assert not r.is_active and r._profile["latents"][2] == (2, 16, 1, 8, 8)
    with pytest.raises(InputError, match="CUDA"):
        r.activate()
    with pytest.raises(InputError, match="built without weight streaming"):
        tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", entry=_entry(), weight_streaming_budget=0.5)
    tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", entry=_entry(True), weight_streaming_budget=0.5)
    with pytest.raises(InputError):
        tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", weight_streaming_budget=1.5)
    with pytest.raises(TypeError):
        tr.TensorRTRunner("vae_decoder", tmp_path / "x.plan", refittable=True)  # unknown options are not swallowed


def test_plan_is_deserialized_from_a_memory_map(tmp_path):
    seen = []
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda buf: seen.append((type(buf), bytes(buf[:4]))))
    path = tmp_path / "e.plan"
    path.write_bytes(b"PLAN" + bytes(100))
    assert tm.deserialize_plan(runtime, path) is None  # the stand-in deserializes nothing
    assert seen == [(mmap.mmap, b"PLAN")]  # a map of the file, not a bytes copy
    (tmp_path / "empty.plan").write_bytes(b"")
    with pytest.raises(EngineMismatchError, match="empty"):
        tm.deserialize_plan(runtime, tmp_path / "empty.plan")


def test_make_runner_builds_tensorrt_runner_without_importing_tensorrt(tmp_path):
    from qwen_image_trt.core.manifest import CheckpointRef, Component, GraphFile, Manifest, write_manifest
    from qwen_image_trt.runtime.backends import make_runner

    entry = _entry(file="transformer.fp16.trt10.13.0.35.sm90.0123456789ab.plan", profiles={})
    graph = GraphFile(file="onnx/transformer.onnx", sha256="0" * 64, bytes=1)
    component = Component(graph=graph, precision="fp16", source={}, inputs=[], outputs=[], dynamic_axes={},
                          tensorrt=entry)
    write_manifest(tmp_path, Manifest(stage="build", checkpoint=CheckpointRef(path="ckpt", identity="id", pipeline="p",
                                      transformer_config={}, vae_config={}), precision="fp16", opset=18,
                                      exporter="dynamo", versions={}, components={"transformer": component},
                                      target="tensorrt"))
    had = "tensorrt" in sys.modules
    r = make_runner("tensorrt", "transformer", engines_dir=tmp_path, device="cuda",
                    trt_options={"cuda_graphs": True, "max_output_buffers": 3})
    assert isinstance(r, tr.TensorRTRunner) and r.engine_path.name == entry.file and r.entry == entry
    assert r.graphs.enabled and r._outputs.max_entries == 3
    assert ("tensorrt" in sys.modules) == had


# -- one inference, recorded ---------------------------------------------------------------------------------------
class _Cuda:
    """Stands in for the runner's torch.cuda seam and records what it is asked."""

    def __init__(self, log, caller):
        self.log, self.caller = log, caller

    @contextlib.contextmanager
    def device(self, d):
        yield

    def current_stream(self, device):
        return self.caller

    @contextlib.contextmanager
    def stream(self, s):
        self.log.append(("torch.cuda.stream", s.name))
        yield

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", stream.name))


class _Context:
    """An IExecutionContext stand-in: records calls, reports shapes, and refuses to enqueue."""

    def __init__(self, log, need):
        self.log, self.need = log, need

    def set_input_shape(self, name, shape):
        self.log.append(("set_input_shape", name, tuple(shape)))
        return True

    def get_tensor_shape(self, name):
        return (2, 16, 64)

    def update_device_memory_size_for_shapes(self):
        self.log.append(("update_device_memory_size_for_shapes",))
        return self.need

    def set_device_memory(self, ptr, size):
        self.log.append(("set_device_memory", ptr, size))

    def set_tensor_address(self, name, ptr):
        self.log.append(("set_tensor_address", name))

    def execute_async_v3(self, handle):
        self.log.append(("execute_async_v3", handle))
        return False  # nothing runs here


def test_one_inference_orders_streams_arena_and_context(tmp_path):
    log = []
    caller, own = _Stream(log, "caller", handle=0), _Stream(log, "own", handle=0xBEEF)
    arena = _arena(log)
    arena.reserve(1000)  # sized at activation from the engine's upper bound
    with arena.use(_Stream(log, "other")):  # another engine ran in it before
        pass
    r = tr.TensorRTRunner("transformer", tmp_path / "t.plan", device="cpu")
    r._cuda, r.context, r.engine = _Cuda(log, caller), _Context(log, need=2000), types.SimpleNamespace()
    r.plan, r._arena, r.stream, r._graphs = tr.binding_plan(_Meta(), INPUT), arena, own, {}
    r._last_signature = r._memory_generation = None
    r.is_active = True
    feeds = {"hidden_states": torch.zeros(2, 16, 64), "encoder_hidden_states_mask": torch.ones(2, 8, dtype=torch.bool),
             "timestep": torch.zeros(2)}
    log.clear()
    with pytest.raises(RuntimeError, match="failed to enqueue"):
        r.infer(feeds)
    ptr = arena.ptr
    assert log == [
        ("own.wait_stream", "caller"),  # the caller's inputs are ready before our stream reads them
        *[("record_stream", "own")] * 3,
        ("own.wait_event",),  # the engine that used the arena before has finished
        ("set_input_shape", "hidden_states", (2, 16, 64)), ("set_input_shape", "encoder_hidden_states_mask", (2, 8)),
        ("set_input_shape", "timestep", (2,)),
        ("update_device_memory_size_for_shapes",),
        ("event.synchronize",), ("alloc", 2048),  # these shapes need more: the arena grows (a new generation)
        ("set_device_memory", ptr, 2048),
        *[("set_tensor_address", n) for n in ("hidden_states", "encoder_hidden_states_mask", "timestep", "noise_pred")],
        ("execute_async_v3", 0xBEEF),  # on the runner's own stream, never the legacy default stream (0)
        ("event.record", "own"),  # the next user of the arena waits for this
        ("caller.wait_stream", "own"),  # the caller's next kernels see the outputs (even when enqueue failed)
    ]
    assert arena.generation == r.graphs.generation == 2  # graphs captured before the move would have been dropped


def test_graphs_from_an_older_arena_are_not_replayed(tmp_path):
    """Another engine grew the shared arena since this runner captured: replaying would use freed memory."""
    log = []
    arena = _arena(log)
    arena.reserve(100)
    r = tr.TensorRTRunner("transformer", tmp_path / "t.plan", device="cpu", cuda_graphs=True)
    feeds = {"hidden_states": torch.zeros(2, 16, 64), "encoder_hidden_states_mask": torch.ones(2, 8, dtype=torch.bool),
             "timestep": torch.zeros(2)}
    plan = tr.binding_plan(_Meta(), INPUT)
    signature = tr.shape_signature(feeds, plan.input_names)
    r.graphs.sync_generation(arena.generation)
    r.graphs.decide(signature), r.graphs.decide(signature), r.graphs.captured_ok(signature)
    graph = types.SimpleNamespace(replay=lambda: log.append(("replay",)))
    r._graphs = {signature: tr._Graph(graph, {k: v.clone() for k, v in feeds.items()}, {})}
    arena.reserve(5000)  # another runner needed more
    r._cuda, r.context, r.engine = _Cuda(log, _Stream(log, "caller")), _Context(log, need=100), types.SimpleNamespace()
    r.plan, r._arena, r.stream = plan, arena, _Stream(log, "own", handle=1)
    r._last_signature = r._memory_generation = None
    r.is_active = True
    with pytest.raises(RuntimeError, match="failed to enqueue"):
        r.infer(feeds)
    assert ("replay",) not in log and r._graphs == {}  # dropped; this call ran eagerly (and warms up again)
    assert ("set_device_memory", arena.ptr, arena.size) in log  # rebound to the arena's new address


# -- the numbers the runner's memory rules use, pinned (mutation testing: docs/testing.md) --------------------------
import logging  # appended section: its own imports


def _refused(excinfo, field, value, allowed):
    e = excinfo.value
    assert (e.field, e.value, e.allowed) == (field, value, allowed)


def test_output_buffers_bounds_and_allocation():
    made = []
    bufs = tm.OutputBuffers(1, lambda shape, dtype: made.append((shape, dtype)) or torch.empty(shape, dtype=dtype))
    a = bufs.get("y", [1, 4], torch.float16)
    assert made == [((1, 4), torch.float16)] and a.dtype == torch.float16
    bufs.get("y", (2, 4), torch.float16)
    assert len(bufs) == 1 and bufs.get("y", (2, 4), torch.float16).shape == (2, 4) and len(made) == 2
    bufs.clear()
    assert len(bufs) == 0
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(InputError) as e:
            tm.OutputBuffers(bad, None)
        _refused(e, "max_output_buffers", bad, "an integer >= 1")


def test_a_new_arena_holds_nothing():
    arena = _arena([])
    assert (arena.ptr, arena.size, arena.generation, arena.users) == (0, 0, 0, 0)
    arena.detach()  # more detaches than attaches: never negative
    assert arena.users == 0 and arena.generation == 0  # nothing to free, no new generation


def test_torch_arena_allocates_bytes_on_its_device(monkeypatch):
    """The arena's buffer is `nbytes` of uint8 on cuda:<index>, and its events are CUDA events (CUDA stands in)."""
    calls = []
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: calls.append((a, kw)) or "buffer")
    arena = tm._torch_arena(3)
    assert arena._new_event is torch.cuda.Event and arena._allocate(4096) == "buffer"
    assert calls == [((4096,), {"dtype": torch.uint8, "device": "cuda:3"})]
    monkeypatch.delitem(tm._ARENAS, 5, raising=False)
    try:
        shared = tm.shared_arena(5)
        shared._allocate(8)
        assert calls[-1] == ((8,), {"dtype": torch.uint8, "device": "cuda:5"})
    finally:
        tm._ARENAS.pop(5, None)


def test_weight_streaming_budget_messages_and_bounds(caplog):
    allowed = "bytes of weights kept on the GPU (int >= 0), a fraction of the streamable weights in (0, 1], or 'auto'"
    for bad in (-2, 0.0, 1.5, "half", True, [1]):
        with pytest.raises(InputError) as e:
            tm.check_budget_value(bad)
        _refused(e, "weight_streaming_budget", bad, allowed)
        with pytest.raises(InputError) as e:  # checked before anything else, also when applied
            tm.apply_weight_streaming_budget(_StreamingEngine(), bad, True, "t")
        _refused(e, "weight_streaming_budget", bad, allowed)
    fix = "rebuild with `qitrt build ... --weight-streaming`, or run without a weight_streaming_budget"
    with pytest.raises(InputError) as e:
        tm.apply_weight_streaming_budget(_StreamingEngine(), 300, False, "vae")
    _refused(e, "weight_streaming_budget", 300, f"no budget: engine 'vae' was built without weight streaming; {fix}")
    none_streamable = _StreamingEngine()
    none_streamable.streamable_weights_size = 0
    with pytest.raises(InputError) as e:
        tm.apply_weight_streaming_budget(none_streamable, "auto", True, "tx")
    _refused(e, "weight_streaming_budget", "auto",
             f"no budget: engine 'tx' has no streamable weights (built without weight streaming?); {fix}")
    one = _StreamingEngine()
    one.streamable_weights_size = 1
    assert tm.apply_weight_streaming_budget(one, 5, True, "t") == 1  # one streamable byte is still streamable
    big = _StreamingEngine()
    big.streamable_weights_size = 3_000_000_000
    with caplog.at_level(logging.INFO, logger=tm.log.name):
        assert tm.apply_weight_streaming_budget(big, 0.5, None, "transformer") == 1_500_000_000
    assert [r.getMessage() for r in caplog.records] == [
        "tensorrt: transformer keeps 1.50 of 3.00 GB of weights on the GPU"]


def test_open_context_passes_what_the_manifest_says():
    trt = types.SimpleNamespace(ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="UM"))
    with pytest.raises(InputError, match="engine 'tx' was built without weight streaming"):
        tm.open_context(trt, _StreamingEngine(), _arena([]), budget=0.5, built_with=False, name="tx")


def test_plan_is_opened_read_only(tmp_path):
    modes = []
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda buf: modes.append(bytes(buf[:2])) or "engine")
    (tmp_path / "p.plan").write_bytes(b"\xff\xfe\x00plan")  # not text: a plan is read as bytes
    assert tm.deserialize_plan(runtime, tmp_path / "p.plan") == "engine" and modes == [b"\xff\xfe"]


def test_weight_streaming_log_is_in_gigabytes(caplog):
    engine = _StreamingEngine()
    engine.streamable_weights_size = 3_995_000_002
    with caplog.at_level(logging.INFO, logger=tm.log.name):
        assert tm.apply_weight_streaming_budget(engine, 1_995_000_001, True, "t") == 1_995_000_001
    assert caplog.records[0].getMessage() == "tensorrt: t keeps 2.00 of 4.00 GB of weights on the GPU"


# -- refit (run-time LoRA) ----------------------------------------------------------------------------------
class _Refitter:
    """Records what a refit is given; refuses names the 'engine' does not have, as TensorRT's Refitter does."""

    def __init__(self, engine, logger, known=("w.weight", "v.weight"), missing=()):
        self.engine, self.known, self.missing, self.given, self.refitted = engine, known, list(missing), {}, 0
        self.types = {}
        _Refitter.last = self

    def set_named_weights(self, name, weights):
        if name not in self.known:
            return False
        self.given[name] = weights.array.copy()
        self.types[name] = weights.type
        return True

    def get_missing_weights(self):
        return self.missing

    def refit_cuda_engine(self):
        self.refitted += 1
        return True


def _weights(*args):
    """tensorrt.Weights(array) or Weights(type, pointer, count): what the refit was given, readable back."""
    if len(args) == 1:
        return types.SimpleNamespace(array=args[0], type=None)
    kind, pointer, count = args
    return types.SimpleNamespace(array=_from_pointer(pointer, count, kind), type=kind)


def _from_pointer(pointer, count, kind):
    import ctypes

    import numpy as np

    width = {"BF16": 2, "FP8": 1}[kind]
    return np.frombuffer((ctypes.c_byte * (count * width)).from_address(pointer), dtype=np.uint8).copy()


def _fake_trt(**refitter_kw):
    return types.SimpleNamespace(Refitter=lambda e, lg: _Refitter(e, lg, **refitter_kw),
                                 Weights=_weights, DataType=types.SimpleNamespace(BF16="BF16", FP8="FP8"),
                                 Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}))


def _refit_runner(tmp_path, refittable=True, graph_path=None):
    entry = TensorRTEngine(file="t.plan", bytes=1, tensorrt="10.9.0", gpu="NVIDIA H100", compute_capability="9.0",
                           profiles={}, cache_key="k", builder=builder_settings("fp16", refittable=refittable))
    return tr.TensorRTRunner("transformer", tmp_path / "t.plan", entry=entry, graph_path=graph_path)


def test_refit_needs_an_engine_built_refittable(tmp_path):
    with pytest.raises(QitrtError, match="built without --refittable"):
        _refit_runner(tmp_path, refittable=False).set_weights({"w.weight": None})
    assert "refittable" not in builder_settings("fp16")  # old engines keep their cache keys


def test_refit_gives_every_named_weight_and_drops_captured_graphs(tmp_path, monkeypatch, tiny_engines):
    import numpy as np

    graph = tiny_engines / "transformer.onnx"
    runner = _refit_runner(tmp_path, graph_path=graph)
    runner.set_weights({"w.weight": np.ones((2, 2), np.float16)})  # not active yet: kept for activation
    assert set(runner._pending_weights) == {"w.weight"}

    name = next(n for n in __import__("onnx_ir").load(str(graph)).graph.initializers if n.endswith(".weight.T"))
    monkeypatch.setattr(tr, "require_tensorrt", lambda index=0: _fake_trt(known=("w.weight", name)))
    runner.engine, runner.is_active, runner._graphs = object(), True, {("shape",): "graph"}
    runner.stream = types.SimpleNamespace(synchronize=lambda: None)
    runner.set_weights({"w.weight": np.full((2, 2), 3, np.float16), name: None})  # None: the graph's own value
    rf = _Refitter.last
    assert rf.refitted == 1 and runner._graphs == {}
    assert rf.given["w.weight"].tolist() == [[3, 3], [3, 3]]
    want = np.asarray(__import__("onnx_ir").load(str(graph)).graph.initializers[name].const_value.numpy())
    assert np.array_equal(rf.given[name], want)

    import ml_dtypes

    bf16 = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=ml_dtypes.bfloat16)  # the real model's weights
    runner.set_weights({"w.weight": bf16})
    given = _Refitter.last.given["w.weight"]
    assert np.array_equal(given, bf16.view(np.uint8).ravel()) and _Refitter.last.types["w.weight"] == "BF16"

    with pytest.raises(QitrtError, match="refused new weights for 'nope'"):
        runner.set_weights({"nope": np.zeros(1, np.float16)})
    monkeypatch.setattr(tr, "require_tensorrt", lambda index=0: _fake_trt(missing=("fused.bias",)))
    with pytest.raises(QitrtError, match="also needs"):
        runner.set_weights({"w.weight": np.zeros((2, 2), np.float16)})
