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
}
# checkpoint class (model_index.json) -> the members its weights run, its own first
MEMBERS = {
    "QwenImagePipeline": ("text-to-image", "img2img", "inpaint", "controlnet"),
    "QwenImageControlNetPipeline": ("controlnet", "text-to-image", "img2img", "inpaint"),
    "QwenImageEditPipeline": ("edit", "edit-inpaint"),
    "QwenImageEditPlusPipeline": ("edit-plus",),
}
# Members whose call takes images, and which of those also take a mask.
IMAGE_MEMBERS = ("img2img", "inpaint", "edit", "edit-inpaint", "edit-plus", "controlnet")
MASK_MEMBERS = ("inpaint", "edit-inpaint")


def pipeline_kind(checkpoint, pipeline: str | None = None) -> str:
    """The family member to run `checkpoint` as: its own, or `pipeline` if its weights can run that member."""
    cls = ckpt.pipeline_class(checkpoint)
    members = MEMBERS.get(cls)
    if members is None:
        raise InputError("checkpoint", str(checkpoint), f"a checkpoint of {', '.join(MEMBERS)} (it holds {cls})")
    if pipeline is None:
        return members[0]
    if pipeline not in members:
        raise InputError("pipeline", pipeline, f"one of {', '.join(members)} for a {cls} checkpoint")
    return pipeline


def uses_processor(kind: str) -> bool:
    """The edit members feed images to the text encoder through a Qwen2-VL processor."""
    return kind.startswith("edit")


def stock_class(kind: str):
    import diffusers

    return getattr(diffusers, FAMILY[kind])


def load_eager_parts(root: Path, device="cpu", dtype=None, kind: str = "text-to-image",
                     text_encoder: bool = True, controlnet=None) -> dict:
    """scheduler, text_encoder, tokenizer (and processor for edit members, the ControlNet for `controlnet`) of
    `root`, ready for a pipeline class. `text_encoder=False` leaves the encoder out (None): prompts are encoded
    elsewhere (serve --role denoiser). `controlnet`: a ControlNet folder (default: the checkpoint's controlnet/)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    root = Path(root)
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


__all__ = ["FAMILY", "MEMBERS", "IMAGE_MEMBERS", "MASK_MEMBERS", "pipeline_kind", "uses_processor", "stock_class",
           "load_eager_parts", "load_stock_pipeline"]
