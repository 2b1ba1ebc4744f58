"""The Qwen-Image family's pipelines: which diffusers class runs a checkpoint, the parts that stay eager
(text encoder, tokenizer, processor, scheduler), and the stock pipeline assembled from a checkpoint: the
reference calibration drives and parity compares with.

A checkpoint's model_index.json names its class; `pipeline=` runs it as another member that uses the same
weights (a text-to-image checkpoint as img2img or inpaint; an Edit checkpoint as edit-inpaint).
"""

from __future__ import annotations

from pathlib import Path

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.models import checkpoint as ckpt

# member name -> diffusers class
FAMILY = {
    "text-to-image": "QwenImagePipeline",
    "img2img": "QwenImageImg2ImgPipeline",
    "inpaint": "QwenImageInpaintPipeline",
    "edit": "QwenImageEditPipeline",
    "edit-inpaint": "QwenImageEditInpaintPipeline",
    "edit-plus": "QwenImageEditPlusPipeline",
    "controlnet": "QwenImageControlNetPipeline",
    "qwen-image-2.1": "QwenImage21Pipeline",
    # 2.1-Turbo: diffusers' modular pipeline for a 2.1 checkpoint that ships `sample_sigmas` (runtime.pipeline21)
    "qwen-image-2.1-turbo": "QwenImage21TurboModularPipeline",
}
# checkpoint class (model_index.json) -> the members its weights run, its own first
MEMBERS = {
    "QwenImagePipeline": ("text-to-image", "img2img", "inpaint", "controlnet"),
    "QwenImageControlNetPipeline": ("controlnet", "text-to-image", "img2img", "inpaint"),
    "QwenImageEditPipeline": ("edit", "edit-inpaint"),
    "QwenImageEditPlusPipeline": ("edit-plus",),
    "QwenImage21Pipeline": ("qwen-image-2.1", "qwen-image-2.1-turbo"),
}
# Qwen-Image-2.1's members: one pipeline generates (no image) and edits (`image=`, one or more condition images).
QWEN21_MEMBERS = ("qwen-image-2.1", "qwen-image-2.1-turbo")
# Members whose call takes images, and which of those also take a mask.
IMAGE_MEMBERS = ("img2img", "inpaint", "edit", "edit-inpaint", "edit-plus", "controlnet", *QWEN21_MEMBERS)
MASK_MEMBERS = ("inpaint", "edit-inpaint")


def pipeline_kind(checkpoint, pipeline: str | None = None) -> str:
    """The family member to run `checkpoint` as: its own, or `pipeline` if its weights can run that member."""
    cls = ckpt.pipeline_class(checkpoint)
    members = MEMBERS.get(cls)
    if members is None:
        raise InputError("checkpoint", str(checkpoint), f"a checkpoint of {', '.join(MEMBERS)} (it holds {cls})")
    if pipeline is None:
        return "qwen-image-2.1-turbo" if cls == "QwenImage21Pipeline" and shipped_sigmas(checkpoint) else members[0]
    if pipeline not in members:
        raise InputError("pipeline", pipeline, f"one of {', '.join(members)} for a {cls} checkpoint")
    if pipeline == "qwen-image-2.1-turbo" and not shipped_sigmas(checkpoint):
        raise InputError("pipeline", pipeline, f"qwen-image-2.1 for {checkpoint}: the Turbo pipeline needs a checkpoint "
                         "whose model_index.json ships its few-step grid (sample_sigmas)")
    return pipeline


def shipped_sigmas(checkpoint) -> list[float] | None:
    """A 2.1-Turbo checkpoint's few-step sigma grid (model_index.json `sample_sigmas`), or None."""
    import json

    sigmas = json.loads((Path(checkpoint) / "model_index.json").read_text()).get("sample_sigmas")
    return [float(x) for x in sigmas] if sigmas else None


def uses_processor(kind: str) -> bool:
    """The edit members feed images to the text encoder through a Qwen2-VL processor."""
    return kind.startswith("edit")


def stock_class(kind: str):
    import diffusers

    return getattr(diffusers, FAMILY["qwen-image-2.1" if kind == "qwen-image-2.1-turbo" else kind])


def load_eager_parts(root: Path, device="cpu", dtype=None, kind: str = "text-to-image",
                     text_encoder: bool = True, controlnet=None) -> dict:
    """scheduler, text_encoder, tokenizer (and processor for edit members, the ControlNet for `controlnet`) of
    `root`, ready for a pipeline class. `text_encoder=False` leaves the encoder out (None): prompts are encoded
    elsewhere (serve --role denoiser). `controlnet`: a ControlNet folder (default: the checkpoint's controlnet/)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = Path(root)
    if kind in QWEN21_MEMBERS:
        return _eager_parts_21(root, device, dtype, text_encoder)
    encoder = None
    if text_encoder:
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder",
                                                                     dtype=dtype or torch.float32).eval().to(device)
    parts = {"scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
             "text_encoder": encoder, "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer")}
    if uses_processor(kind):
        from qwen_image_trt.models.processor import load_processor

        if not (root / "processor").is_dir():
            raise InputError("checkpoint", str(root), f"a processor/ folder: the {kind} pipeline feeds images to "
                             "its text encoder through a Qwen2-VL processor")
        parts["processor"] = load_processor(root / "processor")
    if kind == "controlnet":
        from qwen_image_trt.models.controlnet import find_controlnet, load_controlnet

        path = find_controlnet(root, controlnet)
        if path is None:
            raise InputError("controlnet", None, f"a QwenImageControlNetModel folder for the controlnet member ({root} "
                             "has no controlnet/ subfolder)")
        parts["controlnet"] = load_controlnet(path, dtype, device)
    return parts


def _eager_parts_21(root: Path, device, dtype, text_encoder: bool) -> dict:
    """Qwen-Image-2.1: a Qwen3-VL text encoder and its processor (the tokenizer inside), the scheduler, and the
    checkpoint's shipped sigma grid (None but for Turbo)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3VLForConditionalGeneration

    from qwen_image_trt.models.processor import load_qwen3vl_processor

    encoder = None
    if text_encoder:
        encoder = Qwen3VLForConditionalGeneration.from_pretrained(root / "text_encoder",
                                                                  dtype=dtype or torch.float32).eval().to(device)
    return {"scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"), "text_encoder": encoder,
            "processor": load_qwen3vl_processor(root / "processor"), "sample_sigmas": shipped_sigmas(root)}


def load_stock_pipeline(checkpoint, device="cpu", dtype=None, pipeline: str | None = None, controlnet=None):
    """diffusers' own pipeline class for the checkpoint (or `pipeline`) with eager modules: nothing of this project
    in the denoising loop."""
    import torch

    root = ckpt.validate_checkpoint(checkpoint)
    kind = pipeline_kind(root, pipeline)
    dtype = dtype or torch.float32
    pipe = stock_class(kind)(transformer=ckpt.load_transformer(root, dtype).to(device),
                             vae=ckpt.load_vae(root, dtype).to(device),
                             **load_eager_parts(root, device, dtype, kind, controlnet=controlnet))
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["FAMILY", "MEMBERS", "QWEN21_MEMBERS", "shipped_sigmas", "IMAGE_MEMBERS", "MASK_MEMBERS", "pipeline_kind", "uses_processor", "stock_class",
           "load_eager_parts", "load_stock_pipeline"]
