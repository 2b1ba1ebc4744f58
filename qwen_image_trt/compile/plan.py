"""What a build will need (disk, host RAM, GPU memory, time) and whether this machine has it, said up front.

Nothing is loaded: the figures come from
- the checkpoint's safetensors headers (`weights_info`): parameters and dtype of transformer, text encoder, VAE;
- the scale fit `data/scale_fit.json`, made by `benchmarks/scale_build.py` from real-width checkpoints (width 3072,
  1, 2 and 4 of the 60 blocks): per stage and precision, peak RSS, seconds and disk = fixed + per_weight_byte * x
  (x: the bytes the stage holds, e.g. the transformer's weights in the export precision). Export, calibration,
  quantization and the ONNX Runtime engine were measured in separate processes on CPU;
- FLOP counts (`models.flops`) for the forwards of the calibration settings asked for (the fit's calibration was
  2 prompts x 2 steps at 64x64), at a rate: the fit machine's measured CPU matmul rate, or a GPU's datasheet peak,
  each times an efficiency;
- rules of thumb, named as such in `basis`, for what could not be measured on a CPU: GPU memory (weights as the
  stage holds them + one forward's activations + CUDA context) and TensorRT builds (host: the ONNX weights twice;
  GPU: the weights + activations at the largest profile + builder workspace).

`BuildPlan.check()` refuses before any stage runs, naming each figure that does not fit and what to do instead;
`summary()` gives the table. Stages are planned in full even if an earlier run left their outputs (their bytes
already under --out are not asked for again); pass --no-resource-check when earlier stages ran on another machine.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from qwen_image_trt.core.errors import QitrtError

log = logging.getLogger(__name__)

GB = 1e9
FIT_FILE = Path(__file__).resolve().parent / "data" / "scale_fit.json"
WIDTH = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
PROMPT_TOKENS = 128  # text tokens per prompt after the template (shipped prompts: ~20-80; mask and bucket add some)
TEMPLATE_TOKENS = 34  # the chat template the text encoder also reads (dropped afterwards)
CUDA_CONTEXT = int(1.5 * GB)  # CUDA context, cuBLAS workspaces, allocator slack
TRT_WORKSPACE = int(4 * GB)  # TensorRT builder tactics (rule of thumb)
TRT_HOST_COPIES = 2.0  # TensorRT build on the host: the parsed ONNX weights + the builder's copy (rule of thumb)
TRT_SECONDS = (600.0, 60.0 / GB)  # TensorRT build: 10 min + 1 min per GB of weights (rule of thumb)
CPU_EFFICIENCY = 0.5  # a transformer forward on CPU vs a square fp32 matmul
GPU_EFFICIENCY = 0.4  # vs the datasheet peak (eager torch, batch 1, fake quantization in quantize)
UNKNOWN_GPU_FLOPS = {"fp32": 20e12, "bf16": 150e12, "fp16": 150e12}
CPU_FLOPS_DEFAULT = 40e9
# Block parts in units of dim^2 (weights of one double-stream block: 36 dim^2), for graphs that keep some parts
PART_UNITS = {"attn": 8, "img_mlp": 8, "txt_mlp": 8, "img_mod": 6, "txt_mod": 6, "attn.to_q": 1, "attn.to_k": 1,
              "attn.to_v": 1, "attn.add_q_proj": 1, "attn.add_k_proj": 1, "attn.add_v_proj": 1, "attn.to_out": 1,
              "attn.to_add_out": 1}
BLOCK_UNITS = 36

# Used when data/scale_fit.json is missing (a source tree without it): the committed fit (benchmarks/results/scale,
# 1/2/4 real-width blocks on a 2-core CPU), rounded up. (fixed bytes or s, per weight byte)
def _c(rss, sec, disk):
    return {"peak_rss_bytes": {"fixed": rss[0], "per_weight_byte": rss[1]},
            "seconds": {"fixed": sec[0], "per_weight_byte": sec[1]},
            "disk_bytes": {"fixed": disk[0], "per_weight_byte": disk[1]}}


FALLBACK_FIT = {
    "stages": {
        "export": {"fp32": _c((0.4e9, 1.7), (20.0, 7e-9), (0.0, 1.0)),
                   "bf16": _c((0.8e9, 1.05), (20.0, 9e-9), (0.0, 1.0))},
        "calibrate": {"fp32": _c((0.4e9, 1.5), (5.0, 1e-9), (1e7, 0.0))},
        "quantize": {"fp32": _c((0.8e9, 1.5), (5.0, 1e-8), (0.0, 0.26)),
                     "bf16": _c((1.5e9, 1.55), (5.0, 2e-8), (0.0, 0.51))},
        "ort_engine": {"fp32": _c((0.2e9, 1.05), (5.0, 2.1e-9), (0.0, 1.0))},
    },
    "cpu_matmul_flops_per_s": CPU_FLOPS_DEFAULT,
    "source": "built-in fallback (data/scale_fit.json missing)",
}


@lru_cache(maxsize=1)
def load_fit(path: str | None = None) -> dict:
    """The scale fit plan figures come from: data/scale_fit.json, or the built-in fallback."""
    p = Path(path) if path else FIT_FILE
    try:
        fit = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        log.warning("plan: %s unreadable (%s); using the built-in coefficients", p, e)
        return FALLBACK_FIT
    if not isinstance(fit, dict) or not isinstance(fit.get("stages"), dict):
        log.warning("plan: %s has no 'stages'; using the built-in coefficients", p)
        return FALLBACK_FIT
    return fit


def _coef(fit: dict, kind: str, precision: str, metric: str) -> tuple[float, float, str]:
    """(fixed, per_weight_byte, source) for a stage kind at a (high) precision: fp16 shares bf16's coefficients;
    a precision the fit lacks borrows the kind's fp32 ones (x is in bytes, so the per-byte factor carries over)."""
    stage = fit["stages"].get(kind) or FALLBACK_FIT["stages"][kind]
    key = "bf16" if precision == "fp16" else precision
    if not (stage.get(key) or {}).get(metric):
        key = "fp32" if (stage.get("fp32") or {}).get(metric) else None
    c = stage[key][metric] if key else FALLBACK_FIT["stages"][kind]["fp32"][metric]
    if float(c["per_weight_byte"]) <= 0 and metric == "seconds":
        # A time fit spoiled by a busy machine (a negative slope) says nothing: use the fp32 fit or the built-in one.
        other = (stage.get("fp32") or {}).get(metric)
        if key != "fp32" and other and float(other["per_weight_byte"]) > 0:
            c, key = other, "fp32"
        else:
            c, key = FALLBACK_FIT["stages"][kind]["fp32"][metric], "fallback"
    return float(c["fixed"]), float(c["per_weight_byte"]), f"{kind}/{key or 'fallback'}"


