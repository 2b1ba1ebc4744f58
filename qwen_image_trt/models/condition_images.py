"""Input images for the image members of the family, shipped as code: parity (and later calibration) drives the
edit, img2img and inpaint pipelines with them. In models/ so every later stage may read them.

Each is drawn from its seed (a two-colour gradient and a few filled shapes) at its own size and aspect ratio, so
condition images of different grids are exercised; the same seed gives the same pixels everywhere (PIL's drawing
is deterministic), and nothing has to be downloaded.
"""

from __future__ import annotations

import numpy as np

from qwen_image_trt.models.pipelines import MASK_MEMBERS

# (width, height): landscape, portrait, square; the pipelines resize them to their own working sizes.
SIZES = ((320, 192), (192, 288), (256, 256))
MAX_CONDITION_IMAGES = {"edit-plus": 2}  # two of different sizes: the case a single-grid runtime gets wrong


def condition_image(seed: int, size: tuple[int, int] | None = None):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    width, height = size or SIZES[seed % len(SIZES)]
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    pixels = (a * (1 - ramp) + b * ramp).repeat(height, axis=0).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width * 3 // 4)), int(rng.integers(0, height * 3 // 4))
        box = (x0, y0, x0 + int(rng.integers(width // 8, width // 2)), y0 + int(rng.integers(height // 8, height // 2)))
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return image


def inpaint_mask(size: tuple[int, int]):
    """White (repaint) over the middle half of the image, black (keep) around it."""
    from PIL import Image, ImageDraw

    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return mask


def sample_image_inputs(kind: str, seed: int) -> dict:
    """Pipeline keyword arguments with this member's images for sample `seed` ({} for text-to-image)."""
    if kind == "text-to-image":
        return {}
    if kind == "controlnet":  # a condition image as a ControlNet would get it (the pipeline resizes it)
        return {"control_image": condition_image(seed * 7)}
    count = MAX_CONDITION_IMAGES.get(kind, 1)
    images = [condition_image(seed * 7 + i) for i in range(count)]
    kwargs = {"image": images if kind == "edit-plus" else images[0]}
    if kind in MASK_MEMBERS:
        kwargs["mask_image"] = inpaint_mask(images[0].size)
    return kwargs


__all__ = ["condition_image", "inpaint_mask", "sample_image_inputs", "SIZES"]
