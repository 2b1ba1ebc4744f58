"""TensorRT runner: a deserialized engine behind the Runner interface (torch CUDA tensors in and out).

- The plan file is deserialized from a memory map (no second copy of a multi-GB plan in Python bytes).
- Each runner enqueues on its own CUDA stream, never the legacy default stream; that stream waits for the
  caller's current torch stream before running, and the caller's stream waits for it afterwards, so the
  engine orders with the surrounding torch work without a host synchronization.
- Activation memory is not one static block per context: contexts are created USER_MANAGED and run in a
  per-device `DeviceArena` shared by every runner of that device, sized to the largest need. A CUDA event
  orders its users, so two engines never use it at once. When the arena grows its address changes: its
  `generation` then changes too, and CUDA graphs captured at an older generation are dropped.
- Optionally one CUDA graph per static input-shape signature (`CudaGraphPolicy`), outputs in a bounded LRU
  of buffers (`OutputBuffers`), and a weight-streaming budget for engines built with weight streaming.

Binding plan, arena sizing and generations, output LRU, graph policy, weight-streaming budget and the call
order of one inference are unit tested with stand-ins; running an engine needs TensorRT and a GPU.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.manifest import TensorRTEngine
from qwen_image_trt.core.shapes import check_shape_in_profile, profile_from_json
from qwen_image_trt.core.tensorrt import check_engine_compatible, gpu_info, require_tensorrt
from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.backends.tensorrt_memory import (
    OutputBuffers,
    _torch_arena,
    check_budget_value,
    deserialize_plan,
    engine_memory_size,
    open_context,
    refuse_budget,
    shared_arena,
)

log = logging.getLogger(__name__)

# TensorRT DataType member name -> torch dtype (FP8/INT4/FP4 never cross an engine's I/O in this project).
TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
                "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
                "FP8": getattr(torch, "float8_e4m3fn", None)}


def torch_dtype(trt_dtype) -> torch.dtype:
    """tensorrt.DataType (or its name) -> torch dtype."""
    name = trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    dtype = TRT_TO_TORCH.get(name)
    if dtype is None:
        raise TypeError(f"TensorRT dtype {name} has no torch equivalent for engine I/O")
    return dtype


# -- binding plan (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple  # engine shape, -1 for dynamic dims


@dataclass(frozen=True)
class BindingPlan:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def binding_plan(engine, input_mode) -> BindingPlan:
    """Split an ICudaEngine's I/O tensors into inputs and outputs (`input_mode` = trt.TensorIOMode.INPUT)."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        spec = TensorSpec(name, torch_dtype(engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)))
        (inputs if engine.get_tensor_mode(name) == input_mode else outputs).append(spec)
    return BindingPlan(tuple(inputs), tuple(outputs))


def output_shapes(context, plan: BindingPlan) -> dict[str, tuple]:
    """Output shapes once all input shapes are set on the IExecutionContext."""
    shapes = {}
    for spec in plan.outputs:
        shape = tuple(int(d) for d in context.get_tensor_shape(spec.name))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT could not infer the shape of output {spec.name!r} ({list(shape)}): "
                               "an input shape is unset or outside the engine's profile")
        shapes[spec.name] = shape
    return shapes


def shape_signature(feeds: dict[str, torch.Tensor], names) -> tuple:
    """The static input-shape signature a CUDA graph is captured for."""
    return tuple((n, tuple(feeds[n].shape)) for n in names)


def check_feed(spec: TensorSpec, tensor: torch.Tensor) -> None:
    """Rank and static dims of a feed must match the engine's input."""
    if tensor.dim() != len(spec.shape) or any(e >= 0 and e != d for e, d in zip(spec.shape, tensor.shape)):
        raise InputError(spec.name, list(tensor.shape), f"a tensor of shape {list(spec.shape)} (-1: any size "
                         "within the engine's profile)")


