"""`qitrt build`: export -> calibrate -> quantize -> lint -> engine, as one command with stage skipping.

Layout of `--out DIR` (DIR itself is the engine folder `--engines DIR` loads):

    DIR/manifest.json     engine manifest: each component's graph (relative path), its engine (onnxruntime or
                          tensorrt), precision, checkpoint identity, quantization recipe + calibration set id,
                          the stages' log
    DIR/onnx/             stage export (the checkpoint's own precision for int8/fp8, else the build precision)
    DIR/calibration/      stage calibrate (int8/fp8, unless --calibration points to an existing set)
    DIR/quantized/        stage quantize (int8/fp8): Q/DQ transformer + the VAE graphs

Every stage keys its outputs by content hashes of its inputs (checkpoint identity, graph and weight hashes,
calibration set id, recipe hash, settings) and is skipped when they are unchanged and its outputs are intact.
All inputs, and whether this machine can hold the build (`plan.py`), are checked before the first stage runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from qwen_image_trt.calibration.capture import CalibrationSet, calibrate, make_settings
from qwen_image_trt.compile.export import export_onnx
from qwen_image_trt.compile.lint import lint_onnx
from qwen_image_trt.compile.ort_engine import LEVELS, build_ort_engine, ort_engine_intact
from qwen_image_trt.compile.plan import plan_build
from qwen_image_trt.compile.profiles import component_profile, limits_from_sizes
from qwen_image_trt.compile.profiles21 import component_profile_21
from qwen_image_trt.compile.quantize import _require_modelopt, quantize_onnx
from qwen_image_trt.compile.recipe import FAMILY_21, load_recipe_file, make_recipe
from qwen_image_trt.compile.tensorrt_engine import build_tensorrt_engine
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.manifest import Component, Manifest, StageRun, read_manifest, try_read_manifest, write_manifest
from qwen_image_trt.core.resources import PeakRSS, default_device
from qwen_image_trt.core.shapes import parse_sizes
from qwen_image_trt.core.tensorrt import require_tensorrt
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.pipelines import pipeline_kind
from qwen_image_trt.models.specs import default_components

log = logging.getLogger(__name__)

BUILD_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "fp8")
QUANTIZED = ("int8", "fp8")
TARGETS = ("onnxruntime", "tensorrt")
COMPONENTS = ("transformer", "vae_decoder", "vae_encoder")
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
    tf32: bool | None = None  # TensorRT: None = off for fp32 reference builds, allowed otherwise
    weight_streaming: bool = False  # TensorRT: stream weights from host memory when the GPU is short of it
    refittable: bool = False  # TensorRT: weights replaceable by name at run time (LoRA without a rebuild)
    device: str | None = None  # calibration, quantization and TensorRT builds; None = cuda if visible, else cpu
    force: bool = False
    progress: bool = True
    check_resources: bool = True  # refuse up front when this machine cannot hold the build (plan.py)
    report: Callable[[str], None] | None = None  # where the plan goes before any work (the CLI: print)
    plan_only: bool = False  # say what the build would need and stop
    components: tuple | None = None  # None: COMPONENTS, and transformer_controlnet where there is a ControlNet
    controlnet: str | None = None  # a QwenImageControlNetModel folder (default: the checkpoint's controlnet/)
    loras: tuple = ()  # "PATH[:SCALE]" adapters merged into the transformer (export) and calibrated with
    sampling: str | None = None  # a recipe name or JSON file (models.sampling): scheduler + steps made for
    extra: dict = field(default_factory=dict)


@dataclass
class BuildResult:
    out: Path
    manifest: Manifest
    stages: list[StageRun]
    plan: object = None

    def summary(self) -> str:
        lines = [f"qitrt build -> {self.out} ({self.manifest.precision}, {self.manifest.target})"]
        for s in self.stages:
            peak = f"  peak RSS {s.peak_rss_bytes / 1e9:6.2f} GB" if s.peak_rss_bytes else ""
            lines.append(f"  {s.stage:10s} {s.status:8s} {s.seconds:8.1f}s{peak}  {s.detail}")
        lines.append(f"  total      {sum(s.seconds for s in self.stages):17.1f}s")
        return "\n".join(lines)


@dataclass
class _Context:
    """What the stages share: checked options, the checkpoint, where each stage writes."""

    root: Path
    out: Path
    o: BuildOptions
    identity: str
    sizes: list
    recipe: dict | None
    recipe_overrides: dict | None
    recipe_sampling: object = None  # models.sampling.SamplingRecipe, or None
    stages: list[StageRun] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.o.precision in QUANTIZED


def build(checkpoint, out_dir, options: BuildOptions) -> BuildResult:
    """Run the build; see the module doc. Raises InputError/QitrtError before any stage on bad input."""
    ctx = _check(checkpoint, out_dir, options)
    plan = plan_build(ctx.root, ctx.out, options)
    if options.report is not None:
        options.report("\n".join(plan.summary()))
    if options.plan_only:
        return BuildResult(ctx.out, None, [], plan)
    if options.check_resources:
        plan.check()
    ctx.out.mkdir(parents=True, exist_ok=True)
    bar = _progress(options, 3 + 2 * ctx.quantized)
    graphs_dir = _export_stage(ctx, bar)
    if ctx.quantized:
        calib_dir = _calibrate_stage(ctx, bar)
        graphs_dir = _quantize_stage(ctx, graphs_dir, calib_dir, bar)
    graphs = read_manifest(graphs_dir)
    lint = _lint_stage(ctx, graphs_dir, graphs, bar)
    components = _engine_stage(ctx, graphs_dir, graphs, bar)
    for name, c in components.items():
        c.lint = lint[name]
    bar.close()
    manifest = _build_manifest(ctx, graphs_dir, graphs, components)
    write_manifest(ctx.out, manifest)
    return BuildResult(ctx.out, manifest, ctx.stages, plan)


def _check(checkpoint, out_dir, o: BuildOptions) -> _Context:
    """Every check that needs no model: precision, target, sizes, recipe, calibration, TensorRT, ORT level."""
    if o.precision not in BUILD_PRECISIONS:
        raise InputError("precision", o.precision, f"one of {', '.join(BUILD_PRECISIONS)}")
    if o.target not in TARGETS:
        raise InputError("target", o.target, f"one of {', '.join(TARGETS)}")
    o.device = o.device or default_device()
    root = ckpt.validate_checkpoint(checkpoint)
    identity = ckpt.checkpoint_identity(root)
    from qwen_image_trt.models.controlnet import find_controlnet

    qwen21 = ckpt.is_qwen21(root)
    if qwen21 and o.components is None:
        o.components = default_components(True)
    if o.components is None:
        o.components = COMPONENTS + (("transformer_controlnet",) if find_controlnet(root, o.controlnet) else ())
    if o.precision in QUANTIZED and "transformer_controlnet" in o.components:
        raise InputError("precision", o.precision, "fp32, fp16 or bf16 with a ControlNet: its transformer_controlnet "
                         "graph is not quantized yet (quantize the plain text-to-image build without --controlnet)")
    sizes = parse_sizes(o.sizes if o.sizes else (TINY_SIZES if ckpt.is_tiny(root) else DEFAULT_SIZES))
    recipe_overrides = recipe = None
    if o.precision in QUANTIZED:
        recipe_overrides = load_recipe_file(o.recipe) if isinstance(o.recipe, (str, Path)) else o.recipe
        recipe = make_recipe(o.precision, ckpt.read_config(root, "transformer")["num_layers"],
                             overrides=recipe_overrides, keep=o.keep, family=FAMILY_21 if qwen21 else None)
        if qwen21 and "transformer_uncached" in o.components:
            raise InputError("components", list(o.components), "no transformer_uncached in a quantized 2.1 build "
                             "(only the prefix cache's two graphs are quantized)")
        if o.calibration:
            cs = CalibrationSet(o.calibration)
            cs.check_checkpoint(identity)
            cs.check_sizes(sizes)
        else:
            make_settings(root, o.num_prompts, o.steps, sizes, o.seed)
        _require_modelopt()
    elif o.keep or o.recipe or o.calibration:
        raise InputError("keep/recipe/calibration", o.keep or o.recipe or o.calibration,
                         "only with --precision int8 or fp8")
    if o.target == "tensorrt":
        if not o.plan_only:  # a plan may be made anywhere: it is how one picks the machine
            require_tensorrt(_cuda_index(o.device))
    else:
        if o.ort_level not in LEVELS:
            raise InputError("ort_level", o.ort_level, f"one of {', '.join(LEVELS)}")
        if o.precision == "bf16":
            log.warning("build: ONNX Runtime's CPU provider runs few bf16 kernels; bf16 graphs are meant for "
                        "TensorRT or the CUDA provider")
    limits_from_sizes(sizes, o.max_batch)  # checks max_batch
    from qwen_image_trt.models.sampling import load_recipe as load_sampling

    sampling = load_sampling(o.sampling, o.steps) if o.sampling else None
    return _Context(root, Path(out_dir), o, identity, sizes, recipe, recipe_overrides, sampling)


def _cuda_index(device: str) -> int:
    if not str(device).startswith("cuda"):
        raise InputError("device", device, "cuda or cuda:N: TensorRT engines are built on an NVIDIA GPU")
    return int(str(device).split(":")[1]) if ":" in str(device) else 0


def _run(ctx: _Context, stage: str, bar, fn):
    """Run one stage's function with its time and peak RSS recorded; fn returns (ran, detail, result)."""
    bar.set_description(f"build: {stage}")
    with PeakRSS() as mem:
        ran, detail, result = fn()
    ctx.stages.append(StageRun(stage=stage, status=ran if isinstance(ran, str) else ("ran" if ran else "skipped"),
                               seconds=round(mem.seconds, 3), detail=detail, peak_rss_bytes=mem.peak if ran else None))
    bar.update()
    return result


