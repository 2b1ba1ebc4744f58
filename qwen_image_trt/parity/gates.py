"""Parity gates per precision: documented defaults (docs/parity.md), each overridable by name.

Why these numbers: fp32 engines should match eager up to kernel rounding; fp16/bf16 lose mantissa bits;
INT8/FP8 are judged like NVIDIA/ModelOpt do, on cosine per forward and per step plus image quality,
since trajectories drift even without quantization (NOTES: TensorRT-Model-Connect, BF16 ~10.8 dB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.quant_evidence import MISMATCH_MAX


@dataclass(frozen=True)
class Gates:
    forward_cosine_min: float
    forward_rel_l2_max: float
    step_cosine_min: float
    image_psnr_min: float
    image_ssim_min: float
    # Quantized engines only (core/quant_evidence.py): departure from ModelOpt's fake-quantized model in units of
    # the quantization error, and error against high precision in units of the quantized blocks' contribution.
    quant_mismatch_max: float | None = None
    quant_block_rel_err_max: float | None = None

    def override(self, items: list[str]) -> "Gates":
        names = {f.name for f in fields(self)}
        changes = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names:
                raise InputError("gate", item, f"NAME=VALUE with NAME one of {', '.join(sorted(names))}")
            try:
                changes[name] = float(value)
            except ValueError:
                raise InputError(f"gate {name}", value, "a number") from None
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_GATES = {
    "fp32": Gates(forward_cosine_min=0.99999, forward_rel_l2_max=1e-3, step_cosine_min=0.9999,
                  image_psnr_min=40.0, image_ssim_min=0.99),
    "fp16": Gates(forward_cosine_min=0.999, forward_rel_l2_max=5e-2, step_cosine_min=0.99,
                  image_psnr_min=30.0, image_ssim_min=0.95),
    "bf16": Gates(forward_cosine_min=0.995, forward_rel_l2_max=1e-1, step_cosine_min=0.98,
                  image_psnr_min=28.0, image_ssim_min=0.93),
    "int8": Gates(forward_cosine_min=0.99, forward_rel_l2_max=0.15, step_cosine_min=0.98,
                  image_psnr_min=35.0, image_ssim_min=0.95, quant_mismatch_max=MISMATCH_MAX["int8"],
                  quant_block_rel_err_max=0.25),
    "fp8": Gates(forward_cosine_min=0.99, forward_rel_l2_max=0.15, step_cosine_min=0.98,
                 image_psnr_min=35.0, image_ssim_min=0.95, quant_mismatch_max=MISMATCH_MAX["fp8"],
                 quant_block_rel_err_max=0.25),
}


def gates_for(precision: str) -> Gates:
    if precision not in DEFAULT_GATES:
        raise InputError("precision", precision, f"one of {', '.join(DEFAULT_GATES)}")
    return DEFAULT_GATES[precision]


def apply_gates(data: dict, gates: Gates) -> list[dict]:
    """[{name, kind, value, limit, ok}] for a parity report's figures: worst forward, worst step, worst image,
    the quantization evidence when the engine folder has one, and finiteness of every forward output."""
    fwd = data["forward"]
    checks = [
        ("forward_cosine_min", "min", min(r["cosine"] for r in fwd)),
        ("forward_rel_l2_max", "max", max(r["rel_l2"] for r in fwd)),
        ("step_cosine_min", "min", min(r["cosine"] for r in data["per_step"])),
        ("image_psnr_min", "min", min(r["psnr_db"] for r in data["images"])),
        ("image_ssim_min", "min", min(r["ssim"] for r in data["images"])),
    ]
    quant = data.get("quantization")
    if quant and "mismatch" in quant and gates.quant_mismatch_max is not None:
        checks += [("quant_mismatch_max", "max", quant["mismatch"]),
                   ("quant_block_rel_err_max", "max", quant["block_rel_err"])]
    out = []
    for name, kind, value in checks:
        limit = getattr(gates, name)
        ok = value >= limit if kind == "min" else value <= limit
        out.append({"name": name, "kind": kind, "value": value, "limit": limit, "ok": bool(ok)})
    out.append({"name": "all_outputs_finite", "kind": "min", "value": float(all(r["finite"] for r in fwd)),
                "limit": 1.0, "ok": all(r["finite"] for r in fwd)})
    return out
