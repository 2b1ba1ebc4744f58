"""Input images for the image members of the family (img2img, inpaint, edit, edit-plus): decoded safely and
checked against what the member takes, before any heavy work. The CLI, the Python API and the server share it.

Decoding is bounded: the encoded bytes, then the pixel count read from the header before any pixel is decoded
(a decompression bomb stops there), then a full decode (a truncated file fails here, not halfway through a
denoising loop). Every failure names the field.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.pipelines import IMAGE_MEMBERS, MASK_MEMBERS

# Edit-Plus takes 1-3 condition images (Qwen's model card); every other image member exactly one.
MAX_IMAGES = {"edit-plus": 3, "qwen-image-2.1": 3, "qwen-image-2.1-turbo": 3}
# Members that take condition images but also run without one (2.1: no image generates, images edit).
OPTIONAL_IMAGES = ("qwen-image-2.1", "qwen-image-2.1-turbo")
STRENGTH_MEMBERS = ("img2img", "inpaint", "edit-inpaint")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size of one file
    max_pixels: int = 4096 * 4096  # width x height of one image, read from its header
    min_side: int = 16


def decode_image(data, field: str, limits: ImageLimits = ImageLimits(), mode: str = "RGB"):
    """bytes, a path or a PIL image -> a fully decoded PIL image in `mode`; InputError naming `field` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, Image.Image):
        image = data
    else:
        if isinstance(data, (str, Path)):
            path = Path(data)
            if not path.is_file():
                raise InputError(field, str(data), "an existing image file (PNG, JPEG, WebP)")
            if path.stat().st_size > limits.max_bytes:
                raise InputError(field, str(data), f"an image file of at most {limits.max_bytes} bytes")
            data = path.read_bytes()
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InputError(field, type(data).__name__, "an image: PNG, JPEG or WebP bytes or a file path")
        if len(data) > limits.max_bytes:
            raise InputError(field, f"{len(data)} bytes", f"an image file of at most {limits.max_bytes} bytes")
        try:
            image = Image.open(io.BytesIO(bytes(data)))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InputError(field, f"{len(data)} bytes", f"a PNG, JPEG or WebP image ({e})") from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > limits.max_pixels:
        raise InputError(field, f"{width}x{height}", f"an image of at most {limits.max_pixels} pixels")
    if min(width, height) < limits.min_side:
        raise InputError(field, f"{width}x{height}", f"an image at least {limits.min_side} pixels on each side")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data (PIL raises OSError)
        raise InputError(field, f"{width}x{height}", f"a complete image file ({e})") from None
    return image.convert(mode)


def check_image_inputs(kind: str, images=None, mask=None, strength=None, limits: ImageLimits = ImageLimits(),
                       max_aspect: float | None = None, control_image=None, controlnet_scale=None):
    """Decode and check what `kind` takes. Returns the pipeline keyword arguments for them
    ({"image": ..., "mask_image": ..., "strength": ...}, or the controlnet member's {"control_image": ...,
    "controlnet_conditioning_scale": ...}); raises InputError naming the field otherwise.
    `max_aspect`: the engine profile's bound on a condition image's aspect ratio (edit members; None: any)."""
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if kind == "controlnet" or control_image is not None or controlnet_scale is not None:
        return _controlnet_inputs(kind, images, mask, strength, control_image, controlnet_scale, limits)
    if kind not in IMAGE_MEMBERS:
        for field, given in (("image", images), ("mask", mask), ("strength", strength)):
            if given not in (None, []):
                raise InputError(field, "given", f"no {field} for {kind}; image members: {', '.join(IMAGE_MEMBERS)} "
                                 "(pick one with --pipeline / pipeline=)")
        return {}
    most = MAX_IMAGES.get(kind, 1)
    if kind in OPTIONAL_IMAGES and not images:
        return _no_mask_or_strength(kind, mask, strength)
    if not 1 <= len(images) <= most:
        raise InputError("image", f"{len(images)} image(s)", f"{'1' if most == 1 else f'1 to {most}'} image(s) "
                         f"for {kind}")
    names = [f"image[{i}]" if most > 1 else "image" for i in range(len(images))]
    decoded = [decode_image(im, name, limits) for name, im in zip(names, images)]
    if max_aspect is not None and (kind.startswith("edit") or kind in OPTIONAL_IMAGES):
        for name, im in zip(names, decoded):
            w, h = im.size
            if max(w / h, h / w) > max_aspect:
                raise InputError(name, f"{w}x{h}", f"an aspect ratio within 1:{max_aspect:g} and {max_aspect:g}:1 "
                                 "(the engine profile's condition-image range)")
    kwargs = {"image": decoded if most > 1 else decoded[0]}
    if kind in OPTIONAL_IMAGES:
        return {**kwargs, **_no_mask_or_strength(kind, mask, strength)}
    if kind in MASK_MEMBERS:
        if mask is None:
            raise InputError("mask", None, f"a mask image for {kind} (white = repaint)")
        kwargs["mask_image"] = decode_image(mask, "mask", limits, mode="L")
        if kwargs["mask_image"].size != decoded[0].size:
            raise InputError("mask", "x".join(map(str, kwargs["mask_image"].size)),
                             f"the image's size {decoded[0].size[0]}x{decoded[0].size[1]}")
    elif mask is not None:
        raise InputError("mask", "given", f"a mask only for {', '.join(MASK_MEMBERS)}")
    if strength is not None:
        if kind not in STRENGTH_MEMBERS:
            raise InputError("strength", strength, f"only for {', '.join(STRENGTH_MEMBERS)}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
            raise InputError("strength", strength, "a number in (0, 1]")
        kwargs["strength"] = float(strength)
    return kwargs


def _no_mask_or_strength(kind, mask, strength) -> dict:
    for field, given in (("mask", mask), ("strength", strength)):
        if given is not None:
            raise InputError(field, "given", f"no {field} for {kind} (its condition images go in as image)")
    return {}


def _controlnet_inputs(kind, images, mask, strength, control_image, scale, limits):
    if kind != "controlnet":
        field = "control_image" if control_image is not None else "controlnet_scale"
        raise InputError(field, "given", "only for the controlnet member (pick it with --pipeline controlnet / "
                         "pipeline='controlnet')")
    for field, given in (("image", images), ("mask", mask), ("strength", strength)):
        if given not in (None, []):
            raise InputError(field, "given", "no image, mask or strength for controlnet: its input is control_image")
    if control_image is None:
        raise InputError("control_image", None, "a condition image for the ControlNet (--control-image)")
    kwargs = {"control_image": decode_image(control_image, "control_image", limits)}
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= 2:
            raise InputError("controlnet_scale", scale, "a number in [0, 2]")
        kwargs["controlnet_conditioning_scale"] = float(scale)
    return kwargs


__all__ = ["ImageLimits", "decode_image", "check_image_inputs", "MAX_IMAGES", "STRENGTH_MEMBERS"]
