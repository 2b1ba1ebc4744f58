"""`qitrt serve --batching-profile`: the limits `qitrt bench batching` measured (bench/batching.py writes the file),
read and checked against what this server serves before anything starts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import parse_size

if TYPE_CHECKING:
    from qwen_image_trt.serve.config import ServerConfig

BATCHING_PROFILE_FORMAT = "qwen-image-trt/batching-profile@1"
MAX_PROFILE_BATCH = 1024
MAX_PROFILE_DELAY_MS = 60_000.0


@dataclass(frozen=True)
class BatchingLimits:
    """What a batching profile sets for the served backend. `buckets`: (width, height, cfg, max_batch), smallest
    images first. `warnings`: what was let through but may not fit (another CPU or GPU model), shown in /health."""

    path: str
    backend: str
    max_queue_delay_ms: float
    buckets: tuple[tuple[int, int, bool, int], ...]
    warnings: tuple[str, ...] = ()

    def max_batch(self, width: int, height: int, cfg: bool) -> tuple[int | None, bool]:
        """(limit, measured) for a request size. The bucket of that size; else, as batching gains shrink as images
        grow, the smallest bucket with at least as many pixels (a conservative bound: measured=True); else, for an
        image bigger than every bucket, the biggest bucket's limit (measured=False: the server also caps it at its
        default); (None, False) when the profile has no bucket of this CFG mode (the default applies)."""
        same = [b for b in self.buckets if b[2] == cfg]
        exact = [b[3] for b in same if (b[0], b[1]) == (width, height)]
        if exact:
            return exact[0], True
        if not same:
            return None, False
        pixels = width * height
        larger = [b for b in same if b[0] * b[1] >= pixels]
        if larger:
            least = min(b[0] * b[1] for b in larger)
            return min(b[3] for b in larger if b[0] * b[1] == least), True
        most = max(b[0] * b[1] for b in same)
        return min(b[3] for b in same if b[0] * b[1] == most), False


def _engines_identity(manifest) -> str:
    """As qwen_image_trt/bench/batching.py's engines_identity (bench may not import serve; a test holds them equal)."""
    import hashlib

    parts = {"precision": manifest.precision, "checkpoint": manifest.checkpoint.identity, "components": {
        name: [c.graph.sha256, c.graph.external_data_sha256, c.onnxruntime.sha256 if c.onnxruntime else None,
               c.tensorrt.cache_key if c.tensorrt else None] for name, c in sorted(manifest.components.items())}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _read_profile(path: str) -> dict:

    made = "a file written by `qitrt bench batching`"
    if not Path(path).is_file():
        raise InputError("batching_profile", path, f"an existing {made}")
    try:
        data = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError("batching_profile", path, f"{made} (this one is not JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != BATCHING_PROFILE_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError("format", got, f"{BATCHING_PROFILE_FORMAT} ({made} of this version; re-run it) in {path}")
    if data.get("complete") is not True:
        raise InputError("complete", data.get("complete"), f"true: a profile from a run that finished ({path} was "
                         "interrupted or is still being written; re-run `qitrt bench batching`)")
    return data


def _profile_buckets(entry, where: str) -> tuple[float, tuple]:
    """(queue delay ms, buckets) of one backend's entry, every value range-checked."""
    if not isinstance(entry, dict):
        raise InputError(where, type(entry).__name__, "an object with max_queue_delay_ms and buckets")
    delay = entry.get("max_queue_delay_ms")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= MAX_PROFILE_DELAY_MS:
        raise InputError(f"{where}.max_queue_delay_ms", delay, f"a number of milliseconds in [0, "
                         f"{MAX_PROFILE_DELAY_MS:g}]")
    buckets = entry.get("buckets")
    if not isinstance(buckets, list) or not buckets:
        raise InputError(f"{where}.buckets", buckets, "a non-empty list of {size, cfg, max_batch}")
    out = []
    for i, b in enumerate(buckets):
        at = f"{where}.buckets[{i}]"
        if not isinstance(b, dict):
            raise InputError(at, type(b).__name__, "an object {size, cfg, max_batch}")
        try:
            w, h = parse_size(b.get("size"), f"{at}.size")
        except InputError:
            raise InputError(f"{at}.size", b.get("size"), "'WIDTHxHEIGHT', each side a positive multiple of 16") \
                from None
        if w < 16 or h < 16 or w % 16 or h % 16:
            raise InputError(f"{at}.size", b.get("size"), "'WIDTHxHEIGHT', each side a positive multiple of 16")
        if not isinstance(b.get("cfg"), bool):
            raise InputError(f"{at}.cfg", b.get("cfg"), "true or false (CFG on or off)")
        n = b.get("max_batch")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PROFILE_BATCH:
            raise InputError(f"{at}.max_batch", n, f"an integer in [1, {MAX_PROFILE_BATCH}] (images per call)")
        out.append((w, h, b["cfg"], n))
    return float(delay), tuple(sorted(out, key=lambda x: (x[0] * x[1], x)))


def _local_gpu_names(devices: list[str]) -> list[str] | None:
    """GPU model names of the served cuda devices through NVML (no CUDA context in the server process); None when
    NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        order = [int(x) for x in visible.split(",")] if visible and all(
            x.strip().isdigit() for x in visible.split(",")) else None
        names = []
        for d in devices:
            i = int(d.split(":")[1]) if ":" in d else 0
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(order[i] if order else i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        return names
    except Exception:  # noqa: BLE001 - NVML absent or not permitted: the model goes unchecked (logged)
        return None


def load_batching_profile(cfg: ServerConfig) -> BatchingLimits:
    """Read `cfg.batching_profile` and check it belongs to what is served, before any worker starts.

    Refused (InputError naming the field): a missing or non-JSON file, another format, an unfinished run, a value out
    of range; a profile without the served backend, or measured on another checkpoint (identity), another engine
    folder (identity of its graphs and engines), or another device kind (cpu vs cuda). Let through with a warning
    (logged and in /health): another CPU model or core count, another GPU model (TensorRT engines cannot differ:
    their identity pins the GPU they were built for)."""
    import logging
    import platform

    from qwen_image_trt.core.manifest import read_manifest
    from qwen_image_trt.models import checkpoint as ckpt

    path = cfg.batching_profile
    data = _read_profile(path)
    backends = data.get("backends")
    if not isinstance(backends, dict) or not backends:
        raise InputError("backends", backends, f"a non-empty object of measured backends in {path}")
    backend = cfg.resolved_backend
    if backend not in backends:
        raise InputError("backend", backend, f"a backend {path} measured: {', '.join(sorted(backends))} (or measure "
                         f"{backend} with `qitrt bench batching --backend {backend}`)")
    delay, buckets = _profile_buckets(backends[backend], f"backends.{backend}")
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    kind = machine.get("device_kind")
    if kind not in ("cpu", "cuda"):
        raise InputError("machine.device_kind", kind, f"cpu or cuda (the device the profile was measured on, {path})")
    served = {"cuda" if d.startswith("cuda") else "cpu" for d in cfg.device_list()}
    if served != {kind}:
        raise InputError("devices", cfg.devices, f"{kind} devices: {path} was measured on {machine.get('device_name')} "
                         f"({kind}); measure these devices with `qitrt bench batching --device ...`")

    root = ckpt.validate_checkpoint(cfg.checkpoint)
    ckpt.refuse_21(root, "the batching profile")
    theirs = (data.get("checkpoint") or {}).get("identity") if isinstance(data.get("checkpoint"), dict) else None
    ours = ckpt.checkpoint_identity(root)
    if theirs != ours:
        raise InputError("checkpoint", cfg.checkpoint, f"the checkpoint {path} was measured on (identity {theirs}, "
                         f"{(data.get('checkpoint') or {}).get('path')}); this one is {ours}: run `qitrt bench "
                         "batching` on it")
    if backend != "torch":
        eng = data.get("engines") if isinstance(data.get("engines"), dict) else {}
        if not cfg.engines:
            raise InputError("engines", None, f"the engine folder {path} was measured with ({eng.get('path')}, "
                             f"identity {eng.get('identity')})")
        ours = _engines_identity(read_manifest(cfg.engines))
        if eng.get("identity") != ours:
            raise InputError("engines", cfg.engines, f"the engine folder {path} was measured with "
                             f"({eng.get('path')}, identity {eng.get('identity')}); this one is {ours}: rebuilt or "
                             "another precision, so run `qitrt bench batching` on it")

    warnings = []
    if kind == "cpu":
        here = (platform.processor() or platform.machine() or "cpu", os.cpu_count())
        there = (machine.get("device_name"), machine.get("cpu_count"))
        if here != there:
            warnings.append(f"{path} was measured on a {there[0]} CPU with {there[1]} cores; this machine is a "
                            f"{here[0]} with {here[1]}: its limits may not fit here")
        measured = (data.get("config") if isinstance(data.get("config"), dict) else {}).get("threads") or there[1]
        if measured != (cfg.cpu_threads() or os.cpu_count()):
            warnings.append(f"{path} was measured with {measured} CPU threads per process; each worker here gets "
                            f"{cfg.cpu_threads() or os.cpu_count()} (`qitrt bench batching --threads`, "
                            "--threads-per-worker)")
    else:
        names = _local_gpu_names(cfg.device_list())
        if names is None:
            logging.getLogger(__name__).info("batching profile: GPU model not checked (pynvml unavailable)")
        elif any(n != machine.get("device_name") for n in names):
            warnings.append(f"{path} was measured on {machine.get('device_name')}; these devices are "
                            f"{', '.join(sorted(set(names)))}: its limits may not fit here")
    for w in warnings:
        logging.getLogger(__name__).warning("batching profile: %s", w)
    return BatchingLimits(str(path), backend, delay, buckets, tuple(warnings))
