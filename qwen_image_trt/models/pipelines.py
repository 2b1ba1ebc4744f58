"""The parts of a Qwen-Image pipeline that stay eager (text encoder, tokenizer, scheduler), and the stock
diffusers pipeline assembled from a checkpoint: the reference calibration drives and parity compares with."""

from __future__ import annotations

from pathlib import Path

from qwen_image_trt.models import checkpoint as ckpt


def load_eager_parts(root: Path, device="cpu", dtype=None) -> dict:
    """scheduler, text_encoder, tokenizer of `root`, ready for a QwenImagePipeline(**parts, ...)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder",
                                                                       dtype=dtype or torch.float32).eval()
    return {"scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
            "text_encoder": text_encoder.to(device), "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer")}


def load_stock_pipeline(checkpoint, device="cpu", dtype=None):
    """diffusers' own QwenImagePipeline with eager modules: nothing of this project in the denoising loop."""
    import torch
    from diffusers import QwenImagePipeline

    root = ckpt.validate_checkpoint(checkpoint)
    dtype = dtype or torch.float32
    pipe = QwenImagePipeline(transformer=ckpt.load_transformer(root, dtype).to(device),
                             vae=ckpt.load_vae(root, dtype).to(device), **load_eager_parts(root, device, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


__all__ = ["load_eager_parts", "load_stock_pipeline"]
