"""Request checks shared by the CLI, the Python API and the server: cheap, and before any heavy work.

Engine folders may narrow the ranges: a manifest with {"limits": {"height": [min, max], "width": [...],
"batch": [min, max]}} (TensorRT profiles have hard bounds; ONNX graphs have none).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.core.shapes import DEFAULT_SIZE_RANGE, MAX_STEPS, SIZE_MULTIPLE
from qwen_image_trt.models.checkpoint import is_qwen21, min_steps


@dataclass(frozen=True)
class Limits:
    height: tuple[int, int] = DEFAULT_SIZE_RANGE
    width: tuple[int, int] = DEFAULT_SIZE_RANGE
    batch: tuple[int, int] = (1, 64)
    steps: tuple[int, int] = (1, MAX_STEPS)
    # A TensorRT profile bounds tokens, not sides: 1664x928 and 928x1664 share one range.
    image_tokens: tuple[int, int] = (1, (DEFAULT_SIZE_RANGE[1] // SIZE_MULTIPLE) ** 2)
    # Edit engines: condition images' aspect ratio (width/height or its inverse) the profile covers; None: any.
    condition_aspect: float | None = None
    # Sides are multiples of this: 16 (2509: x8 VAE, 2x2 patches), 32 for Qwen-Image-2.1 (x16 VAE, 2x2 groups per
    # vision-language slot).
    size_multiple: int = SIZE_MULTIPLE

    @classmethod
    def from_json(cls, raw: dict | None) -> "Limits":
        """{"height": [min, max], ...} as an engine manifest records it (unknown keys ignored)."""
        raw = raw or {}
        aspect = raw.get("condition_aspect")
        ranges = ("height", "width", "batch", "steps", "image_tokens")
        return cls(**{k: tuple(v) for k, v in raw.items() if k in ranges},
                   condition_aspect=float(aspect) if aspect is not None else None)

    @classmethod
    def from_manifest(cls, manifest) -> "Limits":
        return cls.from_json(manifest.limits if manifest is not None else None)


def check_size(field: str, value, bounds: tuple[int, int], multiple: int = SIZE_MULTIPLE) -> int:
    lo, hi = bounds
    lo = -(-lo // multiple) * multiple
    if isinstance(value, bool) or not isinstance(value, int) or value % multiple or not lo <= value <= hi:
        raise InputError(field, value, f"a multiple of {multiple} in [{lo}, {hi}]")
    return value


def check_request(prompt, height: int, width: int, steps: int, limits: Limits = Limits(),
                  negative_prompt=None, batch: int = 1) -> None:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InputError("prompt", prompt, "a non-empty string")
    if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
        raise InputError("negative_prompt", negative_prompt, "a string (use ' ' for an empty one)")
    check_size("height", height, limits.height, limits.size_multiple)
    check_size("width", width, limits.width, limits.size_multiple)
    tokens = (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
    lo, hi = limits.image_tokens
    if not lo <= tokens <= hi:
        raise InputError("size", f"{width}x{height}", f"sizes with (width/16)*(height/16) image tokens in [{lo}, {hi}] "
                         "(the engine's profile); rebuild with more --sizes for others")
    lo, hi = limits.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not lo <= steps <= hi:
        raise InputError("steps", steps, f"an integer in [{lo}, {hi}]")
    lo, hi = limits.batch
    if not lo <= batch <= hi:
        raise InputError("batch", batch, f"an integer in [{lo}, {hi}] (the engine's batch profile)")


def request_limits(engines=None, checkpoint=None) -> Limits:
    """What a request may ask of this checkpoint and engine folder (the engine's profile, the scheduler)."""
    limits = Limits()
    if engines is not None:
        if not Path(engines).is_dir():
            raise InputError("engines", str(engines), "an existing engine folder made by `qitrt export`/`qitrt build`")
        limits = Limits.from_manifest(read_manifest(engines))
    if checkpoint is not None and min_steps(checkpoint) > limits.steps[0]:
        limits = replace(limits, steps=(min_steps(checkpoint), limits.steps[1]))
    if checkpoint is not None and is_qwen21(checkpoint):
        limits = replace(limits, size_multiple=32)
    return limits


def check_threshold(value, name: str = "step_cache") -> float | None:
    """None or 0 turns caching off; a threshold is the accumulated relative L1 change allowed between computed
    steps (TeaCache's useful range is ~0.05-0.6: above 1 nearly every step would be skipped)."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError(value)
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(name, value, "a number in [0, 2] (accumulated relative change; 0 or none: off)") from None
    if not 0.0 <= v <= 2.0 or v != v:
        raise InputError(name, value, "a number in [0, 2] (accumulated relative change; 0 or none: off)")
    return v or None