# -- CUDA graphs, output buffers, shared activation memory (pure logic, injected allocators) -------------
class CudaGraphPolicy:
    """Decides, per shape signature, whether a call runs eagerly, captures a CUDA graph, or replays one.

    TensorRT must run once at a new shape before capture (it finishes shape-dependent setup lazily), so:
    the first `warmup` calls of a signature run eagerly, the next one captures, later ones replay. At
    most `max_graphs` graphs are kept; the least recently used is dropped. A graph holds the activation
    arena's address: when the arena's generation changes, every graph is forgotten (`sync_generation`).
    """

    EAGER, CAPTURE, REPLAY = "eager", "capture", "replay"

    def __init__(self, enabled: bool = True, warmup: int = 1, max_graphs: int = 4):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise InputError("cuda_graph_warmup", warmup, "an integer >= 1 (TensorRT runs once before capture)")
        self.enabled, self.warmup, self.max_graphs = enabled, warmup, max(1, max_graphs)
        self.seen: dict[tuple, int] = {}
        self.captured: OrderedDict[tuple, None] = OrderedDict()
        self.generation = None

    def sync_generation(self, generation: int) -> bool:
        """Forget all graphs when the arena moved since they were captured; True if any were dropped."""
        if generation == self.generation:
            return False
        self.generation = generation
        dropped = bool(self.captured)
        self.captured.clear()
        self.seen.clear()
        return dropped

    def decide(self, signature: tuple) -> str:
        if not self.enabled:
            return self.EAGER
        if signature in self.captured:
            self.captured.move_to_end(signature)
            return self.REPLAY
        count = self.seen.get(signature, 0)
        self.seen[signature] = count + 1
        return self.CAPTURE if count >= self.warmup else self.EAGER

    def captured_ok(self, signature: tuple) -> list[tuple]:
        """Record a capture; return the signatures evicted to stay within max_graphs."""
        self.captured[signature] = None
        self.captured.move_to_end(signature)
        evicted = []
        while len(self.captured) > self.max_graphs:
            old, _ = self.captured.popitem(last=False)
            self.seen.pop(old, None)
            evicted.append(old)
        return evicted

    def capture_failed(self, signature: tuple) -> None:
        """Capture did not work (e.g. the engine syncs internally): never try graphs again."""
        self.enabled = False


class _TorchCuda:
    """The torch.cuda calls the runner makes, in one place, so a test can record their order without a GPU."""

    device = staticmethod(torch.cuda.device)
    current_stream = staticmethod(torch.cuda.current_stream)
    stream = staticmethod(torch.cuda.stream)
    Stream = staticmethod(torch.cuda.Stream)
    CUDAGraph = staticmethod(torch.cuda.CUDAGraph)
    graph = staticmethod(torch.cuda.graph)

    @staticmethod
    def record_stream(tensor, stream):
        if tensor.is_cuda:  # the caching allocator must not reuse a caller's tensor before our stream is done
            tensor.record_stream(stream)


@dataclass
class _Graph:
    graph: object
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def trt_weights(trt, array):
    """tensorrt.Weights over a numpy array; bf16 and float8 arrays (ml_dtypes, which TensorRT's numpy bridge does
    not know) by pointer with their TensorRT type."""
    kind = {"bfloat16": "BF16", "float8_e4m3fn": "FP8"}.get(array.dtype.name)
    if kind is None:
        return trt.Weights(array)
    return trt.Weights(getattr(trt.DataType, kind), array.ctypes.data, array.size)