def _export_stage(ctx: _Context, bar) -> Path:
    # Quantized builds export the transformer in the checkpoint's own precision (bf16 for the real model):
    # the quantize stage calibrates in that precision and writes its Q/DQ graph from this one.
    precision = "auto" if ctx.quantized else ctx.o.precision
    onnx_dir = ctx.out / "onnx"

    def run():
        m = export_onnx(ctx.root, onnx_dir, precision=precision, components=ctx.o.components, force=ctx.o.force,
                        progress=False, loras=ctx.o.loras, sampling=ctx.recipe_sampling, controlnet=ctx.o.controlnet)
        return m.ran, f"{m.precision} -> {onnx_dir.name}/", m

    _run(ctx, "export", bar, run)
    return onnx_dir


def _calibrate_stage(ctx: _Context, bar) -> Path:
    if ctx.o.calibration:
        ctx.stages.append(StageRun(stage="calibrate", status="reused", seconds=0.0, detail=str(ctx.o.calibration)))
        bar.update()
        return Path(ctx.o.calibration)
    calib_dir = ctx.out / "calibration"

    def run():
        o = ctx.o
        cm = calibrate(ctx.root, calib_dir, num_prompts=o.num_prompts, steps=o.steps, sizes=ctx.sizes, seed=o.seed,
                       device=o.device, force=o.force, progress=o.progress, loras=o.loras,
                       sampling=ctx.recipe_sampling)
        return cm.ran, f"set {cm.set_id}, {cm.totals['calib_calls']} forwards", cm

    _run(ctx, "calibrate", bar, run)
    return calib_dir


