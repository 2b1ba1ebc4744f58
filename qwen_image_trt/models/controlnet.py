"""ControlNets for Qwen-Image: where one is, how many residuals it gives, and loading it.

A QwenImageControlNetModel (InstantX's Union, or a tiny one made here) runs eagerly beside the engines: it is a few
blocks of the transformer's width, and what the engine needs from it is only its residuals, which the transformer
graph's ControlNet variant takes as one input `controlnet_residuals` [blocks, batch, image_tokens, inner_dim]. The
number of blocks is fixed in that graph, so it is read from the ControlNet's config at export and checked at run.
"""

from __future__ import annotations

import json
from pathlib import Path

from qwen_image_trt.core.errors import InputError

SUBFOLDER = "controlnet"  # a QwenImageControlNetPipeline checkpoint keeps its ControlNet here


def find_controlnet(checkpoint, controlnet=None) -> Path | None:
    """The ControlNet folder: `controlnet` when given (it must hold a QwenImageControlNetModel), else the checkpoint's
    own controlnet/ subfolder, else None."""
    if controlnet is None:
        own = Path(checkpoint) / SUBFOLDER
        return own if (own / "config.json").is_file() else None
    path = Path(controlnet)
    config = path / "config.json"
    if not config.is_file():
        raise InputError("controlnet", str(controlnet), "a QwenImageControlNetModel folder (config.json + weights)")
    name = json.loads(config.read_text()).get("_class_name")
    if name != "QwenImageControlNetModel":
        raise InputError("controlnet", str(controlnet), f"a QwenImageControlNetModel folder (it holds {name!r}; "
                         "several ControlNets: export with one, they share its block count)")
    return path


def controlnet_blocks(path) -> int:
    """How many residuals the ControlNet at `path` returns per call: its num_layers."""
    return int(json.loads((Path(path) / "config.json").read_text())["num_layers"])


def load_controlnet(path, dtype=None, device="cpu"):
    import torch
    from diffusers import QwenImageControlNetModel

    return QwenImageControlNetModel.from_pretrained(path, torch_dtype=dtype or torch.float32).eval().to(device)


__all__ = ["SUBFOLDER", "find_controlnet", "controlnet_blocks", "load_controlnet"]
