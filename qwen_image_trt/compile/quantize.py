"""Stage: high-precision transformer graph + calibration set -> int8 / fp8 Q/DQ graph (`qitrt quantize`).

1. Calibrate: ModelOpt (`mtq.quantize`) on the tensor-only ExportableTransformer in the graph's own
   precision (fp32 on CPU, bf16 on a GPU), replaying the recorded calls with text padded to the runtime's
   bucket, so the quantizers see exactly what the engine will. Layers the recipe keeps are disabled in
   the config before calibration (SmoothQuant folds scales into weights, so disabling afterwards would
   be wrong).
2. Reference outputs on held-out calls, while the module is loaded: high precision, the quantized blocks
   bypassed (before quantizing), ModelOpt's fake quantization (after).
3. Write: the quantizers' numbers go into the exported high-precision graph as Q/DQ (`qdq.py`), every
   other tensor streamed from the source graph's data file. The torch module is freed first, so the
   host holds the module once, then only the quantized weights.
4. Check: ONNX checker and shape inference from the path; the graph in ONNX Runtime on the held-out calls
   against the references (`quant_evidence.py`); a graph that disagrees with ModelOpt's simulation is
   refused.

The VAE graphs are copied from the export folder, in the precision they were exported in.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from qwen_image_trt.calibration.capture import CalibrationSet
from qwen_image_trt.compile import onnx_io, qdq
from qwen_image_trt.compile.recipe import (
    FAMILY_21,
    QUANT_PRECISIONS,
    is_excluded,
    make_recipe,
    modelopt_config,
    recipe_hash,
)
from qwen_image_trt.core import quant_evidence
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.identity import tool_versions
from qwen_image_trt.core.manifest import (
    Component,
    Manifest,
    Quantization,
    read_manifest,
    try_read_manifest,
    write_manifest,
)
from qwen_image_trt.core.resources import PeakRSS
from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, torch_dtype
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.lora import merge_into, read_loras, recorded_loras
from qwen_image_trt.models.specs import TRANSFORMER
from qwen_image_trt.models.transformer_export import input_names

log = logging.getLogger(__name__)

WRITER = "modelopt-calibration+qitrt-qdq-writer@1"
QUANT_OPSET = 19  # FP8 Q/DQ with a zero point needs opset >= 19
VAE_COMPONENTS = ("vae_decoder", "vae_encoder")


def check_same_loras(calibrated, exported, calibration, graphs) -> None:
    """A quantized graph's scales must come from the model it quantizes: the calibration set has to be recorded
    with the LoRAs (file hash and scale) that were merged into the exported graph."""
    def key(records):
        return [(r["sha256"], float(r["scale"])) for r in records or []]

    if key(calibrated) != key(exported):
        raise InputError("calibration", str(calibration), f"a set recorded with the LoRAs merged into {graphs} "
                         f"({key(exported) or 'none'}); it was recorded with {key(calibrated) or 'none'}: "
                         "run `qitrt calibrate` with the same --lora arguments")


def quantize_onnx(checkpoint, calibration, out_dir, precision: str, *, graphs, recipe: dict | None = None, keep=(),
                  sizes=None, text_bucket: int | None = None, device: str = "cpu", force: bool = False,
                  progress: bool = True) -> Manifest:
    """Quantize the transformer graph in `graphs` (a `qitrt export` folder of `checkpoint`) with `calibration`
    into `out_dir`; return the manifest (also written there).

    `recipe`: overrides of the default recipe (dict, e.g. from --recipe FILE); `keep`: extra modules kept in
    high precision (e.g. ["img_mlp"]); `sizes`: [(w, h)] the engine must serve: the calibration set must
    cover each.
    """
    # --- every check before any heavy work
    if precision not in QUANT_PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(QUANT_PRECISIONS)} (bf16/fp16 need no "
                         "calibration: `qitrt export --precision bf16`)")
    root = ckpt.validate_checkpoint(checkpoint, parts=("transformer", "vae"))
    qwen21 = ckpt.is_qwen21(root)
    identity = ckpt.checkpoint_identity(root)
    calib = CalibrationSet(calibration)
    calib.check_checkpoint(identity)
    if sizes:
        calib.check_sizes(sizes)
    elif calib.num_calls("calib") < 1:
        raise InputError("calibration", str(calibration), "a set with calibration forwards")
    source_manifest, source_graph = _source_graph(graphs, identity, qwen21)
    check_same_loras(calib.manifest.source.get("loras"), source_manifest.loras, calibration, graphs)
    tconfig = ckpt.read_config(root, "transformer")
    recipe = make_recipe(precision, tconfig["num_layers"], overrides=recipe, keep=keep,
                         family=FAMILY_21 if qwen21 else None)
    bucket = int(text_bucket or DEFAULT_TEXT_BUCKET)
    _require_modelopt()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import modelopt

    if qwen21:
        return _quantize_21(root, calib, out, precision, recipe, Path(graphs), source_manifest, force, device,
                            progress)
    source = {"checkpoint": identity, "graph": source_graph.graph.identity(), "calibration": calib.set_id,
              "recipe": recipe_hash(recipe), "precision": precision, "opset": QUANT_OPSET, "writer": WRITER,
              "text_bucket": bucket, "modelopt": modelopt.__version__}
    old = try_read_manifest(out)
    manifest = Manifest(stage="quantize", checkpoint=source_manifest.checkpoint, precision=precision,
                        opset=QUANT_OPSET, exporter=f"{source_manifest.exporter} + {WRITER}", versions=tool_versions(),
                        loras=source_manifest.loras, sampling=source_manifest.sampling)
    entry = old.components.get("transformer") if old is not None and old.stage == "quantize" else None
    if not force and entry is not None and entry.source == source and entry.graph.intact(out):
        log.info("quantize: transformer unchanged (calibration %s, recipe %s), skipped", calib.set_id, source["recipe"])
        manifest.components["transformer"], manifest.quantization = entry, old.quantization
        manifest.ran = False
    else:
        loras = recorded_loras(source_manifest.loras, graphs)  # merged into the graph: ModelOpt calibrates the same
        manifest.components["transformer"], manifest.quantization = _quantize_transformer(
            root, calib, recipe, graphs, source_graph, out, source, bucket, device, progress, loras)
    manifest.components.update(_copy_components(Path(graphs), source_manifest, out, VAE_COMPONENTS))
    write_manifest(out, manifest)
    return manifest


def _quantize_21(root, calib, out: Path, precision: str, recipe: dict, graphs: Path, source_manifest, force: bool,
                 device: str, progress: bool) -> Manifest:
    """Qwen-Image-2.1: both transformer graphs from one calibration (compile.quantize21)."""
    import modelopt

    from qwen_image_trt.compile.quantize21 import GRAPHS, check_source, quantize_transformer_21

    sources = check_source(source_manifest)
    source = {"checkpoint": source_manifest.checkpoint.identity,
              "graphs": {n: c.graph.identity() for n, c in sources.items()}, "calibration": calib.set_id,
              "recipe": recipe_hash(recipe), "precision": precision, "opset": QUANT_OPSET, "writer": WRITER,
              "modelopt": modelopt.__version__}
    old = try_read_manifest(out)
    manifest = Manifest(stage="quantize", checkpoint=source_manifest.checkpoint, precision=precision,
                        opset=QUANT_OPSET, exporter=f"{source_manifest.exporter} + {WRITER}", versions=tool_versions(),
                        sampling=source_manifest.sampling)
    done = old is not None and old.stage == "quantize" and all(
        n in old.components and old.components[n].source == source and old.components[n].graph.intact(out)
        for n in GRAPHS)
    if not force and done:
        log.info("quantize: 2.1 transformer graphs unchanged (calibration %s), skipped", calib.set_id)
        manifest.components.update({n: old.components[n] for n in GRAPHS})
        manifest.quantization, manifest.ran = old.quantization, False
    else:
        components, manifest.quantization = quantize_transformer_21(root, calib, recipe, graphs, sources, out,
                                                                    source, device, progress)
        manifest.components.update(components)
    manifest.components.update(_copy_components(graphs, source_manifest, out,
                                                [c for c in VAE_COMPONENTS if c in source_manifest.components]))
    write_manifest(out, manifest)
    return manifest


def _source_graph(graphs, identity: str, qwen21: bool = False):
    """The high-precision export the quantized graph is written from, checked against the checkpoint."""
    if graphs is None or not Path(graphs).is_dir():
        raise InputError("graphs", str(graphs), "a folder made by `qitrt export` for this checkpoint")
    m = read_manifest(graphs)
    if m.checkpoint.identity != identity:
        raise InputError("graphs", str(graphs), f"an export of this checkpoint ({identity}); it holds graphs of "
                         f"{m.checkpoint.identity}")
    if qwen21:
        from qwen_image_trt.compile.quantize21 import check_source

        return m, check_source(m)["transformer_cached"]
    missing = [c for c in ("transformer", *VAE_COMPONENTS) if c not in m.components]
    if missing:
        raise InputError("graphs", str(graphs), f"an export holding {', '.join(missing)}")
    t = m.components["transformer"]
    if t.precision not in ("fp32", "bf16", "fp16") or t.qdq:
        raise InputError("graphs", str(graphs), f"a high-precision transformer export (it is {t.precision})")
    return m, t


def _require_modelopt() -> None:
    try:
        with warnings.catch_warnings():
            # ModelOpt warns on import about any transformers release it was not tested with; we use none of its
            # transformers integrations (it quantizes our own tensor-only module), so the warning asks nothing.
            warnings.filterwarnings("ignore", message=r"transformers .* is not tested with current version of modelopt")
            import modelopt.torch.quantization  # noqa: F401
    except ImportError as e:
        raise QitrtError(f"quantization needs NVIDIA ModelOpt: pip install nvidia-modelopt ({e})") from None


@contextlib.contextmanager
def modelopt_quiet(kept_by_recipe: int, progress: bool):
    """ModelOpt prints "Inserted N quantizers" and warns "<layer> is not calibrated, skip smoothing" once per
    layer the recipe keeps in high precision (62 lines in a normal int8 build): expected, nothing to act on.
    They become one summary line; any other warning still shows."""
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        yield
    skipped = [w for w in caught if "is not calibrated" in str(w.message)]
    for w in caught:
        if w not in skipped:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    inserted = re.search(r"Inserted (\d+) quantizers", printed.getvalue())
    if progress:
        print(f"quantize: ModelOpt inserted {inserted.group(1) if inserted else '?'} quantizers; {kept_by_recipe} "
              f"layers left unquantized by the recipe ({len(skipped)} of them had no calibration to smooth)",
              file=sys.stderr, flush=True)


def _copy_components(src: Path, src_manifest: Manifest, out: Path, names) -> dict[str, Component]:
    """Copy exported graphs (the VAE: small) into `out`, keeping their manifest entries. Copies, not hard links:
    the ONNX checker refuses a data file with several links (it reads that as a hard-link attack)."""
    entries = {}
    for name in names:
        e = src_manifest.components[name]
        for rel in (e.graph.file, e.graph.external_data):
            if not rel:
                continue
            a, b = src / rel, out / rel
            if b.is_file() and b.stat().st_size == a.stat().st_size and b.stat().st_mtime >= a.stat().st_mtime:
                continue
            b.unlink(missing_ok=True)
            shutil.copy2(a, b)
        entries[name] = e
    return entries


def _quantize_transformer(root, calib, recipe, graphs, source: Component, out: Path, stage_source: dict,
                          bucket: int, device: str, progress: bool, loras=()) -> tuple[Component, Quantization]:
    timings = {}
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        module = TRANSFORMER.build_module(root, torch_dtype(source.precision))
        if loras:  # the graph holds the merged weights: ModelOpt must calibrate and quantize the same model
            merge_into(module.transformer, read_loras(root, loras))
        module = module.to(device)
        config = dict(module.transformer.config)
        axes, zero_cond_t = config["axes_dims_rope"], bool(config.get("zero_cond_t"))
        split = "holdout" if calib.num_calls("holdout") else "calib"
        held_out = [args for _, args in zip(range(quant_evidence.CHECK_CALLS),
                                            calib.export_inputs(axes, split, text_bucket=bucket,
                                                                zero_cond_t=zero_cond_t))]
        layers, kept, refs = _calibrate(module, calib, recipe, axes, held_out, bucket, device, progress, zero_cond_t)
        timings["calibrate_s"] = time.perf_counter() - t0
        del module
        gc.collect()

        t1 = time.perf_counter()
        model = onnx_io.load_structure(source.graph.path(graphs))
        counts = qdq.insert_qdq(model, layers, qdq.graph_float_dtype(model))
        quantized_names = sorted(layers)  # without the layers the exporter dropped as dead code
        kept = sorted(kept + counts["dead_layers"])
        numbers = qdq.expected_numbers(layers)
        del layers  # the quantized weights now live in `model` until it is written
        graph = onnx_io.save(model, out / "transformer.onnx")
        del model
        gc.collect()
        onnx_io.check_graph(graph.path(out))
        timings["write_s"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        evidence_path = quant_evidence.save(out, held_out, *refs, input_names(config), numbers=numbers)
        check = verify_graph(graph.path(out), evidence_path, source.precision, recipe["precision"],
                             input_names(config))
        timings["check_s"] = time.perf_counter() - t2
    inputs, outputs = onnx_io.io_info(graph.path(out))
    entry = Component(graph=graph, precision=recipe["precision"], source=stage_source, inputs=inputs, outputs=outputs,
                      dynamic_axes=source.dynamic_axes, seconds=round(time.perf_counter() - t0, 3),
                      peak_rss_bytes=mem.peak, check={**check, "timings": {k: round(v, 3) for k, v in timings.items()}},
                      qdq={**counts, "high_precision": source.precision})
    info = Quantization(
        recipe=recipe, recipe_hash=stage_source["recipe"], text_bucket=bucket,
        calibration={"set_id": calib.set_id, "folder": str(calib.folder.resolve()), "calls": calib.num_calls("calib"),
                     "settings": calib.settings,
                     "prompts": [s.prompt_id for s in calib.manifest.samples if s.split == "calib"]},
        quantized_layers=quantized_names, kept_layers=sorted(kept),
        evidence={"file": quant_evidence.EVIDENCE_FILE, "split": "holdout" if calib.num_calls("holdout") else "calib",
                  "bypassed_blocks": quant_evidence.quantized_blocks(quantized_names), **check})
    return entry, info


def _calibrate(module, calib, recipe, axes, held_out, bucket: int, device: str, progress: bool,
               zero_cond_t: bool = False):
    """ModelOpt calibration; returns (quantized layers, kept layer names, (high_precision, fake_quant, bypassed))."""
    def calls():
        yield from calib.export_inputs(axes, "calib", text_bucket=bucket, zero_cond_t=zero_cond_t)

    return _calibrate_module(module, recipe, held_out, calls, calib.num_calls("calib"), device, progress)


def _calibrate_module(module, recipe, held_out, calls, n_calls: int, device: str, progress: bool):
    """ModelOpt calibration of `module` (its transformer under `.transformer`, a `skip_blocks` attribute) on the
    input tuples `calls()` yields; returns (quantized layers, kept layer names, (high_precision, fake_quant,
    bypassed) outputs on `held_out`)."""
    import modelopt.torch.quantization as mtq
    from tqdm.auto import tqdm

    # References before quantizing: SmoothQuant rewrites the weights in place.
    high = quant_evidence.reference_outputs(module, held_out)
    blocks = sorted({int(n.split(".")[1]) for n, m in module.transformer.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.")
                     and not is_excluded(n, recipe)})
    bypassed = quant_evidence.reference_outputs(module, held_out, skip_blocks=blocks)

    def forward_loop(model):
        bar = tqdm(total=n_calls, desc=f"quantize {recipe['precision']} (calibrate)", unit="fwd", disable=not progress)
        for args in calls():
            model(*(a.to(device) for a in args))
            bar.update()
        bar.close()

    kept_by_recipe = sum(1 for n, m in module.transformer.named_modules()
                         if isinstance(m, torch.nn.Linear) and is_excluded(n, recipe))
    with torch.no_grad(), modelopt_quiet(kept_by_recipe, progress):
        module = mtq.quantize(module, modelopt_config(recipe), forward_loop)
    fake = quant_evidence.reference_outputs(module, held_out)
    layers, kept = qdq.from_modelopt(module, recipe["precision"])
    if not layers:
        raise QitrtError("the recipe left no layer to quantize; relax keep/keep_first_blocks/keep_last_blocks")
    wrong = [n for n in layers if is_excluded(n, recipe)]
    if wrong:
        raise QitrtError(f"internal: {wrong[0]} is excluded by the recipe but ModelOpt quantized it")
    return layers, kept, (high, fake, bypassed)


def verify_graph(path: Path, evidence_path: Path, high_precision: str, precision: str, names=None) -> dict:
    """Refuse a written graph that is not the calibrated quantization: layer by layer, its Q/DQ numbers against
    the calibrated ones (exact, any depth); end to end, its ONNX Runtime output on the held-out calls against
    the saved references (a coarse guard for what numbers alone cannot show)."""
    import onnxruntime as ort

    problems = qdq.graph_numbers_problems(onnx_io.load_structure(path), quant_evidence.load_numbers(evidence_path))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise QitrtError(f"{path}: the graph's quantization numbers are not the calibrated ones: {shown}")
    on_gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
    provider = "CUDAExecutionProvider" if on_gpu else "CPUExecutionProvider"
    if high_precision == "bf16" and not on_gpu:  # ONNX Runtime's CPU provider has no bf16 kernels
        return {"skipped": "bf16 graph and no CUDA execution provider here: check it with `qitrt parity` on a GPU",
                "provider": provider}
    calls = quant_evidence.load(evidence_path, names or input_names({}))
    sess = onnx_io.ort_session(path, provider)
    outputs = [sess.run(None, {n: t.numpy() for n, t in c["inputs"].items()})[0] for c in calls]
    del sess
    figures = quant_evidence.compare([torch.from_numpy(o) for o in outputs], calls)
    problem = quant_evidence.verdict(figures, precision)
    if problem:
        raise QitrtError(f"{path}: {problem}. Figures: {figures}")
    return {"provider": provider, **figures}


__all__ = ["QUANT_PRECISIONS", "VAE_COMPONENTS", "quantize_onnx"]