def _quantize_stage(ctx: _Context, onnx_dir: Path, calib_dir: Path, bar) -> Path:
    quant_dir = ctx.out / "quantized"

    def run():
        o = ctx.o
        qm = quantize_onnx(ctx.root, calib_dir, quant_dir, o.precision, graphs=onnx_dir, recipe=ctx.recipe_overrides,
                           keep=o.keep, sizes=ctx.sizes, device=o.device, force=o.force, progress=o.progress)
        chk = qm.components["transformer" if "transformer" in qm.components else "transformer_cached"].check or {}
        check = chk.get("skipped") or (f"mismatch vs fake-quant {chk['mismatch']:.3g}, "
                                       f"err/blocks {chk['block_rel_err']:.3f}")
        return qm.ran, f"{len(qm.quantization.quantized_layers)} layers, {check}", qm

    _run(ctx, "quantize", bar, run)
    return quant_dir


def _lint_stage(ctx: _Context, graphs_dir: Path, graphs: Manifest, bar) -> dict[str, dict]:
    """{component: lint summary}; a graph already linted clean (same sha256) in the last build is not re-linted."""
    previous = _previous(ctx.out)
    results: dict[str, dict] = {}

    def run():
        ran = False
        for name in ctx.o.components:
            graph = graphs.components[name].graph
            old = previous.components.get(name) if previous else None
            if not ctx.o.force and old is not None and old.lint and old.lint.get("ok") \
                    and old.lint.get("graph_sha256") == graph.sha256:
                results[name] = old.lint
                continue
            report = lint_onnx(graph.path(graphs_dir))
            ran = True
            results[name] = {"graph_sha256": graph.sha256, "ok": report.ok, "errors": len(report.errors),
                             "warnings": len(report.warnings), "rules": sorted(report.rules())}
            if not report.ok:
                raise QitrtError(f"lint found errors in {graph.path(graphs_dir)}; the engine was not built:\n"
                                 f"{report.summary()}")
        return ran, ", ".join(f"{n} ok({r['warnings']}w)" for n, r in results.items()), None

    _run(ctx, "lint", bar, run)
    return results


