"""Stage 1: checkpoint -> ONNX (transformer, VAE decoder, VAE encoder) with a manifest.

Each graph is checked (onnx checker, shape inference) and run once in ONNX Runtime at a shape other
than the one it was traced at, against the eager module, before the stage counts as done. A component
whose source (checkpoint identity, precision, opset, exporter) and file are unchanged is skipped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qwen_image_trt.build.manifest import (MANIFEST, entry_files_intact, file_sha256, read_manifest, tool_versions,
                                           write_manifest)
from qwen_image_trt.errors import InputError
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.specs import SPECS, ExportSpec

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 19  # >= 19 so that FP8 Q/DQ graphs made from these run in ONNX Runtime
EXPORTER = "torch.onnx.export(dynamo=False)"  # fast, and the only path ModelOpt's quantized export takes
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # leave headroom under protobuf's 2 GB
EXPORT_FORMAT = "qwen-image-trt/onnx@1"


def export_onnx(checkpoint, out_dir, precision: str = "fp32", components=tuple(SPECS), opset: int = DEFAULT_OPSET,
                force: bool = False, progress: bool = True) -> dict:
    """Export `components` of `checkpoint` to `out_dir`; return the manifest (also written to out_dir)."""
    if precision not in PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(PRECISIONS)}")
    unknown = [c for c in components if c not in SPECS]
    if unknown:
        raise InputError("components", unknown, f"a subset of {', '.join(SPECS)}")
    root = ckpt.validate_checkpoint(checkpoint, parts=("transformer", "vae"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    identity = ckpt.checkpoint_identity(root)

    manifest = _load_or_new(out, root, identity, precision, opset)
    from tqdm.auto import tqdm

    for name in tqdm(components, desc="export", unit="graph", disable=not progress):
        spec = SPECS[name]
        source = {"checkpoint": identity, "precision": precision, "opset": opset, "exporter": EXPORTER}
        entry = manifest["components"].get(name)
        if not force and _up_to_date(out, entry, source):
            log.info("export: %s unchanged, skipped", name)
            continue
        manifest["components"][name] = _export_one(spec, root, out, precision, opset, source)
        write_manifest(out, manifest)  # after every graph: an interrupted export resumes where it stopped
    return manifest


def _load_or_new(out: Path, root: Path, identity: str, precision: str, opset: int) -> dict:
    fresh = {
        "format": EXPORT_FORMAT, "stage": "export",
        "checkpoint": {"path": str(root.resolve()), "identity": identity,
                       "pipeline": ckpt.read_config(root, "transformer") and _pipeline_class(root),
                       "transformer_config": ckpt.read_config(root, "transformer"),
                       "vae_config": ckpt.read_config(root, "vae")},
        "precision": precision, "opset": opset, "exporter": EXPORTER, "versions": tool_versions(),
        "components": {},
    }
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        same = (old.get("checkpoint", {}).get("identity") == identity and old.get("precision") == precision
                and old.get("opset") == opset)
        if same:
            old["versions"] = fresh["versions"]
            return old
        log.warning("export: %s held graphs of another checkpoint/precision/opset; replacing them", out)
    return fresh


def _pipeline_class(root: Path) -> str:
    import json

    return json.loads((root / "model_index.json").read_text())["_class_name"]


def _up_to_date(out: Path, entry: dict | None, source: dict) -> bool:
    return bool(entry) and entry.get("source") == source and entry_files_intact(out, entry)


def component_precision(component: str, precision: str, opset: int = DEFAULT_OPSET) -> str:
    """The precision a component is exported in. ONNX's Conv takes bfloat16 only from opset 22, and
    TensorRT has no bf16 Resize, so a bf16 build keeps the (small, convolutional) VAE in fp32."""
    if precision == "bf16" and component.startswith("vae") and opset < 22:
        return "fp32"
    return precision


def _export_one(spec: ExportSpec, root: Path, out: Path, precision: str, opset: int, source: dict) -> dict:
    import onnx

    t0 = time.perf_counter()
    precision = component_precision(spec.name, precision, opset)
    module = spec.build_module(root, PRECISIONS[precision])
    config = ckpt.read_config(root, spec.part)
    args = spec.sample_inputs(config)
    path = out / f"{spec.name}.onnx"
    data_name = f"{spec.name}.onnx.data"
    for stale in (path, out / data_name):
        stale.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # The exporter scatters large initializers into one file per tensor; gather them into one data file.
        raw = Path(tmp) / path.name
        with torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        model = onnx.load(str(raw), load_external_data=True)
        large = model.ByteSize() > PROTOBUF_LIMIT
        onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        del model
    export_s = time.perf_counter() - t0

    onnx.checker.check_model(str(path), full_check=False)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        onnx.shape_inference.infer_shapes_path(str(path), str(Path(tmp) / "inferred.onnx"), strict_mode=True)
    ort_check = _run_in_onnxruntime(spec, module, config, path, precision)
    del module

    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        "file": path.name,
        "precision": precision,
        "external_data": data_name if (out / data_name).exists() else None,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size + ((out / data_name).stat().st_size if (out / data_name).exists() else 0),
        "source": source,
        "inputs": [_io(v) for v in graph.input],
        "outputs": [_io(v) for v in graph.output],
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
        "export_seconds": round(export_s, 3),
        "ort_check": ort_check,
    }


def _io(value_info) -> dict:
    import onnx

    t = value_info.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {"name": value_info.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}


def _run_in_onnxruntime(spec: ExportSpec, module, config: dict, path: Path, precision: str = "fp32") -> dict:
    """Run the graph once at a shape other than the traced one and compare with the eager module."""
    import onnxruntime as ort

    shape = spec.test_shapes[-1] if spec.test_shapes else {}
    args = spec.sample_inputs(config, **shape, seed=1)
    provider = ("CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers()
                else "CPUExecutionProvider")
    try:
        sess = ort.InferenceSession(str(path), providers=[provider])
    except Exception as e:  # noqa: BLE001 - narrowed just below
        if precision != "bf16" or provider != "CPUExecutionProvider" or "NOT_IMPLEMENTED" not in str(e):
            raise
        # ONNX Runtime's CPU provider has no bf16 MatMul/Conv; the graph was still checked and
        # shape-inferred. Say so in the manifest instead of pretending it ran.
        detail = str(e).split("NOT_IMPLEMENTED : ")[-1].splitlines()[0]
        reason = f"not run: ONNX Runtime {ort.__version__} CPU has no bf16 kernels ({detail})"
        log.warning("export: %s %s; run `qitrt parity` on a CUDA machine", path.name, reason)
        return {"skipped": reason, "provider": provider, "max_abs_err_vs_eager": None}
    feeds = {n: a.numpy() for n, a in zip(spec.input_names, args)}
    got = sess.run(None, feeds)[0]
    with torch.no_grad():
        want = module(*args).float().numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"{path.name}: ONNX Runtime output shape {got.shape} != eager {want.shape} at {shape}")
    if not np.isfinite(got).all():
        raise RuntimeError(f"{path.name}: ONNX Runtime output has non-finite values at {shape}")
    err = float(np.abs(got - want).max())
    return {"shape": {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
            "max_abs_err_vs_eager": err, "provider": provider}


def exported_file(engines_dir, component: str) -> Path:
    """Path of an exported component, read from the manifest (later stages never guess file names)."""
    manifest = read_manifest(engines_dir)
    entry = manifest.get("components", {}).get(component)
    if not entry:
        raise FileNotFoundError(f"{engines_dir} has no {component!r} graph; it holds {sorted(manifest['components'])}")
    return Path(engines_dir) / entry["file"]


__all__ = ["export_onnx", "exported_file", "PRECISIONS", "DEFAULT_OPSET"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
