"""One image from the command line or Python: checks first, then load, run, save."""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models.lora import LoraSpec
from qwen_image_trt.core.manifest import try_read_manifest
from qwen_image_trt.models.checkpoint import generation_defaults, validate_checkpoint
from qwen_image_trt.core.shapes import condition_resolution
from qwen_image_trt.models.pipelines import QWEN21_MEMBERS, pipeline_kind
from qwen_image_trt.runtime.backends import check_backend
from qwen_image_trt.runtime.images import check_image_inputs
from qwen_image_trt.runtime.limits import check_request, request_limits
from qwen_image_trt.runtime.pipeline import load_pipeline
from qwen_image_trt.runtime.limits import check_threshold


def default_request(checkpoint, engines=None) -> tuple[int, int, int]:
    """(width, height, steps) when a call names none: the first size the engine folder was built for (a TensorRT
    profile serves it best), else the checkpoint's own; the steps of the recipe the engines were made for, else the
    checkpoint's recommended steps."""
    (width, height), steps = generation_defaults(checkpoint)
    manifest = try_read_manifest(engines) if engines is not None else None
    if manifest is not None and manifest.sizes:
        width, height = manifest.sizes[0]
    if manifest is not None and manifest.sampling:  # engines made for a few-step recipe: its step count
        steps = int(manifest.sampling["steps"])
    return width, height, steps


def generate_image(checkpoint, out, *, prompt: str, negative_prompt=None, seed: int = 0, steps: int | None = None,
                   height: int | None = None, width: int | None = None, engines=None, backend: str = "torch",
                   device="cpu", true_cfg_scale: float = 4.0, pipe=None, trt_options: dict | None = None,
                   image=None, mask=None, strength: float | None = None, pipeline: str | None = None,
                   loras=(), step_cache: float | None = None, torch_options=None, control_image=None,
                   controlnet=None, controlnet_scale: float | None = None, kv_cache: bool = True) -> Path:
    """One PNG. Size and steps default to what the engine folder was built for and the checkpoint recommends.

    `image` (one, or a list of 1-3 for Edit-Plus), `mask` and `strength` go to the members that take them: the
    checkpoint's own (model_index.json) or `pipeline` ("img2img", "inpaint", "edit-inpaint").
    `loras` ("PATH[:SCALE]" or LoraSpec) are loaded into the pipeline with diffusers' API (engines: weights swapped
    by name) and set active together with their scales. `step_cache` is the threshold of runtime.step_cache.
    `control_image`, `controlnet` (folder; default the checkpoint's controlnet/) and `controlnet_scale` are the
    controlnet member's. `kv_cache=False`: Qwen-Image-2.1 without its prefix KV cache (`use_kv_cache=False`)."""
    check_backend(backend)
    validate_checkpoint(checkpoint)
    kind = pipeline_kind(checkpoint, pipeline)
    d_width, d_height, d_steps = default_request(checkpoint, engines)
    width = d_width if width is None else width
    height = d_height if height is None else height
    steps = d_steps if steps is None else steps
    limits = request_limits(engines, checkpoint)
    check_request(prompt, height, width, steps, limits, negative_prompt=negative_prompt)
    step_cache = check_threshold(step_cache)
    image_kwargs = check_image_inputs(kind, image, mask, strength, max_aspect=limits.condition_aspect,
                                      control_image=control_image, controlnet_scale=controlnet_scale)
    if kind in QWEN21_MEMBERS and image_kwargs.get("image"):
        image_kwargs["output_resolution"] = condition_resolution(height, width)
    if not kv_cache:
        if kind not in QWEN21_MEMBERS:
            raise InputError("kv_cache", kv_cache, f"on for {kind}: only Qwen-Image-2.1 has a prefix KV cache")
        image_kwargs["use_kv_cache"] = False
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InputError("out", str(out), "a .png file path")
    specs = [x if isinstance(x, LoraSpec) else LoraSpec.parse(x) for x in loras or ()]
    if pipe is None:
        pipe = load_pipeline(checkpoint, engines=engines, backend=backend, device=device, progress=True,
                             trt_options=trt_options, pipeline=kind, torch_options=torch_options,
                             controlnet=controlnet)
    if specs:
        names = [f"lora{i}" for i in range(len(specs))]
        for name, spec in zip(names, specs):
            pipe.load_lora_weights(str(spec.path), adapter_name=name)
        pipe.set_adapters(names, [spec.scale for spec in specs])
    if negative_prompt is None:
        true_cfg_scale = 1.0  # CFG is off without a negative prompt; any other value only makes diffusers warn
    image = pipe(prompt=prompt, negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, height=height,
                 width=width, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                 step_cache=step_cache, **image_kwargs).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
