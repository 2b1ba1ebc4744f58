"""ONNX -> ONNX Runtime optimized model, with its manifest entry: the engine target CI builds and runs.

ONNX Runtime applies its graph optimizations once, offline, and saves the result next to the source
(`SessionOptions.optimized_model_filepath`). Only the portable levels are offered: "basic" (constant
folding, redundant node removal; runs on every execution provider) and "extended" (adds fusions into
com.microsoft ops that the CPU and CUDA providers run). "all" adds layout changes tied to the provider
and machine it was made on, so a saved "all" model is not portable and is not offered here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qwen_image_trt.build.manifest import file_sha256
from qwen_image_trt.build.tensorrt_engine import PRECISIONS, _relative_or_absolute, source_entry_for
from qwen_image_trt.errors import InputError, QitrtError

log = logging.getLogger(__name__)

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
ORT_FORMAT = "qwen-image-trt/onnxruntime@1"
EXTERNAL_MIN_BYTES = 1024  # initializers from this size go to the .data file when the source had one
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2


def ort_file_name(component: str, precision: str, level: str) -> str:
    return f"{component}.{precision}.ort-{level}.onnx"


def build_ort_engine(onnx_path, out_dir, component: str, *, precision: str, source_manifest=None,
                     providers=("CPUExecutionProvider",), level: str = "basic", limits: dict | None = None,
                     check: bool = True) -> dict:
    """Save `onnx_path` optimized by ONNX Runtime into `out_dir`; return its manifest entry.

    The entry has `ort_file` (read by the onnxruntime backend), `file` (the source graph), the source's
    sha256, precision, provider, level and `limits` (None: ONNX graphs have no hard shape bounds).
    With `check`, the saved model is loaded once in a fresh session before the entry is returned.
    """
    import onnxruntime as ort

    if precision not in PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(PRECISIONS)}")
    if level not in LEVELS:
        raise InputError("level", level, f"one of {', '.join(LEVELS)} (portable ONNX Runtime optimization levels)")
    providers = list(providers)
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise InputError("providers", providers, f"execution providers installed here: {', '.join(available)}")
    onnx_path, out = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise InputError("onnx_path", str(onnx_path), "an existing .onnx file")
    out.mkdir(parents=True, exist_ok=True)
    onnx_sha = file_sha256(onnx_path)
    source_entry = source_entry_for(source_manifest, component, onnx_path, onnx_sha) or {}

    target = out / ort_file_name(component, precision, level)
    data_name = target.name + ".data"
    if target.resolve() == onnx_path.resolve():
        raise InputError("out_dir", str(out), "a folder where the optimized model does not overwrite its source")
    for stale in (target, out / data_name):
        stale.unlink(missing_ok=True)

    t0 = time.perf_counter()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.optimized_model_filepath = str(target)
    external = _has_external_data(onnx_path) or _data_bytes(onnx_path) > PROTOBUF_LIMIT
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_MIN_BYTES))
    try:
        ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as e:
        raise QitrtError(f"ONNX Runtime could not load {onnx_path} with {providers}: {e}") from e
    if not target.is_file():
        raise QitrtError(f"ONNX Runtime did not write the optimized model {target}")
    seconds = time.perf_counter() - t0

    if check:  # the saved model must load on its own (external data found, ops known)
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            ort.InferenceSession(str(target), sess_options=plain, providers=providers)
        except Exception as e:
            raise QitrtError(f"the optimized model {target} does not load again in ONNX Runtime: {e}") from e

    size = target.stat().st_size + ((out / data_name).stat().st_size if (out / data_name).is_file() else 0)
    entry = {
        "format": ORT_FORMAT,
        "file": _relative_or_absolute(onnx_path, out),
        "ort_file": target.name,
        "ort_external_data": data_name if (out / data_name).is_file() else None,
        "ort_sha256": file_sha256(target),
        "source_sha256": onnx_sha,
        "precision": precision,
        "provider": providers[0],
        "providers": providers,
        "optimization_level": level,
        "onnxruntime": ort.__version__,
        "limits": limits,
        "bytes": size,
        "build_seconds": round(seconds, 3),
    }
    for key in ("inputs", "outputs", "dynamic_axes", "external_data"):
        if key in source_entry:
            entry[key] = source_entry[key]
    log.info("onnxruntime: %s -> %s (%s, %.1fs)", onnx_path.name, target.name, level, seconds)
    return entry


def _has_external_data(path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def _data_bytes(path: Path) -> int:
    return path.stat().st_size


__all__ = ["build_ort_engine", "ort_file_name", "LEVELS"]
