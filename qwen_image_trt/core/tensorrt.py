"""TensorRT facts shared by the engine builder (compile/) and the runner (runtime/): is TensorRT here, which
GPU is this, which engine may run here, and the cache key that says when an engine must be rebuilt.

Everything but `require_tensorrt` and `gpu_info` is a pure function, unit tested without TensorRT.
An engine's identity cannot go stale: its cache key hashes the graph, the external weight data (sha256 from
the manifest), precision, recipe, profiles, builder flags, TensorRT version and compute capability.
"""

from __future__ import annotations

import hashlib
import json
import logging

from qwen_image_trt.core.errors import EngineMismatchError, InputError, QitrtError
from qwen_image_trt.core.shapes import normalize_profile, profile_to_json

log = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10  # strongly typed networks, named I/O tensors, execute_async_v3, IProgressMonitor
INSTALL_HINT = ("install TensorRT >= 10 on a machine with an NVIDIA GPU (e.g. `pip install tensorrt-cu12` from "
                "NVIDIA's index), or build for ONNX Runtime instead (`qitrt build --target onnxruntime`)")


def require_tensorrt(device: int = 0):
    """Return the `tensorrt` module, or raise QitrtError when TensorRT >= 10 or a CUDA GPU is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a wheel whose shared libraries fail to load
        raise QitrtError(f"TensorRT is not available here ({type(e).__name__}: {e}): {INSTALL_HINT}") from None
    if trt_major(trt) < MIN_TENSORRT_MAJOR:
        raise QitrtError(f"TensorRT {trt.__version__} is too old: strongly typed engines need TensorRT >= "
                         f"{MIN_TENSORRT_MAJOR}; {INSTALL_HINT}")
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() <= device:
        raise QitrtError(f"TensorRT {trt.__version__} is installed but no CUDA GPU {device} is visible to torch "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); TensorRT engines are "
                         "built and run on an NVIDIA GPU")
    return trt


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability as "major.minor") of a CUDA device."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def normalize_cc(compute_capability) -> str:
    """(9, 0) | "9.0" | "sm90" | 9.0 -> "9.0"."""
    if isinstance(compute_capability, (tuple, list)):
        return f"{int(compute_capability[0])}.{int(compute_capability[1])}"
    text = str(compute_capability).lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return f"{int(major)}.{int(minor)}"
    if text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise InputError("compute_capability", compute_capability, 'e.g. "9.0", (9, 0) or "sm90"')


def builder_settings(precision: str, *, opt_level: int = 3, tf32: bool | None = None, weight_streaming: bool = False,
                     workspace_bytes: int | None = None, refittable: bool = False) -> dict:
    """The builder flags an engine depends on, checked and resolved: what the cache key hashes and the manifest
    records under `builder`. `tf32=None` clears TF32 for fp32 reference builds (they are meant to be exact)
    and allows it otherwise."""
    if isinstance(opt_level, bool) or not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
        raise InputError("opt_level", opt_level, "an integer in [0, 5] (TensorRT builder optimization level)")
    if tf32 is not None and not isinstance(tf32, bool):
        raise InputError("tf32", tf32, "True, False or None (None: off for fp32 builds, on otherwise)")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise InputError("workspace_bytes", workspace_bytes, "a positive number of bytes, or None (TensorRT's default)")
    settings = {"strongly_typed": True, "optimization_level": opt_level,
                "tf32": precision != "fp32" if tf32 is None else tf32,
                "weight_streaming": bool(weight_streaming), "workspace_bytes": workspace_bytes}
    if refittable:  # only when set: the cache keys of engines built before this option stay what they were
        settings["refittable"] = True
    return settings


def engine_cache_key(graph_sha: str, weights_sha: str | None, precision: str, recipe, profiles, trt_version: str,
                     compute_capability, builder: dict) -> str:
    """Hex key of everything an engine depends on; equal keys mean the same engine can be reused.

    `graph_sha` hashes the .onnx file, `weights_sha` its external data (hashed while it was written and read
    from the manifest, so a changed weight changes the key without re-reading 40 GB); `builder` is
    `builder_settings(...)`. The TensorRT version and compute capability are in because a plan runs only
    where both match.
    """
    payload = {
        "graph_sha256": graph_sha, "weights_sha256": weights_sha, "precision": precision, "recipe": recipe,
        "profiles": profile_to_json(normalize_profile(profiles)) if profiles else {},
        "tensorrt": str(trt_version), "compute_capability": normalize_cc(compute_capability),
        "builder": dict(sorted(builder.items())),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_engine_compatible(entry, trt_version: str, gpu_name: str, compute_capability, *,
                            strict_gpu: bool = False) -> None:
    """Raise EngineMismatchError when an engine built as `entry` (a manifest `TensorRTEngine`, or its dict)
    cannot run here.

    TensorRT plans are tied to the exact TensorRT version and to the GPU's compute capability. Another
    GPU model of the same compute capability runs the engine (its tactics were timed elsewhere): a
    warning, or an error with `strict_gpu`.
    """
    if hasattr(entry, "model_dump"):
        entry = entry.model_dump()
    name = entry.get("file") or entry.get("engine_file") or "engine"
    fix = "rebuild with `qitrt build ... --target tensorrt` on this machine"
    built_trt, built_cc = entry.get("tensorrt"), entry.get("compute_capability")
    if built_trt is None or built_cc is None:
        raise EngineMismatchError(f"{name}: the manifest entry does not say which TensorRT/GPU built it; {fix}")
    if str(built_trt) != str(trt_version):
        raise EngineMismatchError(f"{name} was built with TensorRT {built_trt}, this machine has TensorRT "
                                  f"{trt_version}: {fix}")
    if normalize_cc(built_cc) != normalize_cc(compute_capability):
        raise EngineMismatchError(f"{name} was built for compute capability {normalize_cc(built_cc)} "
                                  f"({entry.get('gpu')}), this GPU ({gpu_name}) is {normalize_cc(compute_capability)}: "
                                  f"{fix}")
    if entry.get("gpu") and gpu_name and entry["gpu"] != gpu_name:
        msg = (f"{name} was built on {entry['gpu']}, running on {gpu_name} (same compute capability "
               f"{normalize_cc(compute_capability)}): it runs, but tactics were timed on the other GPU")
        if strict_gpu:
            raise EngineMismatchError(f"{msg}; {fix}")
        log.warning(msg)


def trt_major(trt) -> int:
    """Major version of a `tensorrt` module (0 when it does not say)."""
    return _major(getattr(trt, "__version__", "0"))


__all__ = ["require_tensorrt", "gpu_info", "normalize_cc", "builder_settings", "engine_cache_key",
           "check_engine_compatible", "trt_major", "MIN_TENSORRT_MAJOR", "INSTALL_HINT"]
