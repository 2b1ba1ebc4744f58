"""Offline benchmark: the same images through eager torch and each engine folder, one process, one run.

For every variant (backend x engine folder) x size x batch: one warm-up call (excluded), then `repeat` timed
calls; per call the text encoder, the transformer (per step: one forward covers both CFG branches) and the
VAE decode are timed separately; the row holds medians over the repeats, images/s, peak memory, the FLOP
model's figures for the transformer and their fraction of the device's peak, and the speedup against eager
torch at the same size and batch. Rows are handed to `on_row` as they finish, so an interrupted or partly
failed run still leaves what it measured.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_image_trt.bench import devices
from qwen_image_trt.bench.timing import ComponentTimer, PeakMemory, median, stopwatch
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.models import flops
from qwen_image_trt.runtime.backends import check_backend
from qwen_image_trt.runtime.pipeline import load_pipeline

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "a red cat sitting on a window, neon sign reads WELCOME, cinematic, detailed"
EAGER = "torch"


@dataclass
class Variant:
    label: str  # "torch:fp32", "onnxruntime:fp32", "tensorrt:fp8" ...
    backend: str
    precision: str
    engines: str | None = None


@dataclass
class OfflineConfig:
    checkpoint: str
    backends: list[str] = field(default_factory=lambda: ["torch", "onnxruntime"])
    engines: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    batches: list[int] = field(default_factory=lambda: [1])
    steps: int = 4
    repeat: int = 3
    warmup: int = 1
    cfg: bool = True
    true_cfg_scale: float = 4.0
    device: str = "cpu"
    torch_dtype: str = "fp32"
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    progress: bool = True


def _engine_precision(manifest) -> str:
    return manifest.precision


def _usable(manifest, backend: str) -> bool:
    comps = manifest.components
    return all(c in comps and (backend != "tensorrt" or comps[c].tensorrt is not None)
               for c in ("transformer", "vae_decoder"))


def plan_variants(cfg: OfflineConfig) -> tuple[list[Variant], list[str]]:
    """Check backends and engine folders before any heavy work; (variants, notes). Eager torch comes first."""
    notes = []
    backends = [b.strip() for b in cfg.backends if b.strip()]
    if not backends:
        raise InputError("backends", cfg.backends, "at least one of torch, onnxruntime, tensorrt")
    for b in backends:
        check_backend(b)
    if EAGER not in backends:
        backends.insert(0, EAGER)
        notes.append("eager torch added: speedups are measured against it in the same run")
    manifests = {}
    for e in cfg.engines:
        if not Path(e).is_dir():
            raise InputError("engines", str(e), "an existing engine folder made by `qitrt export`/`qitrt build`")
        try:
            manifests[str(e)] = read_manifest(e)
        except QitrtError as err:
            raise InputError("engines", str(e), str(err)) from None
    variants = []
    for b in backends:
        if b == EAGER:
            variants.append(Variant(f"torch:{cfg.torch_dtype}", EAGER, cfg.torch_dtype))
            continue
        usable = [e for e, m in manifests.items() if _usable(m, b)]
        if not usable:
            what = "TensorRT engines (`qitrt build`)" if b == "tensorrt" else "ONNX graphs (`qitrt export`)"
            raise InputError("engines", cfg.engines or None,
                             f"an engine folder with transformer and vae_decoder {what} for backend {b}")
        for e in usable:
            prec = _engine_precision(manifests[e])
            label = f"{b}:{prec}"
            if any(v.label == label for v in variants):
                label = f"{label}:{Path(e).name}"
            variants.append(Variant(label, b, prec, e))
    for s in cfg.sizes:
        for n, v in zip(("width", "height"), s):
            if v % 16 or v < 16:
                raise InputError(f"size {n}", v, "a multiple of 16 (VAE x8, then 2x2 latent packing)")
    if any(b < 1 for b in cfg.batches):
        raise InputError("batch", cfg.batches, "positive integers")
    if cfg.steps < 1 or cfg.repeat < 1 or cfg.warmup < 0:
        raise InputError("steps/repeat", (cfg.steps, cfg.repeat), "steps >= 1, repeat >= 1, warmup >= 0")
    return variants, notes


def _load(cfg: OfflineConfig, v: Variant):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.torch_dtype] \
        if v.backend == EAGER else None
    return load_pipeline(cfg.checkpoint, engines=v.engines, backend=v.backend, device=cfg.device, dtype=dtype)


def _call(pipe, cfg: OfflineConfig, width: int, height: int, batch: int, seed: int):
    import torch

    kwargs = dict(prompt=[cfg.prompt] * batch, height=height, width=width, num_inference_steps=cfg.steps,
                  generator=torch.Generator().manual_seed(seed), output_type="pil")
    if cfg.cfg:
        kwargs.update(negative_prompt=" ", true_cfg_scale=cfg.true_cfg_scale)
    return pipe(**kwargs).images


def measure_cell(pipe, cfg: OfflineConfig, v: Variant, width: int, height: int, batch: int,
                 peak: devices.DevicePeak | None) -> dict:
    row = dict(label=v.label, backend=v.backend, precision=v.precision, engines=v.engines, size=f"{width}x{height}",
               width=width, height=height, batch=batch, steps=cfg.steps, cfg=cfg.cfg, repeats=cfg.repeat,
               warmup=cfg.warmup)
    runs = []
    with ComponentTimer(pipe, cfg.device) as timer, PeakMemory(cfg.device) as mem:
        for w in range(cfg.warmup):
            _call(pipe, cfg, width, height, batch, cfg.seed + w)
        for r in range(cfg.repeat):
            timer.reset()
            with stopwatch(cfg.device) as elapsed:
                images = _call(pipe, cfg, width, height, batch, cfg.seed + r)
            total = elapsed()
            if len(images) != batch:
                raise RuntimeError(f"{v.label}: asked for {batch} images, got {len(images)}")
            t = timer.totals()
            runs.append(dict(latency_s=total, text_encoder_s=t["text_encoder"], vae_decode_s=t["vae_decode"],
                             transformer_total_s=t["transformer"],
                             transformer_step_s=median(timer.calls["transformer"]),
                             transformer_calls=len(timer.calls["transformer"]),
                             other_s=total - sum(t.values())))
        shape = timer.transformer_shapes[0] if timer.transformer_shapes else None
    for key in ("latency_s", "text_encoder_s", "transformer_step_s", "transformer_total_s", "vae_decode_s", "other_s"):
        row[key] = median(r[key] for r in runs)
    row["latency_all_s"] = [r["latency_s"] for r in runs]
    row["transformer_calls"] = runs[0]["transformer_calls"]
    row["images_per_s"] = batch / row["latency_s"]
    row["peak_memory_bytes"], row["memory_kind"] = mem.peak_bytes, mem.source
    row.update(_flop_figures(pipe, v, shape, row, peak, cfg.device))
    return row


def _flop_figures(pipe, v: Variant, shape, row: dict, peak, device) -> dict:
    if shape is None:
        return {}
    b, image_tokens, text_tokens = shape
    precision = v.precision if v.precision in flops.WEIGHT_BYTES else "bf16"
    cost = flops.forward_cost(dict(pipe.transformer.config), image_tokens, text_tokens, b, precision)
    step = row["transformer_step_s"]
    achieved = cost.flops / step if step else None
    out = dict(transformer_forward=dict(batch=b, image_tokens=image_tokens, text_tokens=text_tokens),
               flops_per_step=cost.flops, bytes_per_step=cost.bytes, params=cost.params,
               transformer_flops_per_s=achieved,
               roofline_fraction=devices.roofline_fraction(achieved, peak, precision, device))
    floor = cost.floor_seconds(peak.peak_flops(precision) if peak else None, peak.bytes_per_s if peak else None)
    out["floor_step_s"] = floor
    image_flops = cost.flops * row["transformer_calls"]
    out["image_flops"] = image_flops  # transformer FLOPs behind one call of `batch` images
    out["image_roofline_fraction"] = devices.roofline_fraction(image_flops / row["latency_s"], peak, precision,
                                                               device)
    return out


def add_speedups(rows: list[dict]) -> None:
    """Speedup of every row against the eager torch row at the same size and batch (same run)."""
    eager = {(r["size"], r["batch"]): r for r in rows if r.get("backend") == EAGER and "latency_s" in r}
    for r in rows:
        base = eager.get((r.get("size"), r.get("batch")))
        if base is None or "latency_s" not in r:
            continue
        r["speedup_vs_eager"] = base["latency_s"] / r["latency_s"]
        if base.get("transformer_step_s") and r.get("transformer_step_s"):
            r["step_speedup_vs_eager"] = base["transformer_step_s"] / r["transformer_step_s"]


def run_offline(cfg: OfflineConfig, on_update=None) -> dict:
    """Run the sweep; `on_update(result)` is called after every row (for partial writes). Returns the result."""
    variants, notes = plan_variants(cfg)
    peak, peak_note = devices.peak_for(cfg.device)
    result = dict(kind="offline", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  machine=devices.machine_info(cfg.device),
                  config=dict(asdict(cfg), sizes=[f"{w}x{h}" for w, h in cfg.sizes]),
                  variants=[asdict(v) for v in variants], rows=[], errors=[], notes=notes + [peak_note],
                  complete=False)
    if peak is None:
        result["notes"].append("roofline fractions are n/a: no peak FLOP/s known for this device")
    update = on_update or (lambda r: None)
    from tqdm.auto import tqdm

    cells = [(v, s, b) for v in variants for s in cfg.sizes for b in cfg.batches]
    bar = tqdm(total=len(cells), desc="bench offline", unit="cell", disable=not cfg.progress)
    try:
        for v in variants:
            mine = [c for c in cells if c[0] is v]
            try:
                t0 = time.perf_counter()
                pipe = _load(cfg, v)
                load_s = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 (a variant that cannot load is reported, the others still run)
                log.warning("bench: %s failed to load: %s", v.label, e)
                result["errors"].append(dict(label=v.label, stage="load", error=f"{type(e).__name__}: {e}"))
                bar.update(len(mine))
                update(result)
                continue
            for _, (w, h), b in mine:
                bar.set_postfix_str(f"{v.label} {w}x{h} b{b}")
                try:
                    row = measure_cell(pipe, cfg, v, w, h, b, peak)
                    row["load_s"] = load_s
                    line = _progress_line(row)  # first: a row it cannot format must not be half-recorded
                    result["rows"].append(row)
                    bar.write(line)
                except Exception as e:  # noqa: BLE001
                    log.warning("bench: %s %dx%d batch %d failed: %s", v.label, w, h, b, e)
                    result["errors"].append(dict(label=v.label, size=f"{w}x{h}", batch=b, stage="run",
                                                 error=f"{type(e).__name__}: {e}"))
                add_speedups(result["rows"])
                bar.update(1)
                update(result)
            del pipe
            gc.collect()
        result["complete"] = True
    finally:
        bar.close()
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        add_speedups(result["rows"])
        update(result)
    return result


def _progress_line(row: dict) -> str:
    frac = row.get("roofline_fraction")
    frac = f"{frac:.1%}" if isinstance(frac, float) else frac
    return (f"{row['label']:20s} {row['size']:>9s} b{row['batch']:<2d} {row['latency_s'] * 1e3:9.1f} ms/call "
            f"{row['images_per_s']:7.2f} img/s  step {row['transformer_step_s'] * 1e3:8.2f} ms  peak {frac}")
