"""Identities: what a checkpoint is, which tools made a file. Cheap to compute, even for a 40 GB model."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from pathlib import Path

CONFIG_FILES = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "tokenizer": "tokenizer_config.json", "processor": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
SAMPLE_BYTES = 1 << 20


def read_part_config(checkpoint: str | os.PathLike, part: str) -> dict:
    """A checkpoint part's config without diffusers' private keys (`_class_name`, `_diffusers_version`)."""
    cfg = json.loads((Path(checkpoint) / part / CONFIG_FILES[part]).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.index.json"))


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a .safetensors file: {tensor: {"dtype", "shape", "data_offsets"}}; reads no data."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _weights_fingerprint(folder: Path) -> list:
    """Names, sizes and safetensors headers of the weight files, plus the first and last MiB of data: cheap
    for a 40 GB model, yet changes with any tensor's name, shape, dtype or offset, and with a fine-tune
    (which changes both ends)."""
    rows = []
    for f in weight_files(folder):
        entry = [f.name, f.stat().st_size]
        with open(f, "rb") as fh:
            start = 0
            if f.suffix == ".safetensors":
                (n,) = struct.unpack("<Q", fh.read(8))
                entry.append(hashlib.sha256(fh.read(n)).hexdigest())
                start = 8 + n
            fh.seek(start)
            entry.append(hashlib.sha256(fh.read(SAMPLE_BYTES)).hexdigest())
            fh.seek(max(start, entry[1] - SAMPLE_BYTES))
            entry.append(hashlib.sha256(fh.read()).hexdigest())
        rows.append(entry)
    return rows


def checkpoint_identity(checkpoint: str | os.PathLike, parts=("transformer", "vae")) -> str:
    """A short content hash of the configs and weight fingerprints of `parts`: what engines are built from."""
    root = Path(checkpoint)
    h = hashlib.sha256()
    h.update((root / "model_index.json").read_bytes())
    for part in parts:
        h.update(part.encode())
        h.update(json.dumps(read_part_config(root, part), sort_keys=True).encode())
        h.update(json.dumps(_weights_fingerprint(root / part)).encode())
    return h.hexdigest()[:16]


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnx-ir", "onnxruntime", "nvidia-modelopt",
                "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


__all__ = ["checkpoint_identity", "read_part_config", "safetensors_header", "tool_versions", "weight_files"]
