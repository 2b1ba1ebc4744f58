"""Finding, checking and identifying Qwen-Image checkpoints in the diffusers layout.

Tiny and real checkpoints go through the same code: `from_pretrained` on a local folder, offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from qwen_image_trt.errors import CheckpointError

SUPPORTED_PIPELINES = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
ALL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
_CONFIG_FILES = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}


def validate_checkpoint(path: str | os.PathLike, parts=ALL_PARTS) -> Path:
    """Return the checkpoint folder, or raise CheckpointError naming what is missing or wrong."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {str(root)!r} does not exist")
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"{root} has no model_index.json: not a diffusers pipeline checkpoint")
    index = json.loads(index_file.read_text())
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise CheckpointError(f"{root} holds a {cls!r} checkpoint; supported: {', '.join(SUPPORTED_PIPELINES)}")
    missing = [p for p in parts if not (root / p / _CONFIG_FILES[p]).is_file()]
    if missing:
        raise CheckpointError(f"{root} is missing part(s) {', '.join(missing)} "
                              f"(expected {', '.join(f'{p}/{_CONFIG_FILES[p]}' for p in missing)})")
    for part in set(parts) & {"transformer", "vae", "text_encoder"}:
        if not list((root / part).glob("*.safetensors")) and not list((root / part).glob("*.bin")):
            raise CheckpointError(f"{root}/{part} has a config but no weights (*.safetensors)")
    return root


def read_config(checkpoint: str | os.PathLike, part: str) -> dict:
    cfg = json.loads((Path(checkpoint) / part / _CONFIG_FILES[part]).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _weights_fingerprint(folder: Path) -> list:
    """Names, sizes and safetensors headers of the weight files: cheap even for a 40 GB model,
    yet changes whenever any tensor's name, shape, dtype or offset changes (and with the file size)."""
    rows = []
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.index.json"))
    for f in files:
        entry = [f.name, f.stat().st_size]
        with open(f, "rb") as fh:
            start = 0
            if f.suffix == ".safetensors":
                (n,) = struct.unpack("<Q", fh.read(8))
                entry.append(hashlib.sha256(fh.read(n)).hexdigest())
                start = 8 + n
            # A header says where tensors are, not what they hold: sample the data's first and last
            # MiB too (a fine-tune changes both) without reading 40 GB.
            fh.seek(start)
            entry.append(hashlib.sha256(fh.read(1 << 20)).hexdigest())
            fh.seek(max(start, entry[1] - (1 << 20)))
            entry.append(hashlib.sha256(fh.read()).hexdigest())
        rows.append(entry)
    return rows


def checkpoint_identity(checkpoint: str | os.PathLike, parts=("transformer", "vae")) -> str:
    """A short content hash of the configs and weight indexes of `parts`: what engines are built from."""
    root = Path(checkpoint)
    h = hashlib.sha256()
    h.update((root / "model_index.json").read_bytes())
    for part in parts:
        h.update(part.encode())
        h.update(json.dumps(read_config(root, part), sort_keys=True).encode())
        h.update(json.dumps(_weights_fingerprint(root / part)).encode())
    return h.hexdigest()[:16]


def load_transformer(checkpoint, dtype=None):
    import torch
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(
        checkpoint, subfolder="transformer", torch_dtype=dtype or torch.float32).eval()


def load_vae(checkpoint, dtype=None):
    import torch
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage.from_pretrained(checkpoint, subfolder="vae", torch_dtype=dtype or torch.float32).eval()
