"""Backends behind one Runner interface. Each backend is one module; heavy imports happen only when
a runner of that backend is made, so a missing TensorRT never breaks the CLI or the other backends."""

from __future__ import annotations

from pathlib import Path

from qwen_image_trt.errors import InputError
from qwen_image_trt.runtime.backends.base import Runner

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise InputError("backend", backend, f"one of {', '.join(BACKENDS)}")
    return backend


def make_runner(backend: str, component: str, *, engines_dir=None, checkpoint=None, device="cpu",
                providers=None, precision: str = "fp32", threads: int | None = None) -> Runner:
    """A runner for one exported component (`transformer`, `vae_decoder`, `vae_encoder`).

    torch runs the export wrapper eagerly from the checkpoint; the others read `engines_dir`'s manifest.
    """
    check_backend(backend)
    if backend == "torch":
        from qwen_image_trt.build.export import PRECISIONS
        from qwen_image_trt.models.specs import SPECS
        from qwen_image_trt.runtime.backends.torch_runner import TorchRunner

        spec = SPECS[component]
        return TorchRunner(component, lambda: spec.build_module(Path(checkpoint), PRECISIONS[precision]),
                           spec.input_names, spec.output_names, device=device)
    if engines_dir is None:
        raise InputError("engines", None, f"an engine folder (from `qitrt export`/`qitrt build`) for backend {backend}")
    from qwen_image_trt.build.manifest import read_manifest

    manifest = read_manifest(engines_dir)
    entry = manifest.get("components", {}).get(component)
    if entry is None:
        raise InputError("engines", str(engines_dir), f"a folder holding a {component!r} graph; it has "
                         f"{sorted(manifest.get('components', {}))}")
    if backend == "onnxruntime":
        from qwen_image_trt.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(component, Path(engines_dir) / entry.get("ort_file", entry["file"]),
                                 device=device, providers=providers, threads=threads)
    from qwen_image_trt.runtime.backends.tensorrt_runner import TensorRTRunner

    return TensorRTRunner(component, Path(engines_dir) / entry["engine_file"], device=device, manifest=manifest)
