"""manifest.json: what a build stage made, from what, with which tools. Later stages read only this."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from qwen_image_trt.errors import EngineMismatchError

MANIFEST = "manifest.json"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "nvidia-modelopt", "tensorrt"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def entry_files_intact(folder, entry: dict) -> bool:
    """An entry's graph file has its recorded hash and its external data file (>2 GB graphs) its recorded size.
    (The data file is not hashed: reading 40 GB on every resume would cost more than the stage it guards.)"""
    folder = Path(folder)
    graph = folder / entry["file"]
    if not graph.is_file() or file_sha256(graph) != entry.get("sha256"):
        return False
    if entry.get("external_data"):
        data = folder / entry["external_data"]
        return data.is_file() and data.stat().st_size + graph.stat().st_size == entry.get("bytes")
    return True


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise EngineMismatchError(f"{folder} has no {MANIFEST}: not an engine folder made by `qitrt export`/`qitrt build`")
    return json.loads(path.read_text())


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write via a temporary file and rename: a crash never leaves half a manifest, engine or result."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else memoryview(data))
    os.replace(tmp, path)
    return path


def write_manifest(folder: str | os.PathLike, manifest: dict) -> Path:
    manifest = dict(manifest, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return write_atomic(Path(folder) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_engines_match(manifest: dict, checkpoint_identity: str, folder) -> None:
    """Refuse engines exported from another checkpoint or config."""
    built_from = manifest.get("checkpoint", {}).get("identity")
    if built_from != checkpoint_identity:
        raise EngineMismatchError(
            f"engines in {folder} were built from checkpoint {built_from} "
            f"({manifest.get('checkpoint', {}).get('path')}), but this checkpoint is {checkpoint_identity}: "
            "re-export with `qitrt export` for this checkpoint")
