"""One image from the command line or Python: checks first, then load, run, save."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.checkpoint import validate_checkpoint
from qwen_image_trt.runtime.backends import check_backend
from qwen_image_trt.runtime.limits import check_request, request_limits
from qwen_image_trt.runtime.pipeline import load_pipeline


def generate_image(checkpoint, out, *, prompt: str, negative_prompt=None, seed: int = 0, steps: int = 20,
                   height: int = 1024, width: int = 1024, engines=None, backend: str = "torch", device="cpu",
                   true_cfg_scale: float = 4.0, pipe=None, trt_options: dict | None = None) -> Path:
    check_backend(backend)
    validate_checkpoint(checkpoint)
    limits = request_limits(engines, checkpoint)
    check_request(prompt, height, width, steps, limits, negative_prompt=negative_prompt)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError("out", str(out), "a .png file path")
    if pipe is None:
        pipe = load_pipeline(checkpoint, engines=engines, backend=backend, device=device, progress=True,
                             trt_options=trt_options)
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, height=height,
                 width=width, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
