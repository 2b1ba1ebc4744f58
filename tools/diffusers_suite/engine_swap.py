"""Diffusers' dummy components -> the same components with `transformer` and `vae` replaced by engine drop-ins.

The drop-ins are made the way a user makes them, so the suite tests that path and not a shortcut:
  1. the dummy transformer, VAE (and ControlNet) are saved as a checkpoint folder in the diffusers layout (with the
     dummy text encoder, tokenizer and scheduler, which the checkpoint checks require);
  2. `qitrt export`'s `export_onnx(..., precision="fp32")` traces, writes and checks the graphs (transformer,
     vae_decoder, vae_encoder; transformer_controlnet when a ControlNet is present);
  3. `load_pipeline(checkpoint, engines, backend="onnxruntime")` assembles an engine pipeline, whose `transformer`
     and `vae` (EngineTransformer / EngineVAE on ONNX Runtime sessions) go into the test's components.
Everything else in the components (text encoder, tokenizer, processor, scheduler, ControlNet) stays the test's own.

Steps 1-2 are cached by a fingerprint of the swapped modules' configs and weights plus the export code and tool
versions: the dummy components are seeded, so every call of one test class gives the same fingerprint and only the
first exports (~20-60 s on 2 cores). Step 3 runs per call: each test gets fresh drop-ins (their `.to(dtype)` or
slicing state never leaks into another test).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SWAPPED = ("transformer", "vae")


def cache_root() -> Path:
    return Path(os.environ.get("QITRT_SUITE_CACHE") or Path.home() / ".cache" / "qitrt" / "diffusers-suite")


def _code_fingerprint() -> str:
    """The project's own sources and the tools the export depends on: a change to either re-exports."""
    import importlib.metadata as md

    import qwen_image_trt

    h = hashlib.sha256()
    pkg = Path(qwen_image_trt.__file__).parent
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode())
        h.update(f.read_bytes())
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            h.update(f"{dist}={md.version(dist)}".encode())
        except md.PackageNotFoundError:
            pass
    return h.hexdigest()


_CODE = None


def fingerprint(modules: dict) -> str:
    """Configs and weights of the modules an engine is made from (transformer, VAE, ControlNet)."""
    global _CODE
    _CODE = _CODE or _code_fingerprint()
    h = hashlib.sha256(_CODE.encode())
    for name in sorted(modules):
        module = modules[name]
        h.update(name.encode())
        h.update(type(module).__name__.encode())
        h.update(json.dumps(dict(module.config), sort_keys=True, default=str).encode())
        for key, t in sorted(module.state_dict().items()):
            h.update(key.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def _write_checkpoint(components: dict, root: Path) -> None:
    """The dummy components as a QwenImagePipeline checkpoint folder (every member's weights run from it)."""
    import diffusers

    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "controlnet"):
        if components.get(part) is not None:
            components[part].save_pretrained(root / part)
    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(components["scheduler"]).__name__],
             "text_encoder": ["transformers", type(components["text_encoder"]).__name__],
             "tokenizer": ["transformers", "Qwen2Tokenizer"],
             "transformer": ["diffusers", type(components["transformer"]).__name__],
             "vae": ["diffusers", type(components["vae"]).__name__]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def engine_folder(components: dict) -> tuple[Path, Path]:
    """(checkpoint, engines) for these components, exported once and cached."""
    from qwen_image_trt.compile.export import export_onnx

    modules = {k: components[k] for k in ("transformer", "vae", "controlnet") if components.get(k) is not None}
    folder = cache_root() / fingerprint(modules)
    checkpoint, engines = folder / "checkpoint", folder / "engines"
    if (folder / "READY").is_file():
        return checkpoint, engines
    if folder.exists():  # an interrupted export: start over
        shutil.rmtree(folder)
    checkpoint.mkdir(parents=True)
    _write_checkpoint(components, checkpoint)
    export_onnx(checkpoint, engines, precision="fp32", progress=False)
    (folder / "READY").write_text("exported\n")
    return checkpoint, engines


def engine_dropins(components: dict):
    """(EngineTransformer, EngineVAE) for the components, from the engine pipeline load_pipeline assembles."""
    from qwen_image_trt.runtime.pipeline import load_pipeline

    checkpoint, engines = engine_folder(components)
    member = "controlnet" if components.get("controlnet") is not None else None
    threads = int(os.environ.get("QITRT_SUITE_THREADS", "0")) or None
    pipe = load_pipeline(checkpoint, engines=engines, backend="onnxruntime", pipeline=member, threads=threads,
                         text_encoder=False)
    return pipe.transformer, pipe.vae


def swap(components: dict) -> dict:
    """The components with transformer and VAE on engines (unchanged when the test left both out)."""
    if all(components.get(k) is None for k in SWAPPED):
        return components
    if any(components.get(k) is None for k in SWAPPED):
        raise ValueError("engine swap: the dummy components have one of transformer/vae but not the other")
    transformer, vae = engine_dropins(components)
    return {**components, "transformer": transformer, "vae": vae}