# -- the runner -------------------------------------------------------------------------------------------
class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, name: str, engine_path, device="cuda", entry: TensorRTEngine | None = None, *,
                 cuda_graphs: bool = False, max_graphs: int = 4, cuda_graph_warmup: int = 1,
                 max_output_buffers: int = 8, copy_outputs: bool = True, strict_gpu: bool = False,
                 weight_streaming_budget=None, share_memory: bool = True, graph_path=None):
        """`entry`: the engine's manifest entry (compatibility and profile checks). `copy_outputs`: return
        fresh tensors (default); with False, outputs are reused buffers, valid until the next `infer` of the
        same shapes. `share_memory`: run in the device's shared activation arena (else a private one).
        `graph_path`: the ONNX graph the engine was built from (its initializer names are the refittable weights'
        names, and its values are what `set_weights(None)` restores)."""
        super().__init__(name, device)
        check_budget_value(weight_streaming_budget)
        built_with = None if entry is None else bool(entry.builder.get("weight_streaming"))
        if weight_streaming_budget is not None and built_with is False:
            refuse_budget(weight_streaming_budget, name)  # before any work
        self.engine_path = Path(engine_path)
        self.entry = entry
        self.copy_outputs, self.strict_gpu, self.share_memory = copy_outputs, strict_gpu, share_memory
        self.weight_streaming_budget = weight_streaming_budget
        self.graphs = CudaGraphPolicy(enabled=cuda_graphs, warmup=cuda_graph_warmup, max_graphs=max_graphs)
        self.max_output_buffers = max_output_buffers
        self._outputs = OutputBuffers(max_output_buffers, self._new_output)
        self._profile = profile_from_json(entry.profiles) if entry is not None else {}
        self._cuda = _TorchCuda
        self.engine = self.context = self.plan = self.stream = self._arena = None
        self.graph_path = Path(graph_path) if graph_path is not None else None
        self._pending_weights: dict = {}  # set before activation: refitted when the engine is loaded

    # -- weights (refit) ------------------------------------------------------------------------------
    @property
    def weights_source(self) -> Path:
        if self.graph_path is None:
            raise NotImplementedError(f"tensorrt runner {self.name!r}: no source ONNX graph given, so its weights "
                                      "cannot be named")
        return self.graph_path

    def set_weights(self, values: dict) -> None:
        """Refit named weights (None: the source graph's value) of an engine built with --refittable."""
        if self.entry is None or not self.entry.builder.get("refittable"):
            raise QitrtError(f"tensorrt runner {self.name!r}: {self.engine_path.name} was built without --refittable, "
                             "so its weights cannot change at run time: rebuild it with `qitrt build --target "
                             "tensorrt --refittable`, or merge the LoRA at build with --lora")
        if not self.is_active:
            self._pending_weights.update(values)
            return
        self._refit(values)

    def _refit(self, values: dict) -> None:
        import numpy as np

        trt = require_tensorrt(self.device.index or 0)
        refitter = trt.Refitter(self.engine, trt.Logger(trt.Logger.WARNING))
        keep = []  # trt.Weights points into these arrays until the refit has run
        for name, value in values.items():
            array = np.ascontiguousarray(self._graph_value(name) if value is None else value)
            keep.append(array)
            if not refitter.set_named_weights(name, trt_weights(trt, array)):
                raise QitrtError(f"TensorRT refused new weights for {name!r} in {self.engine_path.name} (not a "
                                 "refittable weight of this engine, or another shape or dtype)")
        missing = list(refitter.get_missing_weights())
        if missing:
            raise QitrtError(f"refit of {self.engine_path.name} also needs {missing[:5]} (weights TensorRT fused "
                             "with the changed ones): rebuild without that fusion or merge at build with --lora")
        self.stream.synchronize()  # no launch in flight reads the weights being replaced
        if not refitter.refit_cuda_engine():
            raise QitrtError(f"TensorRT could not refit {self.engine_path.name}")
        self._graphs = {}  # CUDA graphs captured before the refit replay launches made for the old weights

    def _graph_value(self, name: str):
        from qwen_image_trt.runtime.graph_weights import GraphLinears

        graph = self.__dict__.get("_source_graph")
        if graph is None:  # the structure once; each tensor is read from the data file only when asked
            graph = self._source_graph = GraphLinears(self.weights_source)
        try:
            return graph.read(name)
        except KeyError:
            raise QitrtError(f"{self.weights_source.name} has no initializer {name!r} to restore") from None

    def _new_output(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _activate_impl(self):
        if self.device.type != "cuda":
            raise InputError("device", str(self.device), "a CUDA device: TensorRT engines run on NVIDIA GPUs")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        trt = require_tensorrt(index)
        self.device = torch.device("cuda", index)  # pinned: outputs, stream and arena all live on this GPU
        if self.entry is not None:
            gpu_name, cc = gpu_info(index)
            check_engine_compatible(self.entry, trt.__version__, gpu_name, cc, strict_gpu=self.strict_gpu)
        if not self.engine_path.is_file():
            raise EngineMismatchError(f"{self.engine_path} does not exist: build it with `qitrt build --target tensorrt`")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with self._cuda.device(index):
            engine = deserialize_plan(runtime, self.engine_path)
            if engine is None:
                raise EngineMismatchError(f"TensorRT {trt.__version__} could not deserialize {self.engine_path} "
                                          "(built by another TensorRT version or for another GPU?): rebuild with "
                                          "`qitrt build --target tensorrt`")
            built_with = None if self.entry is None else bool(self.entry.builder.get("weight_streaming"))
            arena = shared_arena(index) if self.share_memory else _torch_arena(index)
            context = open_context(trt, engine, arena, budget=self.weight_streaming_budget, built_with=built_with,
                                   name=self.name)
            self.stream = self._cuda.Stream(index)
        self._runtime, self.engine, self.context, self._arena = runtime, engine, context, arena
        self.plan = binding_plan(engine, trt.TensorIOMode.INPUT)
        self._last_signature = self._memory_generation = None
        self._graphs: dict[tuple, _Graph] = {}
        if self._pending_weights:  # set_weights before the engine was loaded
            pending, self._pending_weights = self._pending_weights, {}
            self._refit(pending)

    def _deactivate_impl(self):
        if self.stream is not None:
            self.stream.synchronize()  # in-flight work still reads the buffers dropped below
        self._graphs = {}
        self._outputs.clear()
        if self._arena is not None:
            self._arena.detach()
        self.context = self.engine = self._runtime = self._arena = self.stream = None

    def _input_metadata_impl(self):
        return {s.name: (str(s.dtype).removeprefix("torch."), [d if d >= 0 else f"dim{k}" for k, d in enumerate(s.shape)])
                for s in self.plan.inputs}

    # -- inference ------------------------------------------------------------------------------------
    def _prepare(self, feeds) -> dict[str, torch.Tensor]:
        ready = {}
        for spec in self.plan.inputs:
            t = feeds[spec.name]
            check_feed(spec, t)
            check_shape_in_profile(spec.name, t.shape, self._profile)
            if t.device != self.device or t.dtype != spec.dtype or not t.is_contiguous():
                t = t.to(device=self.device, dtype=spec.dtype).contiguous()
            ready[spec.name] = t
        return ready

    def _infer_impl(self, feeds):
        with self._cuda.device(self.device):
            inputs = self._prepare(feeds)  # on the caller's stream
            signature = shape_signature(inputs, self.plan.input_names)
            caller = self._cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # the inputs the caller wrote are ready
            for t in inputs.values():
                self._cuda.record_stream(t, self.stream)
            try:
                with self._arena.use(self.stream) as arena:
                    outs = self._run(inputs, signature, arena)
            finally:
                caller.wait_stream(self.stream)  # the caller's next kernels see the outputs
            return {n: (t.clone() if self.copy_outputs else t) for n, t in outs.items()}

    def _run(self, inputs, signature, arena) -> dict[str, torch.Tensor]:
        if self.graphs.sync_generation(arena.generation):
            self._graphs.clear()  # they hold the arena's old address
        action = self.graphs.decide(signature)
        if action == CudaGraphPolicy.REPLAY:
            g = self._graphs[signature]
            with self._cuda.stream(self.stream):
                for name, t in inputs.items():
                    g.inputs[name].copy_(t)
                g.graph.replay()
            return g.outputs
        outputs = self._set_shapes(signature)
        self._bind_memory(arena)
        if action == CudaGraphPolicy.CAPTURE:
            return self._capture(signature, inputs, outputs)
        self._bind(inputs, outputs)
        self._execute()
        return outputs

    def _set_shapes(self, signature) -> dict[str, torch.Tensor]:
        if signature != self._last_signature:
            for name, shape in signature:
                if not self.context.set_input_shape(name, shape):
                    raise InputError(name, list(shape), "a shape inside the engine's optimization profile")
            self._last_signature = signature
        shapes = output_shapes(self.context, self.plan)
        return {s.name: self._outputs.get(s.name, shapes[s.name], s.dtype) for s in self.plan.outputs}

    def _bind_memory(self, arena) -> None:
        """Give the context the arena, grown first if these shapes need more than it holds."""
        update = getattr(self.context, "update_device_memory_size_for_shapes", None)
        need = int(update()) if update is not None else engine_memory_size(self.engine)
        if arena.reserve(need) and self.graphs.sync_generation(arena.generation):
            self._graphs.clear()
        if self._memory_generation != arena.generation:
            if hasattr(self.context, "set_device_memory"):
                self.context.set_device_memory(arena.ptr, arena.size)
            else:  # TensorRT 10.0
                self.context.device_memory = arena.ptr
            self._memory_generation = arena.generation

    def _bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, t in (*inputs.items(), *outputs.items()):
            self.context.set_tensor_address(name, t.data_ptr())

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.engine_path.name} failed to enqueue (see the TensorRT log)")

    def _capture(self, signature, inputs, outputs) -> dict[str, torch.Tensor]:
        # The graph reads fixed addresses: give it its own input copies and output buffers.
        with self._cuda.stream(self.stream):
            static_in = {n: t.clone() for n, t in inputs.items()}
            static_out = {n: torch.empty_like(t) for n, t in outputs.items()}
        self._bind(static_in, static_out)
        # One eager run at these shapes and addresses right before capture: TensorRT finishes shape-dependent
        # setup lazily on the first enqueue, which must not land inside the graph. It also gives this call's result.
        self._execute()
        graph = self._cuda.CUDAGraph()
        try:
            with self._cuda.graph(graph, stream=self.stream):
                self._execute()
        except Exception as e:  # some engines cannot be captured; keep running eagerly
            log.warning("tensorrt: CUDA graph capture failed for %s (%s); running without graphs", self.name, e)
            self.graphs.capture_failed(signature)
            return static_out  # the eager run above already computed this call
        self._graphs[signature] = _Graph(graph, static_in, static_out)
        for old in self.graphs.captured_ok(signature):
            self._graphs.pop(old, None)
        return static_out


__all__ = ["TensorRTRunner", "CudaGraphPolicy", "binding_plan", "output_shapes", "torch_dtype", "shape_signature",
           "BindingPlan", "TensorSpec", "check_feed"]