def _previous(out: Path) -> Manifest | None:
    m = try_read_manifest(out)
    return m if m is not None and m.stage == "build" else None


def _engine_stage(ctx: _Context, graphs_dir: Path, graphs: Manifest, bar) -> dict[str, Component]:
    previous = _previous(ctx.out)
    components: dict[str, Component] = {}

    def run():
        ran = False
        for name in ctx.o.components:
            entry = graphs.components[name].model_copy(deep=True)
            entry.graph = entry.graph.relocated(graphs_dir.name)
            old = previous.components.get(name) if previous and previous.target == ctx.o.target else None
            if ctx.o.target == "onnxruntime":
                entry.onnxruntime, built = _ort_engine(ctx, graphs_dir, name, entry, old)
            else:
                entry.tensorrt, built = _tensorrt_engine(ctx, graphs_dir, name, graphs.components[name])
            ran |= built
            components[name] = entry
        return ran, f"{ctx.o.target}: {', '.join(components)}", None

    _run(ctx, "engine", bar, run)
    return components


def _ort_engine(ctx: _Context, graphs_dir: Path, name: str, entry: Component, old: Component | None):
    o = ctx.o
    if (not o.force and old is not None and old.graph == entry.graph and old.precision == entry.precision
            and old.onnxruntime is not None and old.onnxruntime.level == o.ort_level
            and ort_engine_intact(ctx.out, old.onnxruntime)):
        return old.onnxruntime, False
    return build_ort_engine(entry.graph.path(ctx.out), ctx.out, name, precision=entry.precision,
                            level=o.ort_level), True


def _tensorrt_engine(ctx: _Context, graphs_dir: Path, name: str, source: Component):
    o = ctx.o
    cfg = ckpt.read_config(ctx.root, "transformer" if name.startswith("transformer") else "vae")
    if name == "transformer_controlnet":  # the residuals' block count is fixed in the graph
        cfg = {**cfg, "controlnet_blocks": source.source["controlnet_blocks"]}
    kind = pipeline_kind(ctx.root)  # edit members: condition images lengthen the sequences
    if ckpt.is_qwen21(ctx.root):
        profiles = component_profile_21(name, ctx.sizes, o.max_batch, config=cfg)
    else:
        profiles = component_profile(name, ctx.sizes, o.max_batch, config=cfg, kind=kind)
    engine = build_tensorrt_engine(
        graphs_dir, source, ctx.out, name, profiles, precision=source.precision, recipe=ctx.recipe,
        timing_cache=Path(o.timing_cache) if o.timing_cache else ctx.out / "timing.cache", opt_level=o.opt_level,
        tf32=o.tf32, weight_streaming=o.weight_streaming, device=_cuda_index(o.device), progress=o.progress,
        refittable=o.refittable and name == "transformer",
        limits=limits_from_sizes(ctx.sizes, o.max_batch, kind), force=o.force)
    return engine, engine.seconds is not None  # seconds is None when an engine with the same key was reused


def _build_manifest(ctx: _Context, graphs_dir: Path, graphs: Manifest, components: dict[str, Component]) -> Manifest:
    o = ctx.o
    quantization = graphs.quantization
    if quantization is not None and quantization.evidence and quantization.evidence.get("file"):
        quantization = quantization.model_copy(deep=True)  # paths in a manifest are relative to its folder
        quantization.evidence["file"] = f"{graphs_dir.name}/{quantization.evidence['file']}"
    return Manifest(stage="build", checkpoint=graphs.checkpoint, precision=o.precision, opset=graphs.opset,
                    exporter=graphs.exporter, versions=graphs.versions, components=components,
                    quantization=quantization, target=o.target,
                    limits=limits_from_sizes(ctx.sizes, o.max_batch, pipeline_kind(ctx.root))
                    if o.target == "tensorrt" else None,
                    sizes=[list(s) for s in ctx.sizes], max_batch=o.max_batch,
                    calibration=str(Path(o.calibration or ctx.out / "calibration").resolve()) if ctx.quantized
                    else None, stages=ctx.stages, loras=graphs.loras, sampling=graphs.sampling)


def _progress(o: BuildOptions, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="build", unit="stage", disable=not o.progress)


__all__ = ["build", "BuildOptions", "BuildResult", "BUILD_PRECISIONS", "TARGETS"]