def _linear(fit: dict, kind: str, precision: str, metric: str, x: float) -> float:
    fixed, per, _ = _coef(fit, kind, precision, metric)
    return max(0.0, fixed + per * x)


@dataclass
class StagePlan:
    """One stage: where it runs and what it needs (bytes; None = not used)."""

    stage: str  # export | calibrate | quantize | lint | engine
    device: str  # cpu | cuda[:N]
    precision: str
    host_bytes: int
    gpu_bytes: int | None
    disk_bytes: int
    seconds: float
    basis: list[str] = field(default_factory=list)
    cuda_host_bytes: int | None = None  # host RAM the stage would need with --device cuda (for the hint)
    note: str = ""


@dataclass
class BuildPlan:
    """What the build needs, what this machine has, and the verdict."""

    precision: str
    target: str
    device: str
    out: str
    weights: dict  # part -> {"parameters", "bytes", "precision"}
    stages: list[StagePlan] = field(default_factory=list)
    needs: dict[str, int] = field(default_factory=dict)  # disk, host_memory, gpu_memory (peaks over stages)
    has: dict[str, int | None] = field(default_factory=dict)
    existing_bytes: int = 0  # already under --out (not asked for again)
    fit_source: str = ""

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)

    def _worst(self, attr: str) -> StagePlan | None:
        return max((s for s in self.stages if getattr(s, attr)), key=lambda s: getattr(s, attr), default=None)

    def problems(self) -> list[str]:
        """One sentence per figure that does not fit this machine; empty when the build fits."""
        out = []
        disk, free = self.needs.get("disk", 0), self.has.get("disk")
        if free is not None and disk > free:
            parts = ", ".join(f"{s.stage} {_gb(s.disk_bytes)}" for s in self.stages if s.disk_bytes)
            out.append(f"the {self.precision} build needs {_gb(disk)} of disk in {self.out} ({parts}), which has "
                       f"{_gb(free)} free: free space or pick another --out")
        ram = self.has.get("host_memory")
        for s in self.stages:
            if ram is not None and s.host_bytes > ram:
                out.append(f"{s.stage} in {s.precision} on {s.device} needs {_gb(s.host_bytes)} host RAM, this "
                           f"machine has {_gb(ram)} available: {self._ram_hint(s)}")
        gpu = self.has.get("gpu_memory")
        for s in self.stages:
            if s.gpu_bytes is None:
                continue
            if gpu is None:
                out.append(f"{s.stage} in {s.precision} on {s.device} needs {_gb(s.gpu_bytes)} GPU memory, this "
                           f"machine has no CUDA device: {self._gpu_hint(s)}")
            elif s.gpu_bytes > gpu:
                out.append(f"{s.stage} in {s.precision} on {s.device} needs {_gb(s.gpu_bytes)} GPU memory, "
                           f"{s.device} has {_gb(gpu)}: {self._gpu_hint(s)}")
        return out

    def _ram_hint(self, s: StagePlan) -> str:
        if s.stage in ("calibrate", "quantize") and not s.device.startswith("cuda"):
            return (f"use --device cuda (then it needs ~{_gb(s.cuda_host_bytes)} host RAM and the weights on the "
                    "GPU) or a machine with more RAM")
        if s.stage == "export":
            return ("export runs on the CPU and holds the transformer once in the export precision: run it on a "
                    "machine with more RAM and reuse its folder (then --no-resource-check here)")
        return "use a machine with more RAM"

    def _gpu_hint(self, s: StagePlan) -> str:
        if s.stage == "engine":
            return "build on a GPU with more memory (engines are tied to the GPU model they are built on)"
        return f"use a bigger GPU, or --device cpu on a host with {_gb(s.cuda_host_bytes or s.host_bytes)} RAM"

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise QitrtError("this machine cannot hold the build (estimated from the checkpoint's headers and the "
                             "measured scale fit, see docs/real-model.md; --no-resource-check builds anyway):\n  - "
                             + "\n  - ".join(problems))

    def summary(self) -> list[str]:
        """Human-readable lines: per stage device, host RAM, GPU memory, disk and time; the machine; the basis."""
        t = self.weights.get("transformer", {})
        lines = [(f"build plan: {self.precision} for {self.target}, device {self.device}; "
                 f"transformer {t.get('parameters', 0) / 1e9:.2f} B parameters ({_gb(t.get('bytes', 0))} "
                 f"{t.get('precision', '?')})"),
                 (f"  {'stage':10s} {'device':8s} {'precision':9s} {'host RAM':>10s} {'GPU mem':>10s} {'disk':>10s} "
                 f"{'time':>9s}")]
        for s in self.stages:
            lines.append(f"  {s.stage:10s} {s.device:8s} {s.precision:9s} {_gb(s.host_bytes):>10s} "
                         f"{_gb(s.gpu_bytes) if s.gpu_bytes is not None else '-':>10s} {_gb(s.disk_bytes):>10s} "
                         f"{_duration(s.seconds):>9s}" + (f"  {s.note}" if s.note else ""))
        ram, gpu, disk = self.has.get("host_memory"), self.has.get("gpu_memory"), self.has.get("disk")
        lines.append(f"  {'needs':10s} {'':8s} {'':9s} {_gb(self.needs.get('host_memory', 0)):>10s} "
                     f"{_gb(self.needs['gpu_memory']) if 'gpu_memory' in self.needs else '-':>10s} "
                     f"{_gb(self.needs.get('disk', 0)):>10s} {_duration(self.seconds):>9s}")
        lines.append(f"  {'machine':10s} {'':8s} {'':9s} {_gb(ram) if ram is not None else '?':>10s} "
                     f"{_gb(gpu) if gpu is not None else 'none':>10s} {_gb(disk) if disk is not None else '?':>10s}"
                     f"   (host RAM available, GPU memory, disk free"
                     + (f"; {_gb(self.existing_bytes)} already under --out" if self.existing_bytes else "") + ")")
        problems = self.problems()
        lines.append("  verdict: " + ("fits this machine" if not problems else f"{len(problems)} figure(s) do not fit"))
        lines += [f"    - {p}" for p in problems]
        lines.append(f"  basis ({self.fit_source}):")
        seen = set()
        for s in self.stages:
            for b in s.basis:
                if b not in seen:
                    seen.add(b)
                    lines.append(f"    {s.stage}: {b}")
        return lines


