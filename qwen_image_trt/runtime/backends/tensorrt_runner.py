"""TensorRT runner: a deserialized engine behind the Runner interface (torch CUDA tensors in and out).

Inputs are bound by name to the callers' torch tensors (no copies), outputs go to buffers this runner
allocates once per shape and reuses; `execute_async_v3` runs on torch's current CUDA stream, so the
engine orders with the surrounding torch work without synchronizing. Optionally one CUDA graph is
captured per static input-shape signature and replayed afterwards (`CudaGraphPolicy` decides when).

The binding plan (input/output names, output shapes, dtypes) is made by pure functions over the
engine/context objects, unit tested with a stand-in engine; running needs TensorRT and a GPU.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_image_trt.core.errors import EngineMismatchError, InputError
from qwen_image_trt.runtime.backends.base import Runner

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


class CudaGraphPolicy:
    """Decides, per shape signature, whether a call runs eagerly, captures a CUDA graph, or replays one.

    TensorRT must run once at a new shape before capture (it finishes shape-dependent setup lazily), so:
    the first `warmup` calls of a signature run eagerly, the next one captures, later ones replay. At
    most `max_graphs` graphs are kept; the least recently used is dropped ("evict").
    """

    EAGER, CAPTURE, REPLAY = "eager", "capture", "replay"

    def __init__(self, enabled: bool = True, warmup: int = 1, max_graphs: int = 4):
        if warmup < 1:
            raise InputError("cuda_graph_warmup", warmup, "an integer >= 1 (TensorRT runs once before capture)")
        self.enabled, self.warmup, self.max_graphs = enabled, warmup, max(1, max_graphs)
        self.seen: dict[tuple, int] = {}
        self.captured: OrderedDict[tuple, None] = OrderedDict()

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


@dataclass
class _Graph:
    graph: object
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class TensorRTRunner(Runner):
    backend = "tensorrt"

    def __init__(self, name: str, engine_path, device="cuda", manifest: dict | None = None, *,
                 cuda_graphs: bool = False, max_graphs: int = 4, copy_outputs: bool = True,
                 strict_gpu: bool = False, weight_streaming_budget: int | None = None):
        """`copy_outputs`: return fresh tensors (default). With False, outputs are this runner's reused
        buffers, valid until the next `infer` of the same shapes (e.g. the stock diffusers pipeline calls the
        transformer twice per step for CFG, so it needs copies)."""
        super().__init__(name, device)
        self.engine_path = Path(engine_path)
        self.manifest = manifest
        self.copy_outputs = copy_outputs
        self.strict_gpu = strict_gpu
        self.weight_streaming_budget = weight_streaming_budget
        self.graphs = CudaGraphPolicy(enabled=cuda_graphs, max_graphs=max_graphs)
        self.engine = self.context = self.plan = None
        self._entry = ((manifest or {}).get("components") or {}).get(name) or {}
        self._profile = _profile_from_entry(self._entry)

    # -- lifecycle ------------------------------------------------------------------------------------
    def _activate_impl(self):
        from qwen_image_trt.core.tensorrt import check_engine_compatible, gpu_info, require_tensorrt

        if self.device.type != "cuda":
            raise InputError("device", str(self.device), "a CUDA device: TensorRT engines run on NVIDIA GPUs")
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        trt = require_tensorrt(index)
        if self._entry:
            gpu_name, cc = gpu_info(index)
            check_engine_compatible(self._entry, trt.__version__, gpu_name, cc, strict_gpu=self.strict_gpu)
        if not self.engine_path.is_file():
            raise EngineMismatchError(f"{self.engine_path} does not exist: build it with `qitrt build --target tensorrt`")
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(index):
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise EngineMismatchError(f"TensorRT {trt.__version__} could not deserialize {self.engine_path} "
                                          "(built by another TensorRT version or for another GPU?): rebuild with "
                                          "`qitrt build --target tensorrt`")
            if self.weight_streaming_budget is not None and hasattr(self.engine, "weight_streaming_budget_v2"):
                self.engine.weight_streaming_budget_v2 = int(self.weight_streaming_budget)
            self.context = self.engine.create_execution_context()
        self.plan = binding_plan(self.engine, trt.TensorIOMode.INPUT)
        self._specs = {t.name: t for t in self.plan.inputs}
        self._last_signature = None
        self._out_buffers: dict[tuple, torch.Tensor] = {}
        self._bound_outputs: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple, _Graph] = {}

    def _deactivate_impl(self):
        self._graphs = {}
        self._out_buffers = {}
        self._bound_outputs = {}
        self.context = self.engine = self._runtime = None

    def _input_metadata_impl(self):
        symbolic = {i["name"]: i.get("shape") for i in self._entry.get("inputs", [])}
        meta = {}
        for spec in self.plan.inputs:
            names = symbolic.get(spec.name) or []
            shape = [d if d >= 0 else (str(names[k]) if k < len(names) else f"dim{k}") for k, d in enumerate(spec.shape)]
            meta[spec.name] = (str(spec.dtype).removeprefix("torch."), shape)
        return meta

    # -- inference ------------------------------------------------------------------------------------
    def _prepare(self, feeds) -> dict[str, torch.Tensor]:
        from qwen_image_trt.core.shapes import check_shape_in_profile

        ready = {}
        for spec in self.plan.inputs:
            t = feeds[spec.name]
            check_feed(spec, t)
            check_shape_in_profile(spec.name, t.shape, self._profile)
            if t.device != self.device or t.dtype != spec.dtype or not t.is_contiguous():
                t = t.to(device=self.device, dtype=spec.dtype).contiguous()
            ready[spec.name] = t
        return ready

    def _set_shapes(self, feeds, signature):
        if signature == self._last_signature:
            return
        for name, shape in signature:
            if not self.context.set_input_shape(name, shape):
                raise InputError(name, list(shape), "a shape inside the engine's optimization profile")
        shapes = output_shapes(self.context, self.plan)
        self._bound_outputs = {}
        for spec in self.plan.outputs:
            key = (spec.name, shapes[spec.name])
            if key not in self._out_buffers:
                self._out_buffers[key] = torch.empty(shapes[spec.name], dtype=spec.dtype, device=self.device)
            self._bound_outputs[spec.name] = self._out_buffers[key]
        self._last_signature = signature

    def _bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, t in inputs.items():
            self.context.set_tensor_address(name, t.data_ptr())
        for name, t in outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())

    def _execute(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.engine_path.name} failed to enqueue (see the TensorRT log)")

    def _infer_impl(self, feeds):
        with torch.cuda.device(self.device):
            inputs = self._prepare(feeds)
            signature = shape_signature(inputs, self.plan.input_names)
            stream = torch.cuda.current_stream(self.device)
            action = self.graphs.decide(signature)
            if action == CudaGraphPolicy.REPLAY:
                g = self._graphs[signature]
                for name, t in inputs.items():
                    g.inputs[name].copy_(t)
                g.graph.replay()
                outs = g.outputs
            else:
                self._set_shapes(inputs, signature)
                if action == CudaGraphPolicy.CAPTURE:
                    outs = self._capture(signature, inputs, stream)
                else:
                    self._bind(inputs, self._bound_outputs)
                    self._execute(stream)
                    outs = self._bound_outputs
            return {n: (t.clone() if self.copy_outputs else t) for n, t in outs.items()}

    def _capture(self, signature, inputs, stream) -> dict[str, torch.Tensor]:
        # The graph reads fixed addresses: give it its own input copies and output buffers.
        static_in = {n: t.clone() for n, t in inputs.items()}
        static_out = {n: torch.empty_like(t) for n, t in self._bound_outputs.items()}
        self._bind(static_in, static_out)
        # One eager run at these shapes and addresses right before capture: TensorRT finishes shape-dependent
        # setup lazily on the first enqueue, which must not land inside the graph. It also gives this call's result.
        self._execute(stream)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side):
                self._execute(side)
        except Exception as e:  # some engines cannot be captured; keep running eagerly
            log.warning("tensorrt: CUDA graph capture failed for %s (%s); running without graphs", self.name, e)
            self.graphs.capture_failed(signature)
            stream.wait_stream(side)
            self._last_signature = None
            return static_out  # the eager run above already computed this call
        stream.wait_stream(side)  # capture records only; static_out holds the eager run's result
        self._graphs[signature] = _Graph(graph, static_in, static_out)
        for old in self.graphs.captured_ok(signature):
            self._graphs.pop(old, None)
        self._last_signature = None  # addresses now point at the graph's buffers: rebind on the next eager call
        return static_out


def _profile_from_entry(entry: dict):
    from qwen_image_trt.core.shapes import profile_from_json

    try:
        return profile_from_json(entry.get("profiles") or {})
    except (KeyError, TypeError, AttributeError):
        return {}


__all__ = ["TensorRTRunner", "CudaGraphPolicy", "binding_plan", "output_shapes", "torch_dtype", "shape_signature",
           "BindingPlan", "TensorSpec", "check_feed"]
