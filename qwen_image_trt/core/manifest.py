"""manifest.json: what a stage made, from what, with which tools. One typed, versioned schema, read and
written here only; later stages read these models, never another stage's files or internals.

Two documents share the schema version: an engine-folder manifest (`Manifest`: stages export, quantize,
build) and a calibration-set manifest (`CalibrationManifest`). Paths inside are relative to the folder
holding the manifest. A manifest of another schema version is refused with a "rebuild" message; stages
that would overwrite one treat it as absent (`try_read_manifest`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwen_image_trt.core.errors import EngineMismatchError
from qwen_image_trt.core.files import file_sha256, write_atomic

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- engine folders ------------------------------------------------------------------------------------
class CheckpointRef(_Strict):
    path: str
    identity: str
    pipeline: str
    transformer_config: dict[str, Any]
    vae_config: dict[str, Any]


class TensorInfo(_Strict):
    name: str
    dtype: str
    shape: list[int | str]


class GraphFile(_Strict):
    """An ONNX graph: the .onnx (structure) and its external data (weights), both hashed when written."""

    file: str
    sha256: str
    external_data: str | None = None
    external_data_sha256: str | None = None
    bytes: int

    def path(self, folder) -> Path:
        return Path(folder) / self.file

    def data_path(self, folder) -> Path | None:
        return self.path(folder).parent / self.external_data if self.external_data else None

    def intact(self, folder) -> bool:
        """The graph file has its recorded hash and the data file its recorded size. (The data is not
        re-hashed: reading 40 GB on every resume would cost more than the stage it guards.)"""
        graph = self.path(folder)
        if not graph.is_file() or file_sha256(graph) != self.sha256:
            return False
        data = self.data_path(folder)
        size = graph.stat().st_size + (data.stat().st_size if data is not None and data.is_file() else 0)
        return (data is None or data.is_file()) and size == self.bytes

    def identity(self) -> dict:
        return {"graph_sha256": self.sha256, "weights_sha256": self.external_data_sha256}

    def relocated(self, prefix: str) -> "GraphFile":
        """The same graph seen from a folder one level up (`prefix`/file)."""
        return self.model_copy(update={"file": f"{prefix}/{self.file}"})


class OrtEngine(_Strict):
    """An ONNX Runtime offline-optimized model."""

    file: str
    sha256: str
    external_data: str | None = None
    level: str
    providers: list[str]
    onnxruntime: str
    bytes: int
    seconds: float


class TensorRTEngine(_Strict):
    file: str
    bytes: int
    tensorrt: str
    gpu: str
    compute_capability: str
    profiles: dict[str, dict[str, list[int]]]
    cache_key: str
    builder: dict[str, Any]
    limits: dict[str, list[int]] = Field(default_factory=dict)
    seconds: float | None = None


class Component(_Strict):
    """One exported graph (transformer, vae_decoder, vae_encoder) and the engines built from it."""

    graph: GraphFile
    precision: str  # what this component computes in (an int8 build keeps its VAE in fp32)
    source: dict[str, Any]  # what it was made from: equal sources + intact files = the stage may skip it
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_axes: dict[str, dict[str, str]]
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    check: dict[str, Any] | None = None  # the stage's own ONNX Runtime run (vs eager / vs fake-quant)
    qdq: dict[str, Any] | None = None
    lint: dict[str, Any] | None = None  # `qitrt lint` of this graph: {"graph_sha256", "ok", "errors", "warnings"}
    onnxruntime: OrtEngine | None = None
    tensorrt: TensorRTEngine | None = None


class Quantization(_Strict):
    recipe: dict[str, Any]
    recipe_hash: str
    calibration: dict[str, Any]
    quantized_layers: list[str]
    kept_layers: list[str]
    text_bucket: int
    evidence: dict[str, Any] | None = None


class StageRun(_Strict):
    stage: str
    status: Literal["ran", "skipped", "reused", "failed"]
    seconds: float
    detail: str = ""
    peak_rss_bytes: int | None = None


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    stage: Literal["export", "quantize", "build"]
    checkpoint: CheckpointRef
    precision: str
    opset: int
    exporter: str
    versions: dict[str, str]
    components: dict[str, Component] = Field(default_factory=dict)
    quantization: Quantization | None = None
    target: Literal["onnxruntime", "tensorrt"] | None = None
    limits: dict[str, list[int]] | None = None
    sizes: list[list[int]] | None = None
    max_batch: int | None = None
    calibration: str | None = None
    stages: list[StageRun] | None = None
    loras: list[dict[str, Any]] | None = None  # adapters merged into the transformer at export (name, sha256, scale)
    sampling: dict[str, Any] | None = None  # the scheduler and step count the engines are made for (models.sampling)
    updated: str | None = None
    # Not written: whether the call that returned this manifest did the work or found it done.
    ran: bool = Field(default=True, exclude=True)

    def component(self, name: str, folder=None) -> Component:
        if name not in self.components:
            where = f"{folder} has" if folder else "this engine folder has"
            raise EngineMismatchError(f"{where} no {name!r} graph; it holds {sorted(self.components) or 'none'}")
        return self.components[name]


# -- calibration sets ----------------------------------------------------------------------------------
class CheckpointId(_Strict):
    path: str
    identity: str


class CalibrationCall(_Strict):
    key: str
    step: int
    branch: Literal["cond", "uncond", "batched"] = "batched"
    grid: list[int]
    batch: int
    text_len: int
    # The edit members: each condition image's (frame, h, w) after the target's, in sequence order.
    condition_grids: list[list[int]] | None = None


class CalibrationSample(_Strict):
    index: int
    prompt_id: str
    lang: str
    category: str
    seed: int
    size: list[int]
    split: Literal["calib", "holdout"]
    file: str
    sha256: str | None = None
    bytes: int | None = None
    calls: list[CalibrationCall] = Field(default_factory=list)


class CalibrationManifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    stage: Literal["calibrate"] = "calibrate"
    checkpoint: CheckpointId
    source: dict[str, Any]
    versions: dict[str, str]
    samples: list[CalibrationSample] = Field(default_factory=list)
    set_id: str | None = None
    seconds: float | None = None
    totals: dict[str, int] | None = None
    updated: str | None = None
    ran: bool = Field(default=True, exclude=True)


# -- reading and writing -------------------------------------------------------------------------------
M = TypeVar("M", Manifest, CalibrationManifest)
_REBUILD = {Manifest: "re-run `qitrt export` / `qitrt build` into this folder with --force, or into a new one",
            CalibrationManifest: "re-run `qitrt calibrate` into this folder with --force, or into a new one"}


def _read(folder, model: type[M]) -> M:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        what = "a calibration set made by `qitrt calibrate`" if model is CalibrationManifest else \
            "an engine folder made by `qitrt export`/`qitrt build`"
        raise EngineMismatchError(f"{folder} has no {MANIFEST}: not {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{path} is not valid JSON ({e}): {_REBUILD[model]}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        said = f"schema {version}" if version is not None else "no schema version (qwen-image-trt 0.1)"
        raise EngineMismatchError(f"{path} was written by another version of qwen-image-trt ({said}; this one reads "
                                  f"schema {SCHEMA_VERSION}): rebuild with this version - {_REBUILD[model]}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise EngineMismatchError(f"{path} does not match manifest schema {SCHEMA_VERSION} ({e.error_count()} "
                                  f"problem(s); first: {field}: {first['msg']}): {_REBUILD[model]}") from None


def read_manifest(folder: str | os.PathLike) -> Manifest:
    return _read(folder, Manifest)


def read_calibration_manifest(folder: str | os.PathLike) -> CalibrationManifest:
    return _read(folder, CalibrationManifest)


def try_read_manifest(folder, model: type[M] = Manifest) -> M | None:
    """The folder's manifest, or None when it has none or one this version cannot reuse (a stage then
    starts afresh; what it writes replaces the old one)."""
    try:
        return _read(folder, model)
    except EngineMismatchError:
        return None


def write_manifest(folder: str | os.PathLike, manifest: Manifest | CalibrationManifest) -> Path:
    manifest.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = manifest.model_dump_json(indent=2, exclude_none=False)
    return write_atomic(Path(folder) / MANIFEST, text + "\n")


def check_engines_match(manifest: Manifest, checkpoint_identity: str, folder) -> None:
    """Refuse engines exported from another checkpoint or config."""
    built_from = manifest.checkpoint.identity
    if built_from != checkpoint_identity:
        raise EngineMismatchError(
            f"engines in {folder} were built from checkpoint {built_from} ({manifest.checkpoint.path}), but this "
            f"checkpoint is {checkpoint_identity}: re-export with `qitrt export` for this checkpoint")


__all__ = ["SCHEMA_VERSION", "MANIFEST", "Manifest", "Component", "GraphFile", "OrtEngine", "TensorRTEngine",
           "TensorInfo", "CheckpointRef", "Quantization", "StageRun", "CalibrationManifest", "CalibrationSample",
           "CalibrationCall", "CheckpointId", "read_manifest", "read_calibration_manifest", "try_read_manifest",
           "write_manifest", "check_engines_match"]
