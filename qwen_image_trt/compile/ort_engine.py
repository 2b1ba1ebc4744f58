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

from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.files import file_sha256
from qwen_image_trt.core.manifest import OrtEngine
from qwen_image_trt.core.ort_options import session_options

log = logging.getLogger(__name__)

LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED"}
EXTERNAL_MIN_BYTES = 1024  # initializers from this size go to the .data file


def ort_file_name(component: str, precision: str, level: str) -> str:
    return f"{component}.{precision}.ort-{level}.onnx"


def build_ort_engine(onnx_path, out_dir, component: str, *, precision: str, providers=("CPUExecutionProvider",),
                     level: str = "basic", check: bool = True) -> OrtEngine:
    """Save `onnx_path` optimized by ONNX Runtime into `out_dir`; return what was written.

    Initializers go to an external data file (graphs of any size). With `check`, the saved model is loaded
    once in a fresh session before returning.
    """
    import onnxruntime as ort

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
    target = out / ort_file_name(component, precision, level)
    data_name = target.name + ".data"
    if target.resolve() == onnx_path.resolve():
        raise InputError("out_dir", str(out), "a folder where the optimized model does not overwrite its source")
    for stale in (target, out / data_name):
        stale.unlink(missing_ok=True)

    t0 = time.perf_counter()
    # Written for any CPU: without the non-VNNI kernel choice, which would store its uint8 weights in the file.
    opts = session_options(overrides=True)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.optimized_model_filepath = str(target)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                  str(EXTERNAL_MIN_BYTES))
    opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception as e:
        for stale in (target, out / data_name):
            stale.unlink(missing_ok=True)
        raise QitrtError(f"ONNX Runtime could not load {onnx_path} with {providers}: {e}") from e
    if not target.is_file():
        raise QitrtError(f"ONNX Runtime did not write the optimized model {target}")
    seconds = time.perf_counter() - t0

    if check:  # the saved model must load on its own (external data found, ops known)
        plain = session_options()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            ort.InferenceSession(str(target), sess_options=plain, providers=providers)
        except Exception as e:
            raise QitrtError(f"the optimized model {target} does not load again in ONNX Runtime: {e}") from e

    data = out / data_name
    log.info("onnxruntime: %s -> %s (%s, %.1fs)", onnx_path.name, target.name, level, seconds)
    return OrtEngine(file=target.name, sha256=file_sha256(target), external_data=data_name if data.is_file() else None,
                     level=level, providers=providers, onnxruntime=ort.__version__,
                     bytes=target.stat().st_size + (data.stat().st_size if data.is_file() else 0),
                     seconds=round(seconds, 3))


def ort_engine_intact(folder, engine: OrtEngine | None) -> bool:
    if engine is None:
        return False
    path = Path(folder) / engine.file
    return path.is_file() and file_sha256(path) == engine.sha256


__all__ = ["build_ort_engine", "ort_engine_intact", "ort_file_name", "LEVELS"]
