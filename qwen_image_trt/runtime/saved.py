"""What the drop-ins are to diffusers: ModelMixin/ConfigMixin modules with the checkpoint's config, saved and loaded
by the pipeline's own `save_pretrained` / `from_pretrained`.

An engine is not copied into a saved pipeline folder (a 41 GB transformer would be written twice): the component's
config.json holds the checkpoint's config and a `qitrt` record naming the engine folder, its backend and the
checkpoint identity its manifest must still show. Loading checks that record against the folder and makes the
runners again, so `DiffusionPipeline.from_pretrained(DIR)` (this package installed) and `load_pipeline(DIR)` run
the same engines. The rest of the pipeline (text encoder, tokenizer, scheduler, processor, ControlNet) is saved by
diffusers as usual.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin

from qwen_image_trt.core.errors import InputError

RECORD = "qitrt"  # the key of the engine record in a saved drop-in's config.json


class EngineModule(ModelMixin, ConfigMixin):
    """Base of the drop-ins: the config is the checkpoint's (read by the pipelines as `module.config.x`), `device`
    and `dtype` say where the engine runs and the pipeline-side I/O dtype; there are no parameters to move."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    def _register_checkpoint_config(self, config: dict) -> None:
        self.register_to_config(**{k: v for k, v in dict(config).items() if not k.startswith("_") and k != RECORD})
        self.engine_source: dict | None = None  # set by load_pipeline: what save_pretrained records

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pipeline works in around this module (float32 unless `.to(dtype)` said otherwise). The
        graph's own I/O is float32 whatever the engine computes in: inputs are cast in, outputs back to this."""
        return getattr(self, "_io_dtype", torch.float32)

    def save_pretrained(self, save_directory, **kwargs):
        """config.json: the checkpoint's config plus the engine record; no weights (the engine folder holds them)."""
        if self.engine_source is None:
            raise NotImplementedError(f"{type(self).__name__}.save_pretrained: this drop-in was not made by "
                                      "load_pipeline, so it knows no engine folder to record")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        import diffusers

        config = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__,
                  **dict(self.config), RECORD: self.engine_source}
        (out / self.config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The drop-in a saved pipeline folder names, on the engines its record names. diffusers passes its loading
        options (torch_dtype, device_map, ...): a floating torch_dtype becomes the I/O dtype, the rest do not apply
        to an engine and are ignored."""
        subfolder = kwargs.get("subfolder")
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        config, record = read_saved(folder)
        module = cls.from_record(config, record)
        dtype = kwargs.get("torch_dtype")
        if isinstance(dtype, dict):  # diffusers allows {component: dtype}
            dtype = dtype.get(folder.name, dtype.get("default"))
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            module._io_dtype = dtype
        return module

    @classmethod
    def from_record(cls, config: dict, record: dict):
        raise NotImplementedError


def engine_record(engines, backend: str, component: str, identity: str, device, **extra) -> dict:
    """What a saved drop-in needs to find its engines again and know they are the same."""
    return {"engines": str(Path(engines).resolve()), "backend": backend, "component": component,
            "checkpoint_identity": identity, "device": str(device), **extra}


def read_saved(folder) -> tuple[dict, dict]:
    """(checkpoint config, engine record) of a saved drop-in folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise InputError("checkpoint", str(folder), "a saved engine pipeline component (config.json)")
    config = json.loads(path.read_text())
    record = config.get(RECORD)
    if not isinstance(record, dict):
        raise InputError("checkpoint", str(folder), f"a config.json with a {RECORD!r} engine record (written by "
                         "save_pretrained of an engine pipeline)")
    return config, record


def engines_for(record: dict):
    """The engine folder of a record, checked: it must exist and still hold engines of the recorded checkpoint."""
    from qwen_image_trt.core.manifest import check_engines_match, read_manifest

    folder = Path(record["engines"])
    if not folder.is_dir():
        raise InputError("engines", str(folder), "the engine folder this pipeline was saved with (it is gone: "
                         "rebuild it there or edit the qitrt record in the saved config.json)")
    manifest = read_manifest(folder)
    check_engines_match(manifest, record["checkpoint_identity"], folder)
    return folder, manifest


def open_engine_folder(engines, identity: str, backend: str):
    """The manifest of the engine folder `load_pipeline` was given, checked: given, a folder, built from the
    checkpoint of `identity`."""
    from qwen_image_trt.core.manifest import check_engines_match, read_manifest

    if engines is None:
        raise InputError("engines", None, f"an engine folder made by `qitrt export`/`qitrt build` for backend {backend}")
    if not Path(engines).is_dir():
        raise InputError("engines", str(engines), "an existing engine folder")
    manifest = read_manifest(engines)
    check_engines_match(manifest, identity, engines)
    return manifest


def is_saved_engine_pipeline(folder) -> bool:
    """A folder written by an engine pipeline's save_pretrained: its transformer is a recorded drop-in."""
    path = Path(folder) / "transformer" / "config.json"
    return path.is_file() and RECORD in json.loads(path.read_text())


__all__ = ["EngineModule", "RECORD", "engine_record", "read_saved", "engines_for", "open_engine_folder",
           "is_saved_engine_pipeline"]
