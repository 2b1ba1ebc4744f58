"""Finding, checking and sizing Qwen-Image checkpoints in the diffusers layout.

Tiny and real checkpoints go through the same code: `from_pretrained` on a local folder, offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qwen_image_trt.core.errors import CheckpointError
from qwen_image_trt.core.identity import (
    CONFIG_FILES,
    checkpoint_identity,
    read_part_config,
    safetensors_header,
    weight_files,
)

# Checkpoints are local folders: never reach for a hub (a typo in a path must not become a download).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SUPPORTED_PIPELINES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                       "QwenImageControlNetPipeline", "QwenImage21Pipeline")
# Qwen-Image-2.1 (one pipeline for generation and editing, a single-stream transformer with a prefix KV cache, another
# VAE): its own graphs (models.specs.COMPONENTS_21) and drop-ins (runtime.transformer21). The stages that do not take
# it yet refuse it by name (`refuse_21`) instead of loading it into a 2509 class it does not fit.
QWEN21_PIPELINES = ("QwenImage21Pipeline",)
# Family checkpoints this project knows but no stage takes (none at present).
KNOWN_PIPELINES: dict[str, str] = {}
ALL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
TINY_MARKER = "TINY_RANDOM_WEIGHTS.txt"
# safetensors dtype names -> bytes per element and the precision name this project uses for them
_ST_DTYPES = {"F32": (4, "fp32"), "F16": (2, "fp16"), "BF16": (2, "bf16"), "F64": (8, "fp64"),
              "F8_E4M3": (1, "fp8"), "I8": (1, "int8"), "U8": (1, "uint8"), "I64": (8, "int64"), "I32": (4, "int32")}


def validate_checkpoint(path: str | os.PathLike, parts=ALL_PARTS) -> Path:
    """Return the checkpoint folder, or raise CheckpointError naming what is missing or wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {str(root)!r} does not exist")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} has no model_index.json: not a diffusers pipeline checkpoint")
    cls = pipeline_class(root)
    if cls in KNOWN_PIPELINES:
        name = KNOWN_PIPELINES[cls]
        raise CheckpointError(f"{root} is a {name} checkpoint ({cls}): {name} checkpoints are not exported or served "
                              f"yet (supported: {', '.join(SUPPORTED_PIPELINES)}); diffusers' {cls} runs it eagerly")
    if cls not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{root} holds a {cls!r} checkpoint; supported: {', '.join(SUPPORTED_PIPELINES)}")
    if cls in QWEN21_PIPELINES:  # a Qwen3-VL processor (tokenizer inside) instead of a tokenizer folder
        parts = tuple("processor" if p == "tokenizer" else p for p in parts)
    missing = [p for p in parts if not (root / p / CONFIG_FILES[p]).is_file()]
    if missing:
        raise CheckpointError(f"{root} is missing part(s) {', '.join(missing)} "
                              f"(expected {', '.join(f'{p}/{CONFIG_FILES[p]}' for p in missing)})")
    for part in set(parts) & {"transformer", "vae", "text_encoder"}:
        if not list((root / part).glob("*.safetensors")) and not list((root / part).glob("*.bin")):
            raise CheckpointError(f"{root}/{part} has a config but no weights (*.safetensors)")
    return root


def pipeline_class(root: str | os.PathLike) -> str:
    return json.loads((Path(root) / "model_index.json").read_text()).get("_class_name")


def is_qwen21(root: str | os.PathLike) -> bool:
    """A Qwen-Image-2.1 checkpoint (also 2.1-Turbo: the same class with `sample_sigmas` in model_index.json)."""
    return pipeline_class(root) in QWEN21_PIPELINES


def refuse_21(root: str | os.PathLike, stage: str, instead: str = "") -> None:
    """CheckpointError naming `stage` for a 2.1 checkpoint where that stage does not take 2.1 yet."""
    if is_qwen21(root):
        raise CheckpointError(f"{root} is a Qwen-Image-2.1 checkpoint ({pipeline_class(root)}): {stage} does not take "
                              f"2.1 checkpoints yet{'; ' + instead if instead else ''}")


def read_config(checkpoint: str | os.PathLike, part: str) -> dict:
    return read_part_config(checkpoint, part)


def is_tiny(checkpoint) -> bool:
    return (Path(checkpoint) / TINY_MARKER).is_file()


# What to generate when a request names no size or steps: Qwen-Image's model card (1024x1024 is
# diffusers' default_sample_size x vae_scale_factor; 50 steps is QwenImagePipeline's num_inference_steps);
# the tiny model's own, small enough to answer at once on a CPU.
REAL_DEFAULTS, TINY_DEFAULTS = ((1024, 1024), 50), ((64, 64), 4)


def generation_defaults(checkpoint) -> tuple[tuple[int, int], int]:
    """((width, height), steps) this checkpoint is meant to be run at."""
    return TINY_DEFAULTS if is_tiny(checkpoint) else REAL_DEFAULTS


@dataclass(frozen=True)
class WeightsInfo:
    """What a part's safetensors headers say: parameter count, bytes, and the dtype most bytes are in."""

    parameters: int
    bytes: int
    precision: str  # "bf16" for a real Qwen-Image checkpoint


def weights_info(checkpoint, part: str = "transformer") -> WeightsInfo:
    """Read from the headers only, so sizing a 40 GB transformer costs a few KB of reads."""
    params = size = 0
    by_dtype: dict[str, int] = {}
    for f in weight_files(Path(checkpoint) / part):
        if f.suffix != ".safetensors":
            continue
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= int(d)
            width, prec = _ST_DTYPES.get(t["dtype"], (0, t["dtype"].lower()))
            params += n
            size += n * width
            by_dtype[prec] = by_dtype.get(prec, 0) + n * width
    if not by_dtype:
        raise CheckpointError(f"{checkpoint}/{part} has no .safetensors weights to size")
    return WeightsInfo(params, size, max(by_dtype, key=by_dtype.get))


def min_steps(checkpoint) -> int:
    """Qwen-Image's scheduler stretches sigmas to `shift_terminal`, which is 0/0 for a 1-step schedule."""
    return 2 if read_config(checkpoint, "scheduler").get("shift_terminal") else 1


# The class of each part by checkpoint family: 2.1 has its own transformer and VAE.
_PART_CLASSES = {"transformer": ("QwenImageTransformer2DModel", "QwenImage21Transformer2DModel"),
                 "vae": ("AutoencoderKLQwenImage", "AutoencoderKLQwenImage21")}


def part_class(checkpoint, part: str):
    """The diffusers class of a checkpoint's transformer or VAE (by family, not by trusting model_index.json)."""
    import diffusers

    return getattr(diffusers, _PART_CLASSES[part][1 if is_qwen21(checkpoint) else 0])


def load_transformer(checkpoint, dtype=None):
    import torch

    return part_class(checkpoint, "transformer").from_pretrained(
        checkpoint, subfolder="transformer", torch_dtype=dtype or torch.float32).eval()


def load_vae(checkpoint, dtype=None):
    import torch

    return part_class(checkpoint, "vae").from_pretrained(checkpoint, subfolder="vae",
                                                         torch_dtype=dtype or torch.float32).eval()


__all__ = ["validate_checkpoint", "read_config", "checkpoint_identity", "pipeline_class", "is_tiny", "weights_info",
           "WeightsInfo", "min_steps", "load_transformer", "load_vae", "part_class", "is_qwen21", "refuse_21", "SUPPORTED_PIPELINES", "KNOWN_PIPELINES",
           "QWEN21_PIPELINES"]
