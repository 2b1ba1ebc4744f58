"""Per-component timers around a pipeline's text encoder, transformer and VAE decode, and a peak-memory probe.

`ComponentTimer(pipe)` wraps the three calls on the instance (nothing in the pipeline changes) with
perf_counter, synchronizing CUDA before and after each call when the pipeline runs on a GPU, so a
component's time includes its kernels and not the next one's. It also records the shapes the transformer
saw (batch, image tokens, text tokens as the graph ran them), which the FLOP model needs.
"""

from __future__ import annotations

import statistics
import threading
import time
from contextlib import contextmanager

COMPONENTS = ("text_encoder", "transformer", "vae_decode")


def _sync_fn(device):
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


class ComponentTimer:
    """Context manager; `calls[component]` holds the seconds of every call made while it was active."""

    def __init__(self, pipe, device="cpu"):
        self.pipe = pipe
        self.sync = _sync_fn(device)
        self.calls: dict[str, list[float]] = {c: [] for c in COMPONENTS}
        self.transformer_shapes: list[tuple[int, int, int]] = []  # (batch, image tokens, text tokens)
        self._undo = []

    def reset(self) -> None:
        for c in COMPONENTS:
            self.calls[c].clear()
        self.transformer_shapes.clear()

    def _timed(self, name, fn, on_call=None):
        def wrapper(*args, **kwargs):
            if on_call is not None:
                on_call(args, kwargs)
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.calls[name].append(time.perf_counter() - t0)
            return out

        return wrapper

    def _record_shapes(self, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        if hidden is None or text is None:
            return
        text_len = text.shape[1]
        pad = getattr(self.pipe.transformer, "padded_text_len", None)  # engine drop-ins pad text to a bucket
        if callable(pad):
            text_len = pad(text_len)
        self.transformer_shapes.append((int(hidden.shape[0]), int(hidden.shape[1]), int(text_len)))

    def _patch(self, obj, attr, wrapper):
        had_own = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, wrapper)
        self._undo.append((obj, attr, had_own, old))

    def __enter__(self):
        p = self.pipe
        self._patch(p.text_encoder, "forward", self._timed("text_encoder", p.text_encoder.forward))
        self._patch(p.transformer, "forward", self._timed("transformer", p.transformer.forward, self._record_shapes))
        self._patch(p.vae, "decode", self._timed("vae_decode", p.vae.decode))
        return self

    def __exit__(self, *exc):
        for obj, attr, had_own, old in reversed(self._undo):
            if had_own:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._undo.clear()

    def totals(self) -> dict[str, float]:
        return {c: sum(v) for c, v in self.calls.items()}


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


class PeakMemory:
    """Peak memory while active: GPU memory in use (NVML when present, else torch's allocator peak) on CUDA,
    the process's resident set size (sampled every `interval` s, psutil) otherwise."""

    def __init__(self, device="cpu", interval: float = 0.01):
        self.device = str(device)
        self.interval = interval
        self.peak_bytes: int | None = None
        self.kind = "gpu" if self.device.startswith("cuda") else "rss"
        self.source = None
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.kind == "gpu":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            sample = self._nvml_sampler()
            self.source = "nvml device used" if sample else "torch.cuda.max_memory_allocated"
        else:
            sample = self._rss_sampler()
            self.source = "process RSS (psutil)" if sample else None
        if sample:
            self.peak_bytes = sample()
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, args=(sample,), daemon=True)
            self._thread.start()
        return self

    def _loop(self, sample):
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes or 0, sample())

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.kind == "gpu":
            import torch

            allocated = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = max(self.peak_bytes or 0, allocated)

    @staticmethod
    def _rss_sampler():
        try:
            import psutil
        except ImportError:
            return None
        proc = psutil.Process()
        return lambda: proc.memory_info().rss

    def _nvml_sampler(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            import torch

            index = torch.device(self.device).index or 0
            # NVML counts physical GPUs; torch's index is relative to CUDA_VISIBLE_DEVICES. Match by UUID.
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # noqa: BLE001 (NVML absent or not permitted: fall back to torch's allocator)
            return None


@contextmanager
def stopwatch(device="cpu"):
    """`with stopwatch() as t: ...; t()` -> seconds, synchronized on CUDA."""
    sync = _sync_fn(device)
    sync()
    t0 = time.perf_counter()
    box = {}
    try:
        yield lambda: box.get("s", time.perf_counter() - t0)
    finally:
        sync()
        box["s"] = time.perf_counter() - t0
