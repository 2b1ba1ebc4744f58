"""Sizes, token counts and optimization-profile shapes: the numbers every stage agrees on.

A size is (width, height) in pixels, both multiples of 16 (VAE x8, then 2x2 latent packing). A profile is
{input name: (min shape, opt shape, max shape)}, what TensorRT builds for and what a runner accepts.
"""

from __future__ import annotations

import math
import re
from typing import Iterable

from qwen_image_trt.core.errors import InputError

SIZE_MULTIPLE = 16  # VAE x8, then 2x2 latent packing
DEFAULT_SIZE_RANGE = (16, 4096)
MAX_SIDE = DEFAULT_SIZE_RANGE[1]
MAX_STEPS = 200
# Text is padded to a multiple of this before the transformer (runtime drop-in, calibration replay and
# engine profiles alike), so an engine sees a handful of text shapes, not one per prompt length.
DEFAULT_TEXT_BUCKET = 32

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


# The edit pipelines resize each condition image to ~1024^2 pixels at its own aspect ratio for the VAE.
CONDITION_AREA = 1024 * 1024


def condition_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) the edit pipelines resize an image of aspect `ratio` (width / height) to: diffusers'
    calculate_dimensions (sides rounded to multiples of 32), restated so shapes stay pure arithmetic (a test pins
    the two together). The engine profiles and the server's batch grouping both read it."""
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def condition_resolution(height: int, width: int) -> int:
    """Qwen-Image-2.1 resizes each condition image to about output_resolution^2 pixels (stock default 1024, whatever
    the output size). This project passes the output's own area, rounded to the pipeline's multiple of 32, so that a
    small output is not conditioned on a 1 MP image (at 1024x1024 it is the stock default)."""
    return max(32, round((height * width) ** 0.5 / 32) * 32)


def parse_size(text, field: str = "size") -> tuple[int, int]:
    """'WxH' -> (width, height). Ranges are checked separately, against the engine's limits."""
    m = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", text) if isinstance(text, str) else None
    if not m:
        raise InputError(field, text, "a string 'WIDTHxHEIGHT', e.g. '1024x1024'")
    return int(m.group(1)), int(m.group(2))


def parse_sizes(text, field: str = "sizes") -> list[tuple[int, int]]:
    """"1024x1024,1664x928" (or an iterable of "WxH" strings / (w, h) pairs) -> [(1024, 1024), (1664, 928)]."""
    allowed = f"comma-separated WIDTHxHEIGHT sizes, each side a multiple of {SIZE_MULTIPLE} in " \
              f"[{SIZE_MULTIPLE}, {MAX_SIDE}], e.g. 1024x1024,1664x928"
    items = text.split(",") if isinstance(text, str) else list(text or [])
    sizes: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, str):
            try:
                w, h = parse_size(item, field)
            except InputError:
                raise InputError(field, text, allowed) from None
        else:
            try:
                w, h = item
            except (TypeError, ValueError):
                raise InputError(field, text, allowed) from None
        for side in (w, h):
            if isinstance(side, bool) or not isinstance(side, int) or side % SIZE_MULTIPLE \
                    or not SIZE_MULTIPLE <= side <= MAX_SIDE:
                raise InputError(field, text, allowed)
        if (w, h) not in sizes:
            sizes.append((w, h))
    if not sizes:
        raise InputError(field, text, allowed)
    return sizes


def image_tokens(width: int, height: int) -> int:
    """Packed latent tokens for one image: (h/16) * (w/16)."""
    return (width // SIZE_MULTIPLE) * (height // SIZE_MULTIPLE)


def padded_text_len(text_len: int, bucket: int = DEFAULT_TEXT_BUCKET) -> int:
    return max(bucket, math.ceil(text_len / bucket) * bucket)


def profile_to_json(profile: Profile) -> dict:
    """{name: {"min": [...], "opt": [...], "max": [...]}} for manifests."""
    return {name: {"min": list(mn), "opt": list(op), "max": list(mx)} for name, (mn, op, mx) in profile.items()}


def profile_from_json(data: dict) -> Profile:
    return {name: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for name, v in data.items()}


def normalize_profile(profile) -> Profile:
    """Accept either form (tuples or the JSON dict) and check min <= opt <= max per dim."""
    if profile and isinstance(next(iter(profile.values())), dict):
        profile = profile_from_json(profile)
    out: Profile = {}
    for name, shapes in (profile or {}).items():
        try:
            mn, op, mx = (tuple(int(d) for d in s) for s in shapes)
        except (TypeError, ValueError):
            raise InputError(f"profiles[{name}]", shapes, "(min_shape, opt_shape, max_shape)") from None
        if not len(mn) == len(op) == len(mx) or not all(a <= b <= c for a, b, c in zip(mn, op, mx)) \
                or any(d < 0 for d in mn):
            raise InputError(f"profiles[{name}]", shapes, "three shapes of one rank with 0 <= min <= opt <= max per dim")
        out[name] = (mn, op, mx)
    return out


def check_shape_in_profile(name: str, shape: Iterable[int], profile: Profile) -> None:
    """Raise InputError when `shape` of input `name` is outside the profile's [min, max] box."""
    if name not in profile:
        return
    mn, _, mx = profile[name]
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(mn) or not all(a <= d <= c for a, d, c in zip(mn, shape, mx)):
        raise InputError(name, list(shape), f"a shape between {list(mn)} and {list(mx)} (the engine's optimization "
                         "profile; rebuild with `qitrt build --sizes ... --max-batch ...` for other shapes)")


__all__ = ["condition_resolution", "SIZE_MULTIPLE", "DEFAULT_SIZE_RANGE", "MAX_STEPS", "DEFAULT_TEXT_BUCKET", "Profile", "parse_size",
           "parse_sizes", "image_tokens", "padded_text_len", "profile_to_json", "profile_from_json",
           "normalize_profile", "check_shape_in_profile"]


FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")


def torch_dtype(precision: str):
    """"fp32" | "fp16" | "bf16" -> the torch dtype (torch is imported only when asked)."""
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in table:
        raise InputError("precision", precision, f"one of {', '.join(table)}")
    return table[precision]
