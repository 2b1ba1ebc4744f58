"""Backends behind one Runner interface. Each backend is one module; heavy imports happen only when
a runner of that backend is made, so a missing TensorRT never breaks the CLI or the other backends."""

from __future__ import annotations

from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.core.shapes import torch_dtype
from qwen_image_trt.models.specs import SPECS, spec_for
from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner
from qwen_image_trt.runtime.backends.tensorrt_memory import check_budget_value
from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner
from qwen_image_trt.runtime.backends.torch_runner import TorchRunner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError("backend", backend, f"one of {', '.join(BACKENDS)}")
    return backend


def trt_options(weight_streaming_budget=None, cuda_graphs: bool = False) -> dict:
    """TensorRT runner options from command-line text: the weight-streaming budget as bytes ("2000000000"),
    a fraction of the streamable weights ("0.5") or "auto"; CUDA graphs per input shape on or off."""
    budget = weight_streaming_budget
    if isinstance(budget, str):
        text = budget.strip().lower()
        try:
            budget = text if text == "auto" else float(text) if "." in text or "e" in text else int(text)
        except ValueError:
            raise InputError("trt_weight_streaming_budget", weight_streaming_budget,
                             "bytes (e.g. 20000000000), a fraction in (0, 1] (e.g. 0.5) or auto") from None
    check_budget_value(budget)
    options = {"cuda_graphs": bool(cuda_graphs)}
    if budget is not None:
        options["weight_streaming_budget"] = budget
    return options


def make_runner(backend: str, component: str, *, engines_dir=None, checkpoint=None, device="cpu",
                providers=None, precision: str = "fp32", threads: int | None = None,
                trt_options: dict | None = None, loras=()) -> Runner:
    """A runner for one exported component (`transformer`, `vae_decoder`, `vae_encoder`).

    torch runs the export wrapper eagerly from the checkpoint (with `loras`, LoraSpec, merged into the transformer as
    the export merges them); the others read `engines_dir`'s manifest.
    `trt_options`: TensorRTRunner keyword options (cuda_graphs, weight_streaming_budget, ...).
    """
    check_backend(backend)
    if backend == "torch":
        from qwen_image_trt.models.checkpoint import read_config

        spec = spec_for(component, read_config(checkpoint, SPECS[component].part))

        def build():
            module = spec.build_module(Path(checkpoint), torch_dtype(precision))
            if loras and component == "transformer":
                from qwen_image_trt.models.lora import merge_into, read_loras

                merge_into(module.transformer, read_loras(checkpoint, loras))
            return module

        return TorchRunner(component, build, spec.input_names, spec.output_names, device=device)
    if engines_dir is None:
        raise InputError("engines", None, f"an engine folder (from `qitrt export`/`qitrt build`) for backend {backend}")
    manifest = read_manifest(engines_dir)
    if component not in manifest.components:
        raise InputError("engines", str(engines_dir), f"a folder holding a {component!r} graph; it has "
                         f"{sorted(manifest.components)}")
    entry = manifest.components[component]
    folder = Path(engines_dir)
    if backend == "onnxruntime":
        model = folder / entry.onnxruntime.file if entry.onnxruntime else entry.graph.path(folder)
        return OnnxRuntimeRunner(component, model, device=device, providers=providers, threads=threads)
    if entry.tensorrt is None:
        raise InputError("engines", str(engines_dir), f"a folder with a TensorRT engine for {component!r} "
                         "(`qitrt build --target tensorrt`); this one holds ONNX graphs only")
    return TensorRTRunner(component, folder / entry.tensorrt.file, device=device, entry=entry.tensorrt,
                          graph_path=entry.graph.path(folder), **(trt_options or {}))
