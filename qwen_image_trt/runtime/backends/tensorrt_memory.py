"""Memory a TensorRT runner manages: the activation arena its execution contexts share, the bounded output
buffers, the weight-streaming budget, and the plan file read through a memory map.

Pure bookkeeping over objects passed in (allocators, events, engines), so every rule here is unit tested with
stand-ins; `runtime/backends/tensorrt_runner.py` wires it to torch CUDA and TensorRT.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError

log = logging.getLogger(__name__)


class OutputBuffers:
    """Output tensors by (name, shape, dtype), reused across calls; past `max_entries` the least recently
    used is dropped, so a long run over many shapes does not keep a buffer per shape forever."""

    def __init__(self, max_entries: int, allocate):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise InputError("max_output_buffers", max_entries, "an integer >= 1")
        self.max_entries, self._allocate = max_entries, allocate
        self._buffers: OrderedDict[tuple, object] = OrderedDict()

    def get(self, name: str, shape: tuple, dtype):
        key = (name, tuple(shape), dtype)
        if key in self._buffers:
            self._buffers.move_to_end(key)
        else:
            self._buffers[key] = self._allocate(tuple(shape), dtype)
            while len(self._buffers) > self.max_entries:
                self._buffers.popitem(last=False)
        return self._buffers[key]

    def __len__(self):
        return len(self._buffers)

    def clear(self):
        self._buffers.clear()


class DeviceArena:
    """Activation memory shared by the USER_MANAGED execution contexts of one device.

    One buffer, grown (never shrunk while used) to the largest size a context asked for. A context runs
    only inside `use(stream)`: the lock orders host threads and the stream first waits for the CUDA event
    recorded after the previous user's work, so two engines never run in the buffer at once. Growing
    moves the buffer and bumps `generation`; the old buffer is freed only after its last user finished.
    `allocate(nbytes)` returns an object with `data_ptr()`; `new_event()` one with record/synchronize.
    """

    ALIGN = 2 << 20

    def __init__(self, allocate, new_event, align: int = ALIGN):
        self._allocate, self._new_event, self.align = allocate, new_event, align
        self._lock = threading.RLock()
        self._buffer = None
        self._last_use = None
        self.size = 0
        self.generation = 0
        self.users = 0

    @property
    def ptr(self) -> int:
        return self._buffer.data_ptr() if self._buffer is not None else 0

    def reserve(self, nbytes: int) -> bool:
        """Make the buffer hold at least `nbytes`; True when it moved (a new generation)."""
        with self._lock:
            if nbytes <= self.size:
                return False
            size = -(-int(nbytes) // self.align) * self.align
            self._release()  # first: the old and the new buffer need not fit side by side
            self._buffer = self._allocate(size)
            self.size = size
            return True

    def _release(self) -> None:
        if self._last_use is not None:
            self._last_use.synchronize()  # work already enqueued may still run in the old buffer
        self._buffer, self.size = None, 0
        self.generation += 1

    @contextlib.contextmanager
    def use(self, stream):
        """Hold the arena for work enqueued on `stream` inside the block."""
        with self._lock:
            if self._last_use is not None:
                stream.wait_event(self._last_use)
            try:
                yield self
            finally:
                if self._last_use is None:
                    self._last_use = self._new_event()
                self._last_use.record(stream)

    def attach(self) -> None:
        with self._lock:
            self.users += 1

    def detach(self) -> None:
        with self._lock:
            self.users = max(0, self.users - 1)
            if self.users == 0 and self._buffer is not None:
                self._release()


_ARENAS: dict[int, DeviceArena] = {}
_ARENAS_LOCK = threading.Lock()


def _torch_arena(index: int) -> DeviceArena:
    import torch

    return DeviceArena(lambda n: torch.empty(n, dtype=torch.uint8, device=f"cuda:{index}"), torch.cuda.Event)


def shared_arena(index: int) -> DeviceArena:
    """The activation arena every TensorRT runner on CUDA device `index` shares."""
    with _ARENAS_LOCK:
        if index not in _ARENAS:
            _ARENAS[index] = _torch_arena(index)
        return _ARENAS[index]


def engine_memory_size(engine) -> int:
    """An execution context's activation memory upper bound over all shapes (TensorRT >= 10.1 names it _v2)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


# -- weight streaming -----------------------------------------------------------------------------------
def check_budget_value(budget) -> None:
    """`weight_streaming_budget`: bytes (int >= 0), a fraction of the streamable weights in (0, 1], "auto"
    (or -1: TensorRT picks), or None (leave the engine's default)."""
    ok = budget is None or budget == "auto" or (not isinstance(budget, bool) and (
        (isinstance(budget, int) and budget >= -1) or (isinstance(budget, float) and 0.0 < budget <= 1.0)))
    if not ok:
        raise InputError("weight_streaming_budget", budget, "bytes of weights kept on the GPU (int >= 0), a fraction "
                         "of the streamable weights in (0, 1], or 'auto'")


_WS_FIX = "rebuild with `qitrt build ... --weight-streaming`, or run without a weight_streaming_budget"


def refuse_budget(budget, name: str, why: str = "was built without weight streaming"):
    raise InputError("weight_streaming_budget", budget, f"no budget: engine {name!r} {why}; {_WS_FIX}")


def apply_weight_streaming_budget(engine, budget, built_with_streaming: bool | None, name: str) -> int | None:
    """Set `engine.weight_streaming_budget_v2` from the runner option; refuse engines built without weight
    streaming. Returns the bytes kept on the GPU (None: budget not set)."""
    check_budget_value(budget)
    if budget is None:
        return None
    if built_with_streaming is False:
        refuse_budget(budget, name)
    if not hasattr(engine, "weight_streaming_budget_v2"):
        raise QitrtError(f"this TensorRT has no weight_streaming_budget_v2 (TensorRT >= 10.1 is needed); {_WS_FIX}")
    streamable = int(engine.streamable_weights_size)
    if streamable <= 0:
        refuse_budget(budget, name, "has no streamable weights (built without weight streaming?)")
    if budget == "auto" or budget == -1:
        nbytes = int(engine.get_weight_streaming_automatic_budget())
    elif isinstance(budget, float):
        nbytes = int(budget * streamable)
    else:
        nbytes = min(int(budget), streamable)  # more than the weights: all stay on the GPU
    engine.weight_streaming_budget_v2 = nbytes
    log.info("tensorrt: %s keeps %.2f of %.2f GB of weights on the GPU", name, nbytes / 1e9, streamable / 1e9)
    return nbytes


def open_context(trt, engine, arena: DeviceArena, *, budget, built_with: bool | None, name: str):
    """An execution context that runs in `arena`: the weight-streaming budget first (it sets how much
    activation memory a context needs), then a USER_MANAGED context, then the arena grown to the engine's
    largest need, so it stops moving once every runner is active and captured CUDA graphs stay valid."""
    apply_weight_streaming_budget(engine, budget, built_with, name)
    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    if context is None:
        raise QitrtError(f"TensorRT could not create an execution context for {name}")
    arena.attach()
    arena.reserve(engine_memory_size(engine))
    return context


def deserialize_plan(runtime, path: Path):
    """Deserialize a plan file from a read-only memory map: no Python bytes copy of a multi-GB plan."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise EngineMismatchError(f"{path} is empty: rebuild it with `qitrt build --target tensorrt`")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as plan:
            return runtime.deserialize_cuda_engine(plan)


__all__ = ["DeviceArena", "OutputBuffers", "shared_arena", "engine_memory_size", "check_budget_value",
           "apply_weight_streaming_budget", "open_context", "deserialize_plan"]
