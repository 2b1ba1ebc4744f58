"""Stage 1: checkpoint -> ONNX (transformer, VAE decoder, VAE encoder) with a manifest.

Graphs of any size: traced with the dynamo exporter and written with streamed external data
(`onnx_io`), so the host needs the module's weights once plus a tensor at a time, never a serialized
proto of the whole model. Each graph is checked from its path (ONNX checker, strict shape inference) and
run once in ONNX Runtime at a shape other than the traced one, against the eager module, before the stage
counts as done; the eager reference runs first and the module is freed before ONNX Runtime loads the
graph, so the two never hold the weights at once. A component whose source (checkpoint identity,
precision, opset, exporter) and files are unchanged is skipped.

Precision: "auto" (the default) exports in the checkpoint's own dtype (bf16 for a real Qwen-Image);
fp32 is for reference builds and the tiny model.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import numpy as np
import torch

from qwen_image_trt.compile import onnx_io
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.identity import tool_versions
from qwen_image_trt.core.manifest import (
    CheckpointRef,
    Component,
    Manifest,
    read_manifest,
    try_read_manifest,
    write_manifest,
)
from qwen_image_trt.core.resources import PeakRSS, free_disk_bytes
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.lora import read_loras
from qwen_image_trt.models.sampling import SamplingRecipe, load_recipe
from qwen_image_trt.models.controlnet import controlnet_blocks, find_controlnet
from qwen_image_trt.models.specs import SPECS, ExportSpec, components_for, default_components, spec_for

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_OPSET = 19  # >= 19 so that FP8 Q/DQ graphs made from these run in ONNX Runtime
EXPORTER = "torch.onnx.export(dynamo=True)+streamed-external-data"
DISK_HEADROOM = 1.05  # graph protos, alignment padding


def resolve_precision(checkpoint, precision: str) -> str:
    """"auto" -> the transformer weights' own dtype when ONNX can hold it (bf16 for real Qwen-Image)."""
    if precision == "auto":
        own = ckpt.weights_info(checkpoint, "transformer").precision
        return own if own in PRECISIONS else "fp32"
    if precision not in PRECISIONS:
        raise InputError("precision", precision, f"auto or one of {', '.join(PRECISIONS)}")
    return precision


def component_precision(component: str, precision: str, opset: int = DEFAULT_OPSET) -> str:
    """The precision a component is exported in. ONNX's Conv takes bfloat16 only from opset 22, and
    TensorRT has no bf16 Resize, so a bf16 build keeps the (small, convolutional) VAE in fp32."""
    if precision == "bf16" and component.startswith("vae") and opset < 22:
        return "fp32"
    return precision


def export_bytes(checkpoint, precision: str, components) -> int:
    """Disk the export's graphs will take: each part's parameters at the precision it is exported in."""
    total = 0
    for name in components:
        part = SPECS[name].part
        info = ckpt.weights_info(checkpoint, part)
        width = PRECISIONS[component_precision(name, precision)].itemsize
        total += info.parameters * width
    return int(total * DISK_HEADROOM)


