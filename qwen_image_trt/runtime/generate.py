"""One image from the command line or Python: checks first, then load, run, save."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from qwen_image_trt.errors import InputError
from qwen_image_trt.runtime.limits import Limits, check_request


def request_limits(engines) -> Limits:
    if engines is None:
        return Limits()
    from qwen_image_trt.build.manifest import read_manifest

    if not Path(engines).is_dir():
        raise InputError("engines", str(engines), "an existing engine folder made by `qitrt export`/`qitrt build`")
    return Limits.from_manifest(read_manifest(engines))


def min_steps(checkpoint) -> int:
    """Qwen-Image's scheduler stretches sigmas to `shift_terminal`, which is 0/0 for a 1-step schedule."""
    from qwen_image_trt.models.checkpoint import read_config

    return 2 if read_config(checkpoint, "scheduler").get("shift_terminal") else 1


def generate_image(checkpoint, out, *, prompt: str, negative_prompt=None, seed: int = 0, steps: int = 20,
                   height: int = 1024, width: int = 1024, engines=None, backend: str = "torch", device="cpu",
                   true_cfg_scale: float = 4.0, pipe=None) -> Path:
    from qwen_image_trt.models.checkpoint import validate_checkpoint
    from qwen_image_trt.runtime.backends import check_backend

    check_backend(backend)
    validate_checkpoint(checkpoint)
    limits = request_limits(engines)
    if min_steps(checkpoint) > limits.steps[0]:
        limits = replace(limits, steps=(min_steps(checkpoint), limits.steps[1]))
    check_request(prompt, height, width, steps, limits, negative_prompt=negative_prompt)
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError("out", str(out), "a .png file path")
    if pipe is None:
        from qwen_image_trt.runtime.pipeline import load_pipeline

        pipe = load_pipeline(checkpoint, engines=engines, backend=backend, device=device, progress=True)
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, height=height,
                 width=width, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
