"""`qitrt build`: export -> calibrate -> quantize -> lint -> engine, as one command with stage skipping.

Layout of `--out DIR` (DIR itself is the engine folder `--engines DIR` loads):

    DIR/manifest.json     engine manifest: components with `ort_file` (onnxruntime) or `engine_file` (tensorrt),
                          precision, checkpoint identity, quantization recipe + calibration set id, stage log
    DIR/onnx/             stage export (fp32 for int8/fp8, else the build precision), its own manifest
    DIR/calibration/      stage calibrate (int8/fp8, unless --calibration points to an existing set)
    DIR/quantized/        stage quantize (int8/fp8): Q/DQ transformer + the fp32 VAE graphs
    DIR/build.json        what each stage did last time (ran/skipped, seconds, content hashes)

Every stage keys its outputs by content hashes of its inputs (checkpoint identity, graph sha256, calibration
set id, recipe hash, settings) and is skipped when they are unchanged and its outputs are intact. All inputs are
checked before the first stage runs (precision, target, sizes, calibration settings or set, recipe, TensorRT).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_trt.build.manifest import write_atomic
from qwen_image_trt.errors import InputError, QitrtError

log = logging.getLogger(__name__)

BUILD_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
TARGETS = ("onnxruntime", "tensorrt")
COMPONENTS = ("transformer", "vae_decoder", "vae_encoder")
BUILD_LOG = "build.json"
TINY_SIZES = "64x64"
DEFAULT_SIZES = "1024x1024"


@dataclass
class BuildOptions:
    precision: str
    target: str = "onnxruntime"
    sizes: str | list | None = None
    max_batch: int = 1
    calibration: str | None = None  # an existing calibration set to reuse
    num_prompts: int | None = None
    steps: int | None = None
    seed: int = 0
    keep: tuple = ()
    recipe: str | dict | None = None  # JSON file or dict of recipe overrides
    opt_level: int = 3
    ort_level: str = "basic"
    timing_cache: str | None = None  # TensorRT timing cache to share across builds (default: in the engine folder)
    refittable: bool = False  # TensorRT: weights can be swapped later (LoRA) without a rebuild
    weight_streaming: bool = False  # TensorRT: stream weights from host memory when the GPU is short of it
    device: str = "cpu"
    force: bool = False
    progress: bool = True
    components: tuple = COMPONENTS
    extra: dict = field(default_factory=dict)


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    stages: list[dict]

    def summary(self) -> str:
        lines = [f"qitrt build -> {self.out} ({self.manifest['precision']}, {self.manifest['target']})"]
        for s in self.stages:
            lines.append(f"  {s['stage']:10s} {s['status']:8s} {s['seconds']:8.1f}s  {s.get('detail', '')}")
        lines.append(f"  total      {sum(s['seconds'] for s in self.stages):17.1f}s")
        return "\n".join(lines)


def build(checkpoint, out_dir, options: BuildOptions) -> BuildResult:
    """Run the build; see the module doc. Raises InputError/QitrtError before any stage on bad input."""
    from qwen_image_trt.models import checkpoint as ckpt

    o = options
    # ------------------------------------------------------------------ checks, all before any work
    if o.precision not in BUILD_PRECISIONS:
        raise InputError("precision", o.precision, f"one of {', '.join(BUILD_PRECISIONS)}")
    if o.target not in TARGETS:
        raise InputError("target", o.target, f"one of {', '.join(TARGETS)}")
    root = ckpt.validate_checkpoint(checkpoint)
    identity = ckpt.checkpoint_identity(root)
    from qwen_image_trt.build.profiles import limits_from_sizes, parse_sizes

    tiny = (root / "TINY_RANDOM_WEIGHTS.txt").is_file()
    sizes = parse_sizes(o.sizes if o.sizes else (TINY_SIZES if tiny else DEFAULT_SIZES))
    limits = limits_from_sizes(sizes, o.max_batch)
    quantized = o.precision in ("int8", "fp8")
    tconfig = ckpt.read_config(root, "transformer")
    recipe_overrides, recipe = None, None
    calib_settings = None
    if quantized:
        from qwen_image_trt.build.recipe import load_recipe_file, make_recipe

        recipe_overrides = load_recipe_file(o.recipe) if isinstance(o.recipe, (str, os.PathLike)) else o.recipe
        recipe = make_recipe(o.precision, tconfig["num_layers"], overrides=recipe_overrides, keep=o.keep)
        if o.calibration:
            from qwen_image_trt.calibration.capture import CalibrationSet

            cs = CalibrationSet(o.calibration)
            cs.check_checkpoint(identity)
            cs.check_sizes(sizes)
        else:
            from qwen_image_trt.calibration.capture import make_settings

            calib_settings = make_settings(root, o.num_prompts, o.steps, sizes, o.seed)
        from qwen_image_trt.build.quantize import _require_modelopt

        _require_modelopt()
    elif o.keep or o.recipe or o.calibration:
        raise InputError("keep/recipe/calibration", o.keep or o.recipe or o.calibration,
                         "only with --precision int8 or fp8")
    if o.target == "tensorrt":
        from qwen_image_trt.build.tensorrt_engine import require_tensorrt

        require_tensorrt()
    else:
        from qwen_image_trt.build.ort_engine import LEVELS

        if o.ort_level not in LEVELS:
            raise InputError("ort_level", o.ort_level, f"one of {', '.join(LEVELS)}")
        if o.precision == "bf16":
            log.warning("build: ONNX Runtime's CPU provider runs few bf16 kernels; bf16 graphs are meant for "
                        "TensorRT or the CUDA provider")
    from qwen_image_trt.build.lint import lint_onnx

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_log(out)
    stages: list[dict] = []
    bar = _progress(o, 2 + 2 * quantized + 1)

    # ------------------------------------------------------------------ 1. export
    from qwen_image_trt.build.export import export_onnx
    from qwen_image_trt.build.manifest import file_sha256, read_manifest, write_manifest

    export_precision = "fp32" if quantized else o.precision
    # Quantized builds take the transformer straight from the checkpoint (ModelOpt works on the torch
    # module), so only the VAE graphs are exported (an fp32 ONNX of a 20B transformer would be ~80 GB).
    export_components = tuple(c for c in o.components if c != "transformer") if quantized else tuple(o.components)
    onnx_dir = out / "onnx"
    before = _updated(onnx_dir)
    t = time.perf_counter()
    bar.set_description("build: export")
    export_onnx(root, onnx_dir, precision=export_precision, components=export_components, force=o.force,
                progress=False)
    ran = _updated(onnx_dir) != before or before is None
    stages.append(_stage("export", ran, t, f"{export_precision} -> {onnx_dir.name}/"))
    bar.update()
    graphs_dir = onnx_dir

    # ------------------------------------------------------------------ 2. calibrate, 3. quantize
    calib_dir = Path(o.calibration) if o.calibration else out / "calibration"
    if quantized:
        if not o.calibration:
            from qwen_image_trt.calibration.capture import calibrate

            t = time.perf_counter()
            bar.set_description("build: calibrate")
            cm = calibrate(root, calib_dir, num_prompts=calib_settings.num_prompts, steps=calib_settings.steps,
                           sizes=list(calib_settings.sizes), seed=calib_settings.seed,
                           holdout=calib_settings.holdout, record_every=calib_settings.record_every,
                           device=o.device, force=o.force, progress=o.progress)
            stages.append(_stage("calibrate", not cm.get("skipped"), t,
                                 f"set {cm['set_id']}, {cm['totals']['calib_calls']} forwards"))
        else:
            stages.append({"stage": "calibrate", "status": "reused", "seconds": 0.0, "detail": str(calib_dir)})
        bar.update()
        from qwen_image_trt.build.quantize import quantize_onnx

        t = time.perf_counter()
        bar.set_description(f"build: quantize {o.precision}")
        qm = quantize_onnx(root, calib_dir, out / "quantized", o.precision, recipe=recipe_overrides, keep=o.keep,
                           vae_from=onnx_dir, sizes=sizes, device=o.device, force=o.force, progress=o.progress)
        chk = qm["components"]["transformer"]["ort_check"]
        check = chk.get("skipped") or f"ORT vs eager cos {chk['cosine_min']:.5f}"
        stages.append(_stage("quantize", not qm.get("skipped"), t,
                             f"{len(qm['quantization']['quantized_layers'])} layers, {check}"))
        bar.update()
        graphs_dir = out / "quantized"
    graphs = read_manifest(graphs_dir)

    # ------------------------------------------------------------------ 4. lint
    t = time.perf_counter()
    bar.set_description("build: lint")
    lint_results, lint_ran = {}, False
    prev_lint = (previous or {}).get("lint", {})
    for name in o.components:
        path = graphs_dir / graphs["components"][name]["file"]
        sha = graphs["components"][name]["sha256"]
        if not o.force and prev_lint.get(name, {}).get("sha256") == sha and prev_lint[name].get("ok"):
            lint_results[name] = prev_lint[name]
            continue
        report = lint_onnx(path)
        lint_ran = True
        lint_results[name] = {"sha256": sha, "ok": report.ok, "errors": len(report.errors),
                              "warnings": len(report.warnings), "rules": sorted(report.rules())}
        if not report.ok:
            stages.append(_stage("lint", True, t, f"{name}: FAILED"))
            _write_log(out, stages, lint_results, failed=True)
            raise QitrtError(f"lint found errors in {path}; the engine was not built:\n{report.summary()}")
    stages.append(_stage("lint", lint_ran, t, ", ".join(f"{n} {'ok' if r['ok'] else 'FAIL'}"
                                                        f"({r['warnings']}w)" for n, r in lint_results.items())))
    bar.update()

    # ------------------------------------------------------------------ 5. engines
    t = time.perf_counter()
    bar.set_description(f"build: {o.target} engines")
    old = None
    if (out / "manifest.json").is_file():
        try:
            old = read_manifest(out)
        except QitrtError:
            old = None
    components, engine_ran = {}, False
    for name in o.components:
        src = graphs_dir / graphs["components"][name]["file"]
        src_sha = graphs["components"][name]["sha256"]
        prev = (old or {}).get("components", {}).get(name) if old and old.get("target") == o.target else None
        if o.target == "onnxruntime":
            if (not o.force and prev and prev.get("source_sha256") == src_sha and prev.get("precision") == o.precision
                    and prev.get("optimization_level") == o.ort_level and (out / prev["ort_file"]).is_file()
                    and file_sha256(out / prev["ort_file"]) == prev.get("ort_sha256")):
                components[name] = prev
                continue
            from qwen_image_trt.build.ort_engine import build_ort_engine

            entry = build_ort_engine(src, out, name, precision=o.precision, source_manifest=graphs,
                                     level=o.ort_level)
        else:
            from qwen_image_trt.build.profiles import component_profile
            from qwen_image_trt.build.tensorrt_engine import build_tensorrt_engine

            cfg = tconfig if name == "transformer" else ckpt.read_config(root, "vae")
            profiles = component_profile(name, sizes, o.max_batch, config=cfg)
            entry = build_tensorrt_engine(src, out, name, profiles, precision=o.precision, recipe=recipe,
                                          timing_cache=Path(o.timing_cache) if o.timing_cache else out / "timing.cache",
                                          opt_level=o.opt_level, refittable=o.refittable,
                                          weight_streaming=o.weight_streaming,
                                          source_manifest=graphs, progress=o.progress, limits=limits,
                                          force=o.force)
            entry["sha256"] = src_sha
            components[name] = entry
            engine_ran |= "build_seconds" in entry  # absent when an engine with the same cache key was reused
            continue
        entry["sha256"] = src_sha
        components[name] = entry
        engine_ran = True
    stages.append(_stage("engine", engine_ran, t, f"{o.target}: {', '.join(components)}"))
    bar.update()
    bar.close()

    manifest = {
        "format": graphs["format"], "stage": "build", "target": o.target,
        "checkpoint": graphs["checkpoint"], "precision": o.precision, "opset": graphs.get("opset"),
        "exporter": graphs.get("exporter"), "versions": graphs.get("versions"),
        "quantization": graphs.get("quantization"),
        "limits": limits if o.target == "tensorrt" else None,
        "sizes": [list(s) for s in sizes], "max_batch": o.max_batch,
        "graphs": os.path.relpath(graphs_dir, out),
        "calibration": str(calib_dir.resolve()) if quantized else None,
        "components": components,
        "build": {"stages": stages},
    }
    if manifest["limits"] is None:
        manifest.pop("limits")
    write_manifest(out, manifest)
    _write_log(out, stages, lint_results)
    return BuildResult(out, manifest, stages)


def _stage(name: str, ran: bool, t0: float, detail: str = "") -> dict:
    return {"stage": name, "status": "ran" if ran else "skipped", "seconds": round(time.perf_counter() - t0, 3),
            "detail": detail}


def _updated(folder: Path):
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("updated")
    except json.JSONDecodeError:
        return None


def _read_log(out: Path) -> dict | None:
    path = out / BUILD_LOG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _write_log(out: Path, stages, lint, failed: bool = False) -> None:
    data = {"stages": stages, "lint": lint, "failed": failed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(out / BUILD_LOG, json.dumps(data, indent=2) + "\n")


def _progress(o: BuildOptions, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="build", unit="stage", disable=not o.progress)


__all__ = ["build", "BuildOptions", "BuildResult", "BUILD_PRECISIONS", "TARGETS"]