def export_onnx(checkpoint, out_dir, precision: str = "auto", components=None, opset: int = DEFAULT_OPSET,
                force: bool = False, progress: bool = True, loras=(), sampling=None, controlnet=None) -> Manifest:
    """Export `components` of `checkpoint` to `out_dir`; return the manifest (also written to out_dir).

    `loras`: LoraSpec (or "PATH[:SCALE]" strings) merged into the transformer's weights before it is traced; each
    adapter's file hash and scale go into the transformer's source, so another adapter or scale re-exports it.
    `sampling`: a SamplingRecipe (or a recipe name / file) the engines are made for, recorded in the manifest (a
    few-step LoRA's scheduler and step count); it changes no graph.
    `controlnet`: a QwenImageControlNetModel folder (default: the checkpoint's controlnet/ when it has one); with
    one, `transformer_controlnet` (the transformer taking its residuals) is exported too, by default."""
    root = ckpt.validate_checkpoint(checkpoint, parts=("transformer", "vae"))
    qwen21 = ckpt.is_qwen21(root)
    if qwen21:
        _check_21_options(root, loras, controlnet)
    net = None if qwen21 else find_controlnet(root, controlnet)
    if components is None:
        components = default_components(qwen21) + (("transformer_controlnet",) if net else ())
    components = tuple(components)
    allowed = components_for(qwen21)
    unknown = [c for c in components if c not in allowed]
    if unknown:
        raise InputError("components", unknown, f"a subset of {', '.join(allowed)} for a "
                         f"{ckpt.pipeline_class(root)} checkpoint")
    if "transformer_controlnet" in components and net is None:
        raise InputError("controlnet", None, "a QwenImageControlNetModel folder to export transformer_controlnet "
                         "for (--controlnet, or a checkpoint with a controlnet/ subfolder)")
    blocks = controlnet_blocks(net) if net is not None else None
    precision = resolve_precision(root, precision)
    merged = read_loras(root, loras)  # every adapter read and checked before anything is written
    recipe = sampling if sampling is None or isinstance(sampling, SamplingRecipe) else load_recipe(sampling)
    if recipe is None and qwen21:
        recipe = shipped_sigmas_recipe(root)  # a 2.1-Turbo checkpoint's own few-step grid
    out = _writable_folder(out_dir)
    identity = ckpt.checkpoint_identity(root)
    manifest = _load_or_new(out, root, identity, precision, opset)
    manifest.loras = [adapter.record(scale) for adapter, scale in merged] or None
    manifest.sampling = recipe.record() if recipe else None
    sources = {c: _source(identity, precision, opset, merged if c.startswith("transformer") else ()) for c in components}
    if "transformer_controlnet" in sources:  # another block count is another graph
        sources["transformer_controlnet"]["controlnet_blocks"] = blocks
    todo = [c for c in components if force or not _up_to_date(out, manifest, c, sources[c])]
    _check_disk(root, out, precision, todo)
    from tqdm.auto import tqdm

    manifest.ran = bool(todo)
    for name in tqdm(components, desc="export", unit="graph", disable=not progress):
        if name not in todo:
            log.info("export: %s unchanged, skipped", name)
            continue
        spec = spec_for(name, ckpt.read_config(root, SPECS[name].part), controlnet_blocks=blocks)
        manifest.components[name] = export_component(spec, root, out, precision, opset, sources[name],
                                                     loras=merged if name.startswith("transformer") else ())
        write_manifest(out, manifest)  # after every graph: an interrupted export resumes where it stopped
    if not todo:
        write_manifest(out, manifest)
    return manifest


def _check_21_options(root: Path, loras, controlnet) -> None:
    if loras:
        raise InputError("loras", [str(x) for x in loras], f"none for {root} (a Qwen-Image-2.1 checkpoint): LoRA merging "
                         "at export is modelled for the 2509 transformer only")
    if controlnet is not None:
        raise InputError("controlnet", str(controlnet), "none: Qwen-Image-2.1 has no ControlNet")


def shipped_sigmas_recipe(root: Path) -> SamplingRecipe | None:
    """The few-step recipe a 2.1-Turbo checkpoint ships (`sample_sigmas` in model_index.json: diffusers runs it as
    QwenImage21TurboModularPipeline at exactly those sigmas), or None."""
    import json

    sigmas = json.loads((root / "model_index.json").read_text()).get("sample_sigmas")
    if not sigmas:
        return None
    return SamplingRecipe("qwen-image-2.1-turbo", len(sigmas), 1.0, {}, sigmas=[float(x) for x in sigmas])


def _writable_folder(out_dir) -> Path:
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError("out", str(out_dir), f"a folder this user can create and write ({e.strerror})") from None
    return out


def _source(identity: str, precision: str, opset: int, loras=()) -> dict:
    source = {"checkpoint": identity, "precision": precision, "opset": opset, "exporter": EXPORTER}
    if loras:
        source["loras"] = [{"sha256": a.sha256, "scale": scale} for a, scale in loras]
    return source



def _load_or_new(out: Path, root: Path, identity: str, precision: str, opset: int) -> Manifest:
    old = try_read_manifest(out)
    if old is not None and old.stage == "export" and old.checkpoint.identity == identity \
            and old.precision == precision and old.opset == opset:
        old.versions = tool_versions()
        return old
    if old is not None or (out / "manifest.json").is_file():
        log.warning("export: %s held graphs of another checkpoint/precision/opset or version; replacing them", out)
    return Manifest(stage="export", checkpoint=checkpoint_ref(root, identity), precision=precision, opset=opset,
                    exporter=EXPORTER, versions=tool_versions())


def checkpoint_ref(root: Path, identity: str) -> CheckpointRef:
    return CheckpointRef(path=str(root.resolve()), identity=identity, pipeline=ckpt.pipeline_class(root),
                         transformer_config=ckpt.read_config(root, "transformer"),
                         vae_config=ckpt.read_config(root, "vae"))


def _up_to_date(out: Path, manifest: Manifest, name: str, source: dict) -> bool:
    entry = manifest.components.get(name)
    return entry is not None and entry.source == source and entry.graph.intact(out)