def _gb(v) -> str:
    return "-" if v is None else f"{v / GB:.1f} GB"


def _duration(s: float) -> str:
    if s < 90:
        return f"~{s:.0f} s"
    if s < 5400:
        return f"~{s / 60:.0f} min"
    return f"~{s / 3600:.1f} h"


def _bytes_under(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    total, seen = 0, set()
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


# ------------------------------------------------------------------------------------------------ figures
def _weights(root: Path) -> dict:
    from qwen_image_trt.models import checkpoint as ckpt

    out = {}
    for part in ("transformer", "vae", "text_encoder"):
        if (root / part).is_dir():
            w = ckpt.weights_info(root, part)
            out[part] = {"parameters": w.parameters, "bytes": w.bytes, "precision": w.precision}
    return out


def activation_bytes(config: dict, image_tokens: int, text_tokens: int, batch: int, width: int,
                     attention_scores: bool) -> int:
    """Live activations of one transformer forward, rule of thumb: both streams' hidden states, q/k/v and
    residuals (~8 x tokens x dim), the MLP's 4 x dim intermediate (in and out of GELU), and, where attention is
    not fused (CPU math SDPA), the [heads, tokens, tokens] scores; doubled for the allocator."""
    from qwen_image_trt.models.flops import MLP_MULT, TransformerShape

    if _is_21(config):  # single stream, SwiGLU MLP of mlp_ratio x dim
        from qwen_image_trt.models.flops21 import Shape21

        s21 = Shape21.from_config(config)
        dim, heads, mlp = s21.dim, s21.heads, s21.mlp_hidden // s21.dim
    else:
        s = TransformerShape.from_config(config)
        dim, heads, mlp = s.dim, s.heads, MLP_MULT
    n = image_tokens + text_tokens
    live = 8 * n * dim + 2 * n * mlp * dim + (heads * n * n if attention_scores else 0)
    return int(2 * batch * live * width)


def _is_21(config: dict) -> bool:
    """A Qwen-Image-2.1 transformer config (single stream: `context_in_dim` instead of `joint_attention_dim`)."""
    return "context_in_dim" in config and "joint_attention_dim" not in config


def _text_width(config: dict) -> int:
    return int(config.get("joint_attention_dim") or config["context_in_dim"])


def _text_encoder_flops(weights: dict, prompts: int) -> float:
    te = weights.get("text_encoder", {}).get("parameters", 0)
    return 2.0 * te * (PROMPT_TOKENS + TEMPLATE_TOKENS) * 2 * prompts  # prompt and negative prompt


def _rate(device: str, precision: str, fit: dict) -> tuple[float, str]:
    """FLOP/s a forward reaches on `device` in `precision`, and where the figure comes from."""
    if str(device).startswith("cuda"):
        from qwen_image_trt.core.gpus import lookup_peak

        name = None
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(torch.device(device))
        except Exception:  # noqa: BLE001 - no CUDA: planned with the assumed rate
            name = None
        peak = lookup_peak(name)
        p = peak.peak_flops(precision) if peak else None
        if p:
            return p * GPU_EFFICIENCY, f"{peak.name} {precision} peak x {GPU_EFFICIENCY}"
        r = UNKNOWN_GPU_FLOPS.get(precision, UNKNOWN_GPU_FLOPS["bf16"])
        return r, f"assumed {r / 1e12:.0f} TFLOP/s ({name or 'GPU'} not in core.gpus.PEAKS)"
    r = float(fit.get("cpu_matmul_flops_per_s") or CPU_FLOPS_DEFAULT)
    return r * CPU_EFFICIENCY, f"CPU matmul {r / 1e9:.0f} GFLOP/s (fit machine) x {CPU_EFFICIENCY}"


def _forward_flops(config: dict, sizes, text_tokens: int) -> list[tuple[int, float]]:
    """[(image tokens, FLOPs of one batch-1 forward)] per size."""
    from qwen_image_trt.models.flops import forward_cost, image_tokens_for

    if _is_21(config):  # generation; an edit's condition image about doubles it (models.flops21)
        from qwen_image_trt.models.flops21 import forward_cost_21

        return [(image_tokens_for(w, h), forward_cost_21(config, image_tokens_for(w, h), text_tokens,
                                                         precision="fp32").flops) for w, h in sizes]
    return [(image_tokens_for(w, h), forward_cost(config, image_tokens_for(w, h), text_tokens, 1, "fp32").flops)
            for w, h in sizes]


def quantized_graph_bytes(root: Path, precision: str, high: str, recipe_overrides=None, keep=()) -> int:
    """Bytes of the Q/DQ transformer graph: quantized layers at 1 byte a weight, the rest at `high`."""
    from qwen_image_trt.compile.recipe import load_recipe_file, make_recipe
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.flops import TransformerShape, param_count

    config = ckpt.read_config(root, "transformer")
    layers = int(config["num_layers"])
    params = ckpt.weights_info(root, "transformer").parameters
    if _is_21(config):
        from qwen_image_trt.models.flops21 import Shape21, param_count_21

        outside = param_count_21(replace(Shape21.from_config(config), layers=0))
    else:
        outside = param_count(replace(TransformerShape.from_config(config), layers=0))
    per_block = max(0, params - outside) / max(1, layers)
    overrides = load_recipe_file(recipe_overrides) if isinstance(recipe_overrides, (str, Path)) else recipe_overrides
    recipe = make_recipe(precision, layers, overrides=overrides, keep=keep,
                         family="qwen-image-2.1" if _is_21(config) else None)
    units = sum(PART_UNITS.get(k, 0) for k in recipe.get("keep", []))
    if not recipe.get("quantize_modulation", True):
        units += PART_UNITS["img_mod"] + PART_UNITS["txt_mod"]
    kept_fraction = min(1.0, units / BLOCK_UNITS)
    quantized_blocks = layers - len(recipe["kept_blocks"])
    q = quantized_blocks * per_block * (1 - kept_fraction)
    return int(((params - q) * WIDTH[high] + q * WIDTH[precision]) * 1.02)


def _calibration(root: Path, o, sizes) -> dict:
    """Prompts, pipeline forwards and recorded calls of the calibration the build will run (or reuse)."""
    from qwen_image_trt.calibration.capture import make_settings

    if o.calibration:
        from qwen_image_trt.calibration.capture import CalibrationSet

        cs = CalibrationSet(o.calibration, verify=False)
        per_size = cs.calls_per_size("calib")
        return {"reused": str(o.calibration), "prompts": 0, "pipeline_forwards": {}, "recorded": per_size,
                "held_out": min(4, cs.num_calls("holdout") or cs.num_calls("calib"))}
    s = make_settings(root, o.num_prompts, o.steps, sizes, o.seed)
    forwards: dict = {}
    recorded: dict = {}
    for i in range(s.num_prompts):
        k = i if i < s.num_prompts - s.holdout else i - (s.num_prompts - s.holdout)
        size = tuple(s.sizes[k % len(s.sizes)])
        forwards[size] = forwards.get(size, 0) + 2 * s.steps  # true CFG: conditional + unconditional calls
        if i < s.num_prompts - s.holdout:
            recorded[size] = recorded.get(size, 0) + 2 * math.ceil(s.steps / s.record_every)
    return {"reused": None, "prompts": s.num_prompts, "pipeline_forwards": forwards, "recorded": recorded,
            "held_out": 4, "settings": f"{s.num_prompts} prompts x {s.steps} steps, record every {s.record_every}"}


def plan_build(root: Path, out: Path, options) -> BuildPlan:
    """The plan of `qitrt build` for `root` into `out` with `options` (compile.stages.BuildOptions); loads nothing."""
    from qwen_image_trt.compile.export import component_precision, export_bytes, resolve_precision
    from qwen_image_trt.compile.stages import DEFAULT_SIZES, QUANTIZED, TINY_SIZES
    from qwen_image_trt.core.resources import available_memory_bytes, default_device, free_disk_bytes, gpu_memory_bytes
    from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, padded_text_len, parse_sizes
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.models.specs import SPECS

    root, out = Path(root), Path(out)
    o = options
    fit = load_fit()
    device = str(o.device or default_device())
    on_cuda = device.startswith("cuda")
    quantized = o.precision in QUANTIZED
    sizes = parse_sizes(o.sizes if o.sizes else (TINY_SIZES if ckpt.is_tiny(root) else DEFAULT_SIZES))
    weights = _weights(root)
    config = ckpt.read_config(root, "transformer")
    t_params = weights["transformer"]["parameters"]
    te_params = weights.get("text_encoder", {}).get("parameters", 0)
    vae_params = weights.get("vae", {}).get("parameters", 0)
    high = resolve_precision(root, "auto" if quantized else o.precision)
    from qwen_image_trt.models.specs import DEFAULT_COMPONENTS

    components = tuple(o.components or DEFAULT_COMPONENTS)
    plan = BuildPlan(precision=o.precision, target=o.target, device=device, out=str(out), weights=weights,
                     fit_source=fit.get("source", str(FIT_FILE)) + (f", measured {fit['measured']}"
                                                                    if fit.get("measured") else ""))

    # --- export (always on the CPU): the largest component in its export precision
    x = max(ckpt.weights_info(root, SPECS[c].part).parameters * WIDTH[component_precision(c, high)]
            for c in components)
    disk = export_bytes(root, high, components)
    plan.stages.append(StagePlan(
        "export", "cpu", high, int(_linear(fit, "export", high, "peak_rss_bytes", x)), None, disk,
        _linear(fit, "export", high, "seconds", x),
        [(f"RSS/time = fit {_coef(fit, 'export', high, 'seconds')[2]} x {_gb(x)} of weights "
         f"(transformer in {high}); disk = parameters x width + 5%")]))
    graph_bytes = disk

    if quantized:
        calib = _calibration(root, o, sizes)
        text = padded_text_len(PROMPT_TOKENS, DEFAULT_TEXT_BUCKET)
        # --- calibrate: the stock pipeline, loaded in fp32 on the CPU and in bf16 on cuda (capture.py)
        if calib["reused"] is None:
            calib_width = 2 if on_cuda else 4
            loaded = (t_params + te_params + vae_params) * calib_width
            largest = max(t_params, te_params, vae_params) * calib_width
            tokens = max(image_tokens for image_tokens, _ in _forward_flops(config, sizes, text))
            act = activation_bytes(config, tokens, text, 1, 4, attention_scores=not on_cuda)
            rate, rate_basis = _rate(device, "fp32", fit)
            flops = sum(n * f for (size, n) in calib["pipeline_forwards"].items()
                        for _, f in _forward_flops(config, [size], PROMPT_TOKENS))
            flops += _text_encoder_flops(weights, calib["prompts"])
            fixed, per, src = _coef(fit, "calibrate", "fp32", "peak_rss_bytes")
            cpu_host = int(fixed + per * loaded + act)
            # on cuda each part is loaded on the host in bf16, then moved to the GPU
            cuda_host = int(fixed + per * max(t_params, te_params, vae_params) * 2)
            calls = sum(calib["recorded"].values())
            call_bytes = sum(n * 4 * (image_tokens * int(config["in_channels"]) + text * int(
                _text_width(config)) + text + 1) for (size, n) in calib["recorded"].items()
                for image_tokens, _ in _forward_flops(config, [size], text))
            plan.stages.append(StagePlan(
                "calibrate", device, "bf16" if on_cuda else "fp32", cuda_host if on_cuda else cpu_host,
                int(loaded + act + CUDA_CONTEXT) if on_cuda else None, int(call_bytes * 1.05) + 10**6,
                _linear(fit, "calibrate", "fp32", "seconds", loaded) + flops / rate,
                [f"RSS = fit {src}: {fixed / GB:.1f} GB + {per:.2f} x {_gb(loaded)} (transformer, text encoder "
                 f"and VAE in {'bf16' if on_cuda else 'fp32'}: the stock pipeline loads them so)"
                 + (f" + {_gb(act)} activations" if not on_cuda else "; on cuda the host holds the largest part "
                    f"once ({_gb(largest)}), the GPU all parts + {_gb(act)} activations + CUDA context"),
                 (f"time = fit + {calib['settings']}: {flops / 1e12:.0f} TFLOP of transformer and text-encoder "
                 f"forwards at {rate_basis}"),
                 (f"disk = {calls} recorded calls x (image latents + {text} text tokens x "
                 f"{_text_width(config)}) in fp32")],
                cuda_host_bytes=cuda_host, note=calib["settings"]))
        # --- quantize: the transformer in the graph's precision under ModelOpt, then the Q/DQ graph written
        w_hp = t_params * WIDTH[high]
        q_bytes = quantized_graph_bytes(root, o.precision, high, o.recipe, o.keep)
        sizes_rec = list(calib["recorded"]) or [tuple(s) for s in sizes]
        tokens = max(image_tokens for image_tokens, _ in _forward_flops(config, sizes_rec, text))
        act = activation_bytes(config, tokens, text, 1, WIDTH[high], attention_scores=not on_cuda)
        fixed, per, src = _coef(fit, "quantize", high, "peak_rss_bytes")
        cpu_host = int(fixed + per * w_hp + act)
        cuda_host = int(fixed + max(w_hp, q_bytes))  # loaded on the host then moved; later the quantized weights
        rate, rate_basis = _rate(device, high, fit)
        n_calls = sum(calib["recorded"].values()) + 3 * calib["held_out"]
        flops = sum(n * f for (size, n) in calib["recorded"].items() for _, f in _forward_flops(config, [size], text))
        flops += 3 * calib["held_out"] * max((f for _, f in _forward_flops(config, sizes_rec, text)), default=0)
        plan.stages.append(StagePlan(
            "quantize", device, f"{o.precision}/{high}", cuda_host if on_cuda else cpu_host,
            int(w_hp * 1.05 + act + CUDA_CONTEXT) if on_cuda else None, q_bytes,
            _linear(fit, "quantize", high, "seconds", w_hp) + flops / rate,
            [f"RSS = fit {src}: {fixed / GB:.1f} GB + {per:.2f} x {_gb(w_hp)} (transformer in {high})"
             + (f" + {_gb(act)} activations" if not on_cuda else "; on cuda the host holds the transformer "
                "once while loading, then the quantized weights; the GPU the transformer + 5% quantizer state + "
                f"{_gb(act)} activations + CUDA context"),
             f"time = fit + {n_calls} ModelOpt forwards ({flops / 1e12:.0f} TFLOP) at {rate_basis}",
             (f"disk = Q/DQ graph: quantized layers at {WIDTH[o.precision]} byte, kept layers and blocks "
             f"(recipe) at {WIDTH[high]}; VAE graphs are copied")],
            cuda_host_bytes=cuda_host))
        graphs = [c for c in components if c in ("transformer", "transformer_extract", "transformer_cached")]
        # 2.1: each of its two transformer graphs holds (most of) the weights
        graph_bytes = len(graphs) * q_bytes + disk - export_bytes(root, high, graphs) if graphs else disk

    # --- engine
    if o.target == "tensorrt":
        trt_device = device if on_cuda else "cuda"
        tokens = max(image_tokens for image_tokens, _ in _forward_flops(config, sizes, 32))
        act = activation_bytes(config, tokens, padded_text_len(PROMPT_TOKENS, DEFAULT_TEXT_BUCKET),
                               2 * int(o.max_batch or 1), 2, attention_scores=False)
        plan.stages.append(StagePlan(
            "engine", trt_device, o.precision, int(TRT_HOST_COPIES * graph_bytes + 2 * GB),
            int(graph_bytes + act + TRT_WORKSPACE + CUDA_CONTEXT), graph_bytes,
            TRT_SECONDS[0] + TRT_SECONDS[1] * graph_bytes,
            [(f"rule of thumb, not measured here (no TensorRT on the fit machine): host {TRT_HOST_COPIES:.0f} x the "
             f"graphs' {_gb(graph_bytes)} + 2 GB; GPU the weights + {_gb(act)} activations at the largest profile "
             f"(batch {2 * int(o.max_batch or 1)} with CFG) + {_gb(TRT_WORKSPACE)} builder workspace; engine files "
             "~ the graphs' weights; 10 min + 1 min per GB")]))
    else:
        fixed, per, src = _coef(fit, "ort_engine", "fp32", "peak_rss_bytes")
        plan.stages.append(StagePlan(
            "engine", "cpu", o.precision, int(fixed + per * graph_bytes), None, graph_bytes,
            _linear(fit, "ort_engine", "fp32", "seconds", graph_bytes),
            [(f"ONNX Runtime's optimized copy: RSS = fit {src}: {fixed / GB:.1f} GB + {per:.2f} x {_gb(graph_bytes)} "
             "of graphs; disk = the graphs' size again")]))

    # --- totals and this machine
    plan.existing_bytes = _bytes_under(out)
    plan.needs = {"disk": max(0, sum(s.disk_bytes for s in plan.stages) - plan.existing_bytes),
                  "host_memory": max(s.host_bytes for s in plan.stages)}
    gpu = [s.gpu_bytes for s in plan.stages if s.gpu_bytes is not None]
    if gpu:
        plan.needs["gpu_memory"] = max(gpu)
    plan.has = {"disk": free_disk_bytes(out), "host_memory": available_memory_bytes(),
                "gpu_memory": gpu_memory_bytes(device if on_cuda else "cuda")}
    return plan


__all__ = ["FIT_FILE", "BuildPlan", "StagePlan", "activation_bytes", "load_fit", "plan_build", "quantized_graph_bytes"]
