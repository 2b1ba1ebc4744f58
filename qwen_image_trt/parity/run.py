"""`qitrt parity`: an engine folder against eager torch, per forward, per denoising step, and on images.

The comparator does not care which backends it compares: the reference is always the eager torch
runner/pipeline, the candidate any backend that can load the engine folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from qwen_image_trt.core import quant_evidence
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import check_engines_match, read_manifest
from qwen_image_trt.core.shapes import parse_size as _size, torch_dtype
from qwen_image_trt.models.checkpoint import checkpoint_identity, is_qwen21, read_config, validate_checkpoint
from qwen_image_trt.models.condition_images import sample_image_inputs
from qwen_image_trt.models.lora import recorded_loras
from qwen_image_trt.models.sampling import SamplingRecipe
from qwen_image_trt.models.pipelines import pipeline_kind, shipped_sigmas
from qwen_image_trt.runtime.transformer21 import COMPONENTS as COMPONENTS_21
from qwen_image_trt.models.specs import SPECS, spec_for
from qwen_image_trt.parity import metrics
from qwen_image_trt.parity.gates import Gates, apply_gates, gates_for
from qwen_image_trt.parity.report import write_html
from qwen_image_trt.runtime.backends import check_backend, make_runner, trt_options
from qwen_image_trt.runtime.limits import check_size
from qwen_image_trt.runtime.pipeline import load_pipeline
from qwen_image_trt.runtime.limits import check_threshold

DEFAULT_SIZES = [(64, 64), (96, 64), (64, 128)]  # (width, height): square and non-square
DEFAULT_BATCHES = [1, 2]
DEFAULT_TEXT_LENS = [7, 32]
PROMPTS = [("a red fox sitting in the snow, watercolor", " "),
           ("一只猫坐在窗台上, neon sign that reads OPEN", "blurry, low quality")]


@dataclass
class ParityConfig:
    checkpoint: Path
    engines: Path
    out: Path
    backend: str = "onnxruntime"
    steps: int | None = None  # None: the steps of the recipe the engines were made for, else 4
    sizes: list[tuple[int, int]] = field(default_factory=lambda: list(DEFAULT_SIZES))
    batches: list[int] = field(default_factory=lambda: list(DEFAULT_BATCHES))
    text_lens: list[int] = field(default_factory=lambda: list(DEFAULT_TEXT_LENS))
    image_size: tuple[int, int] = (128, 128)
    seed: int = 0
    gate_overrides: list[str] = field(default_factory=list)
    device: str = "cpu"  # TensorRT needs cuda
    reference_dtype: str = "fp32"  # bf16 for real checkpoints on one GPU: fp32 Qwen-Image is ~80 GB
    progress: bool = True
    trt_options: dict = field(default_factory=dict)  # TensorRTRunner options (weight streaming budget, graphs)
    step_cache: list[float] = field(default_factory=list)  # thresholds: the engine re-run with each, vs eager

    @classmethod
    def from_cli(cls, a) -> "ParityConfig":
        cfg = cls(checkpoint=Path(a.checkpoint), engines=Path(a.engines), out=Path(a.out), backend=a.backend,
                  steps=a.steps, seed=a.seed, gate_overrides=list(a.gate), device=a.device,
                  reference_dtype=a.reference_dtype)
        cfg.trt_options = trt_options(a.trt_weight_streaming_budget, a.trt_cuda_graphs)
        if a.sizes:
            cfg.sizes = [_size(s) for s in a.sizes.split(",")]
        if a.batches:
            cfg.batches = [int(b) for b in a.batches.split(",")]
        if a.image_size:
            cfg.image_size = a.image_size
        if a.step_cache:
            cfg.step_cache = [x for x in (t.strip() for t in a.step_cache.split(",")) if x]
        return cfg


@dataclass
class ParityReport:
    data: dict
    html_path: Path

    @property
    def passed(self) -> bool:
        return self.data["passed"]

    def summary(self) -> str:
        d = self.data
        verdict = "PASS" if d["passed"] else "FAIL"
        lines = [f"parity {d['backend']} {d['precision']} vs eager torch {d['reference_dtype']}: {verdict}"]
        for g in d["gates"]:
            value = "identical" if g["name"] == "image_psnr_min" and g["value"] >= metrics.PSNR_CAP_DB else f"{g['value']:.6g}"
            lines.append(f"  {'ok ' if g['ok'] else 'BAD'} {g['name']:22s} {value} "
                         f"({'>=' if g['kind'] == 'min' else '<='} {g['limit']:g})")
        for t in sorted({r["threshold"] for r in d.get("step_cache") or []}):
            rows = [r for r in d["step_cache"] if r["threshold"] == t]
            skipped = sum(r["skipped"] for r in rows) / max(1, sum(r["skipped"] + r["computed"] for r in rows))
            lines.append(f"  step cache {t:g}: {skipped:.0%} of transformer row-steps skipped, worst image PSNR "
                         f"{min(r['psnr_db'] for r in rows):.1f} dB (informational)")
        return "\n".join(lines)


def _validate(cfg: ParityConfig) -> tuple[dict, Gates]:
    check_backend(cfg.backend)
    if cfg.backend == "torch":
        raise InputError("backend", "torch", "an engine backend (onnxruntime or tensorrt): torch is the reference")
    if cfg.steps is not None and cfg.steps < 2:
        raise InputError("steps", cfg.steps, "an integer >= 2 (Qwen-Image's scheduler needs two)")
    if cfg.reference_dtype not in ("fp32", "bf16", "fp16"):
        raise InputError("reference_dtype", cfg.reference_dtype, "one of fp32, bf16, fp16")
    for w, h in [*cfg.sizes, cfg.image_size]:
        check_size("width", w, (16, 4096))
        check_size("height", h, (16, 4096))
    if any(b < 1 for b in cfg.batches):
        raise InputError("batches", cfg.batches, "integers >= 1")
    cfg.step_cache = [check_threshold(t, "step_cache") for t in cfg.step_cache]
    if None in cfg.step_cache:
        raise InputError("step_cache", 0, "thresholds > 0: the uncached run is always measured")
    root = validate_checkpoint(cfg.checkpoint)
    if is_qwen21(root):
        if cfg.step_cache:
            raise InputError("step_cache", cfg.step_cache, "none for Qwen-Image-2.1 (its prefix KV cache is compared "
                             "instead: every image is made with and without it)")
        for w, h in [*cfg.sizes, cfg.image_size]:
            check_size("width", w, (32, 4096), 32)
            check_size("height", h, (32, 4096), 32)
    if not Path(cfg.engines).is_dir():
        raise InputError("engines", str(cfg.engines), "an existing engine folder")
    manifest = read_manifest(cfg.engines)
    check_engines_match(manifest, checkpoint_identity(root), cfg.engines)
    if cfg.steps is None:  # engines made for a few-step recipe are checked at its step count
        cfg.steps = max(2, int(manifest.sampling["steps"])) if manifest.sampling else 4
    return manifest, gates_for(manifest.precision).override(cfg.gate_overrides)


OUTPUTS_FILE = "outputs.safetensors"  # every eager and engine tensor the figures were computed from


def run_parity(cfg: ParityConfig) -> ParityReport:
    """Run all comparisons, write report.json + report.html + images + the compared outputs to cfg.out."""
    from safetensors.torch import save_file

    manifest, gates = _validate(cfg)  # everything cheap first: no model is loaded before this passes
    # Engines with LoRAs merged at build are compared with eager running the same adapters.
    loras = recorded_loras(manifest.loras, cfg.engines)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    saved: dict[str, torch.Tensor] = {}
    forward = _per_forward(cfg, saved, loras)
    steps, images, cached = _per_step_and_images(cfg, saved, loras, SamplingRecipe.from_record(manifest.sampling))
    quantization = _quantization(cfg, manifest)
    save_file({k: v.detach().cpu().float().contiguous() for k, v in saved.items()}, str(cfg.out / OUTPUTS_FILE))
    data = {
        "backend": cfg.backend, "precision": manifest.precision,
        "checkpoint": str(cfg.checkpoint), "engines": str(cfg.engines),
        "checkpoint_identity": manifest.checkpoint.identity, "seed": cfg.seed, "steps": cfg.steps,
        "device": cfg.device, "reference_dtype": cfg.reference_dtype,
        "forward": forward, "per_step": steps, "images": images, "quantization": quantization,
        "step_cache": cached,
        "loras": manifest.loras, "sampling": manifest.sampling,
        "outputs_file": OUTPUTS_FILE, "gate_limits": gates.as_dict(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    data["gates"] = apply_gates(data, gates)
    data["passed"] = all(g["ok"] for g in data["gates"])
    (cfg.out / "report.json").write_text(json.dumps(data, indent=2, default=float) + "\n")
    return ParityReport(data, write_html(data, cfg.out))


def _forward_cases(cfg: ParityConfig, component: str) -> list[dict]:
    if component == "transformer":
        return [dict(batch=b, grid=(h // 16, w // 16), text_len=t)
                for b in cfg.batches for (w, h) in cfg.sizes for t in cfg.text_lens]
    if component.startswith("transformer_"):  # Qwen-Image-2.1's passes: with and without a condition image (the
        # output's grid), prompts split around it, the last one padded where the batch has several
        return [dict(batch=b, target=(h // 16, w // 16), text=(max(1, t // 2), max(1, t - t // 2)),
                     cond=(h // 16, w // 16) if i % 2 else None, pad=min(2, t - 1) if b > 1 else 0)
                for b in cfg.batches for (w, h) in cfg.sizes for i, t in enumerate(cfg.text_lens)]
    return [dict(batch=b, height=h, width=w) for b in cfg.batches for (w, h) in cfg.sizes]


def _per_forward(cfg: ParityConfig, saved: dict, loras=()) -> list[dict]:
    rows = []
    qwen21 = is_qwen21(cfg.checkpoint)
    exported = read_manifest(cfg.engines).components
    for component in [c for c in (*COMPONENTS_21, "vae_decoder") if c in exported] if qwen21 \
            else ("transformer", "vae_decoder"):
        config = read_config(cfg.checkpoint, SPECS[component].part)
        spec = spec_for(component, config)
        ref = make_runner("torch", component, checkpoint=cfg.checkpoint, device=cfg.device,
                          precision=cfg.reference_dtype, loras=loras)
        got = make_runner(cfg.backend, component, engines_dir=cfg.engines, device=cfg.device,
                          trt_options=cfg.trt_options)
        cases = _forward_cases(cfg, component)
        with ref, got:
            for i, case in enumerate(tqdm(cases, desc=f"parity {component}", disable=not cfg.progress)):
                args = spec.sample_inputs(config, **case, seed=cfg.seed + i)
                feeds = {n: a.to(cfg.device) for n, a in zip(spec.input_names, args)}
                out_name = spec.output_names[0]
                want, have = ref.infer(feeds)[out_name], got.infer(feeds)[out_name]
                key = f"forward.{len(rows)}"
                saved[f"{key}.eager"], saved[f"{key}.engine"] = want, have
                rows.append({"component": component, "key": key,
                             **{k: list(v) if isinstance(v, tuple) else v for k, v in case.items()},
                             **metrics.tensor_metrics(want, have)})
    return rows


def _per_step_and_images(cfg: ParityConfig, saved: dict, loras=(), recipe=None) -> tuple[list, list, list]:
    from PIL import Image

    qwen21 = is_qwen21(cfg.checkpoint)
    # 2.1 (and 2.1-Turbo, whose shipped sigma grid the stock QwenImage21Pipeline runs as well): diffusers' own class
    member = "qwen-image-2.1" if qwen21 else None
    eager = load_pipeline(cfg.checkpoint, backend="torch", batch_cfg=False, device=cfg.device,
                          dtype=torch_dtype(cfg.reference_dtype), pipeline=member)  # the stock two-call loop
    if loras:  # diffusers' own LoRA path (PEFT layers): the reference for adapters merged at build
        names = [f"lora{i}" for i in range(len(loras))]
        for name, spec in zip(names, loras):
            eager.load_lora_weights(str(spec.path), adapter_name=name)
        eager.set_adapters(names, [spec.scale for spec in loras])
    if recipe is not None:  # the engine pipeline has it from its manifest; the reference runs the same schedule
        recipe.apply(eager)
    engine = load_pipeline(cfg.checkpoint, engines=cfg.engines, backend=cfg.backend, device=cfg.device,
                           trt_options=cfg.trt_options, pipeline=member)
    width, height = cfg.image_size
    steps, images, cached = [], [], []
    kind = pipeline_kind(cfg.checkpoint, member)
    turbo = qwen21 and shipped_sigmas(cfg.checkpoint) is not None
    edits = "vae_encoder" in read_manifest(cfg.engines).components
    for r, (k, (prompt, negative), extra) in enumerate(_image_runs(qwen21, cfg, edits, tqdm(
            PROMPTS, desc="parity images", disable=not cfg.progress))):
        # edit members: shipped condition images (2.1: `_image_runs` says which runs edit)
        inputs = extra if qwen21 else sample_image_inputs(kind, seed=cfg.seed + k)
        if turbo:  # Turbo runs without guidance at its own steps
            negative = None
        runs = {}
        for name, pipe in (("eager", eager), ("engine", engine)):
            latents = []

            def keep(p, i, t, kw, latents=latents):
                latents.append(kw["latents"].clone())
                return {}

            start = time.perf_counter()
            img = pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0 if negative else 1.0,
                       height=height, width=width, num_inference_steps=cfg.steps,
                       generator=torch.Generator().manual_seed(cfg.seed + k), output_type="np",
                       callback_on_step_end=keep, **inputs).images[0]
            runs[name] = ((img * 255).round().clip(0, 255).astype(np.uint8), latents, time.perf_counter() - start)
        (ref_img, ref_lat, _), (got_img, got_lat, engine_s) = runs["eager"], runs["engine"]
        for threshold in cfg.step_cache:  # steps skipped against image quality, each threshold vs eager uncached
            start = time.perf_counter()
            img = engine(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, height=height, width=width,
                         num_inference_steps=cfg.steps, generator=torch.Generator().manual_seed(cfg.seed + k),
                         output_type="np", step_cache=threshold, **inputs).images[0]
            seconds = time.perf_counter() - start
            img = (img * 255).round().clip(0, 255).astype(np.uint8)
            cached.append({"prompt": k, "threshold": threshold, **engine.step_cache_stats.as_dict(),
                           "psnr_db": metrics.psnr(ref_img, img), "ssim": metrics.ssim(ref_img, img),
                           "seconds": round(seconds, 4), "uncached_seconds": round(engine_s, 4),
                           "speedup": round(engine_s / seconds, 3)})
        for i, (a, b) in enumerate(zip(ref_lat, got_lat)):
            key = f"step.{r}.{i}"
            saved[f"{key}.eager"], saved[f"{key}.engine"] = a, b
            steps.append({"prompt": k, "step": i, "key": key, **metrics.tensor_metrics(a, b),
                          **({"kv_cache": inputs["use_kv_cache"]} if "use_kv_cache" in inputs else {})})
        files = {}
        for name, arr in (("eager", ref_img), ("engine", got_img), ("diff", metrics.diff_image(ref_img, got_img))):
            files[name] = f"prompt{r}_{name}.png"
            Image.fromarray(arr).save(cfg.out / files[name])
        images.append({"prompt": prompt, "negative_prompt": negative, "seed": cfg.seed + k, "size": [width, height],
                       "pipeline": kind, "input_images": [list(im.size) for im in _as_list(inputs.get("image"))],
                       **({"kv_cache": inputs["use_kv_cache"]} if "use_kv_cache" in inputs else {}),
                       "psnr_db": metrics.psnr(ref_img, got_img), "ssim": metrics.ssim(ref_img, got_img),
                       "max_abs_levels": int(np.abs(ref_img.astype(int) - got_img.astype(int)).max()),
                       "files": files})
    return steps, images, cached


def _image_runs(qwen21: bool, cfg: ParityConfig, edits: bool, prompts):
    """(prompt index, (prompt, negative), extra pipeline kwargs) per image compared. Qwen-Image-2.1: each prompt
    with the prefix KV cache and without (the stock `use_kv_cache`), the second with a condition image (editing)
    where the folder has a vae_encoder (`edits`)."""
    for k, pair in enumerate(prompts):
        if not qwen21:
            yield k, pair, {}
            continue
        edit = {}
        if k % 2 and edits:
            from qwen_image_trt.models.condition_images import condition_image
            from qwen_image_trt.core.shapes import condition_resolution

            edit = {"image": condition_image(cfg.seed + k),
                    "output_resolution": condition_resolution(cfg.image_size[1], cfg.image_size[0])}
        for cache in (True, False):
            yield k, pair, {**edit, "use_kv_cache": cache}


def _as_list(image) -> list:
    return [] if image is None else image if isinstance(image, list) else [image]


def _quantization(cfg: ParityConfig, manifest) -> dict | None:
    """A quantized engine folder's evidence (held-out calls with high-precision, fake-quant and bypassed
    outputs, saved by the quantize stage), recomputed on this backend."""
    q = manifest.quantization
    if q is None or not q.evidence or not q.evidence.get("file"):
        return None
    path = Path(cfg.engines) / q.evidence["file"]
    if not path.is_file():
        return {"skipped": f"{path} is missing: rebuild the quantized engine folder"}
    from qwen_image_trt.models.transformer_export import input_names

    if "transformer_cached" in manifest.components:  # Qwen-Image-2.1: the first step end to end on both graphs
        calls = quant_evidence.load(path, quant_evidence.E2E_INPUTS_21)
        runners = {n: make_runner(cfg.backend, f"transformer_{n}", engines_dir=cfg.engines, device=cfg.device,
                                  trt_options=cfg.trt_options) for n in ("extract", "cached")}

        def run(name, output):
            return lambda feeds: runners[name].infer({k: v.to(cfg.device) for k, v in feeds.items()})[output]

        with runners["extract"], runners["cached"]:
            outputs = [quant_evidence.run_end_to_end_21(run("extract", "prefix_kv"), run("cached", "noise_pred"),
                                                        c["inputs"]).cpu() for c in calls]
        return {**quant_evidence.compare(outputs, calls), "evidence_file": q.evidence["file"],
                "bypassed_blocks": q.evidence.get("bypassed_blocks")}
    calls = quant_evidence.load(path, input_names(manifest.checkpoint.transformer_config or {}))
    runner = make_runner(cfg.backend, "transformer", engines_dir=cfg.engines, device=cfg.device,
                         trt_options=cfg.trt_options)
    with runner:
        outputs = [runner.infer({k: v.to(cfg.device) for k, v in c["inputs"].items()})["noise_pred"].cpu()
                   for c in calls]
    return {**quant_evidence.compare(outputs, calls), "evidence_file": q.evidence["file"],
            "bypassed_blocks": q.evidence.get("bypassed_blocks")}