def _check_disk(root: Path, out: Path, precision: str, components) -> None:
    if not components:
        return
    need, free = export_bytes(root, precision, components), free_disk_bytes(out)
    if need > free:
        raise QitrtError(f"export of {', '.join(components)} in {precision} needs ~{need / 1e9:.1f} GB of disk in "
                         f"{out}, which has {free / 1e9:.1f} GB free: free space or pick another --out")


def export_component(spec: ExportSpec, root: Path, out: Path, precision: str, opset: int, source: dict,
                     loras=()) -> Component:
    """Trace, write, check and run one component; the module is freed before ONNX Runtime loads the graph.
    `loras` [(Adapter, scale)] are merged into the transformer first (the check then runs the merged module)."""
    precision = component_precision(spec.name, precision, opset)
    config = ckpt.read_config(root, spec.part)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        module = spec.build_module(root, PRECISIONS[precision])
        if loras:
            from qwen_image_trt.models.lora import merge_into

            changed = merge_into(module.transformer, loras)
            log.info("export: %d LoRA adapter(s) merged into %d Linear weights", len(loras), changed)
        model = onnx_io.trace(module, spec.sample_inputs(config), spec, opset)
        onnx_io.name_linear_weights(model)
        graph = onnx_io.save(model, out / f"{spec.name}.onnx")
        del model
        export_s = time.perf_counter() - t0
        path = graph.path(out)
        onnx_io.check_graph(path)
        shape = spec.test_shapes[-1] if spec.test_shapes else {}
        args = spec.sample_inputs(config, **shape, seed=1)
        with torch.no_grad():
            want = module(*args).float().numpy()
        release_weights(module)
        del module
        gc.collect()
        check = run_in_onnxruntime(spec, path, args, want, precision)
        check["shape"] = {k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()}
    inputs, outputs = onnx_io.io_info(path)
    return Component(graph=graph, precision=precision, source=source, inputs=inputs, outputs=outputs,
                     dynamic_axes={k: {str(a): n for a, n in v.items()} for k, v in spec.dynamic_axes.items()},
                     seconds=round(export_s, 3), peak_rss_bytes=mem.peak, check=check)


def release_weights(module) -> None:
    """Free a module's parameter and buffer storage now, whoever still holds the module: the exporter's
    rewrite rules keep their last matched graph (and through it the traced parameters) alive, and ONNX Runtime
    is about to load a second copy of the weights."""
    for t in list(module.parameters()) + list(module.buffers()):
        t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def run_in_onnxruntime(spec: ExportSpec, path: Path, args, want: np.ndarray, precision: str) -> dict:
    """Run the graph on `args` and compare with the eager output `want` (computed before, module freed)."""
    import onnxruntime as ort

    provider = ("CUDAExecutionProvider" if "CUDAExecutionProvider" in ort.get_available_providers()
                else "CPUExecutionProvider")
    try:
        sess = onnx_io.ort_session(path, provider)
    except Exception as e:  # noqa: BLE001 - narrowed just below
        if precision != "bf16" or provider != "CPUExecutionProvider" or "NOT_IMPLEMENTED" not in str(e):
            raise
        # ONNX Runtime's CPU provider has no bf16 MatMul/Conv; the graph was still checked and
        # shape-inferred. Say so in the manifest instead of pretending it ran.
        detail = str(e).split("NOT_IMPLEMENTED : ")[-1].splitlines()[0]
        reason = f"not run: ONNX Runtime {ort.__version__} CPU has no bf16 kernels ({detail})"
        log.warning("export: %s %s; run `qitrt parity` on a CUDA machine", path.name, reason)
        return {"skipped": reason, "provider": provider, "max_abs_err_vs_eager": None}
    got = sess.run(None, {n: onnx_io.as_numpy(a) for n, a in zip(spec.input_names, args)})[0]
    del sess
    if got.shape != want.shape:
        raise QitrtError(f"{path.name}: ONNX Runtime output shape {got.shape} != eager {want.shape}")
    if not np.isfinite(got).all():
        raise QitrtError(f"{path.name}: ONNX Runtime output has non-finite values")
    err = float(np.abs(got.astype(np.float32) - want).max())
    scale = float(np.abs(want).max()) or 1.0
    return {"max_abs_err_vs_eager": err, "max_abs_eager": scale, "provider": provider}


def exported_file(engines_dir, component: str) -> Path:
    """Path of an exported component, read from the manifest (later stages never guess file names)."""
    return read_manifest(engines_dir).component(component, engines_dir).graph.path(engines_dir)


__all__ = ["export_onnx", "export_component", "exported_file", "resolve_precision", "component_precision",
           "export_bytes", "checkpoint_ref", "PRECISIONS", "DEFAULT_OPSET"]
