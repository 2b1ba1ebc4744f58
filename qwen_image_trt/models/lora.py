"""LoRA adapters for the Qwen-Image transformer, read the way diffusers reads them. (torch and diffusers are
imported where used: the server's parent process checks adapter names with this module and stays torch-free.)

Any format diffusers loads for Qwen-Image (diffusers/PEFT, kohya `lora_unet_*` with alphas, the Lightning
release's `lora_down`/`lora_up` keys) goes through `QwenImagePipeline.lora_state_dict`, diffusers' own key
conversion. Which modules an adapter targets and each module's scale (alpha / rank, rank and alpha patterns)
come from injecting it with diffusers' `load_lora_adapter` into a transformer built on the meta device: PEFT
decides, nothing here re-derives its rules, and a 20 B transformer costs no memory. What this module adds is
the arithmetic engines need and PEFT does at run time: delta W = scale * B @ A per Linear, kept as factors
(rank r) until a weight is actually rewritten.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.files import file_sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:SCALE]` argument."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        path, _, scale = str(text).rpartition(":")
        if path and not Path(text).exists():
            try:
                value = float(scale)
            except ValueError:
                value = None  # a ':' that is part of the file name
            if value is not None:
                return cls(Path(path), value).checked()
        return cls(Path(text)).checked()

    def checked(self) -> "LoraSpec":
        if not self.path.is_file():
            raise InputError("lora", str(self.path), "a LoRA .safetensors file, optionally followed by :SCALE "
                             "(e.g. style.safetensors:0.8)")
        if not -10.0 <= self.scale <= 10.0:
            raise InputError("lora scale", self.scale, "a number in [-10, 10]")
        return self

    def label(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass
class LoraFactors:
    """One Linear's low-rank update: delta W = scale * B @ A, W of shape [out, in]."""

    down: torch.Tensor  # A: [rank, in]
    up: torch.Tensor  # B: [out, rank]
    scale: float

    def delta(self) -> torch.Tensor:
        return (self.up.float() @ self.down.float()) * self.scale


@dataclass
class Adapter:
    """A LoRA read for one transformer config: module path (inside QwenImageTransformer2DModel) -> factors."""

    name: str
    modules: dict[str, LoraFactors]
    source: str = ""  # file path, or "<state dict>"
    sha256: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.modules.values())

    def record(self, scale: float = 1.0) -> dict:
        """What a manifest says about this adapter: enough to tell two adapters (or two scales) apart."""
        return {"name": self.name, "file": Path(self.source).name if self.sha256 else self.source,
                "path": str(Path(self.source).resolve()) if self.sha256 else None,
                "sha256": self.sha256, "scale": scale, "modules": len(self.modules)}


def adapter_name_for(path) -> str:
    """A default adapter name from a file name: `style_v2.safetensors` -> `style_v2`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(str(path)).stem)[:64].lstrip("._-")
    return stem or "adapter"


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise InputError("adapter_name", name, "1-64 characters of letters, digits, '_', '.', '-', starting with a "
                         "letter or digit")
    return name


def read_adapter(source, transformer_config: dict, name: str | None = None) -> Adapter:
    """Read a LoRA (a file path or an already-loaded state dict) for a transformer of `transformer_config`.

    Refused by name: a file diffusers cannot read as a Qwen-Image LoRA, DoRA and LoRA biases (no engine weight to
    put them in), keys for modules this transformer lacks, and factors whose shapes do not fit its Linears (a LoRA
    made for another model)."""
    from diffusers import QwenImagePipeline

    is_dict = isinstance(source, dict)
    if not is_dict:
        path = Path(source)
        if not path.is_file():
            raise InputError("lora", str(source), "an existing LoRA .safetensors file")
    name = check_adapter_name(name or ("adapter" if is_dict else adapter_name_for(source)))
    label = "<state dict>" if is_dict else str(source)
    try:
        state, metadata = QwenImagePipeline.lora_state_dict(dict(source) if is_dict else str(source),
                                                            return_lora_metadata=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same user error
        raise InputError("lora", label, f"a LoRA diffusers can read for Qwen-Image ({type(e).__name__}: {e})") from None
    if not state or not all("lora" in k for k in state):
        raise InputError("lora", label, "a LoRA state dict: every key names lora_A/lora_B (or lora_down/lora_up)")
    others = sorted({k.split(".", 1)[0] for k in state if not k.startswith("transformer.")})
    if others:
        raise InputError("lora", label, f"a transformer LoRA; this one also adapts {others}, which engines do not "
                         "run (Qwen-Image LoRAs adapt the transformer only)")
    for unsupported, why in (("lora_magnitude_vector", "DoRA"), ("lora_B.bias", "a LoRA bias")):
        if any(unsupported in k for k in state):
            raise InputError("lora", label, f"a plain LoRA; this one is {why}, which merged engine weights cannot "
                             "hold")
    scales = _peft_scales(state, metadata, transformer_config, name, label)
    modules: dict[str, LoraFactors] = {}
    for module, (scale, shape) in scales.items():
        down = state[f"transformer.{module}.lora_A.weight"]
        up = state[f"transformer.{module}.lora_B.weight"]
        out_f, in_f = shape
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_f or up.shape[0] != out_f \
                or up.shape[1] != down.shape[0]:
            raise InputError("lora", label, f"factors that fit this transformer: {module} is a Linear {in_f}->{out_f}, "
                             f"the LoRA has A {tuple(down.shape)} and B {tuple(up.shape)} (a LoRA for another model?)")
        modules[module] = LoraFactors(down.detach().float().contiguous(), up.detach().float().contiguous(), scale)
    return Adapter(name=name, modules=modules, source=label,
                   sha256=None if is_dict else file_sha256(source), meta=dict(metadata or {}))


def _peft_scales(state: dict, metadata, transformer_config: dict, name: str, label: str) -> dict:
    """{module path: (PEFT's scale for it, (out, in) of its Linear)} from injecting the adapter into a meta model."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel
    from peft.tuners.lora import LoraLayer

    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, and says so per tensor
            model.load_lora_adapter(dict(state), prefix="transformer", adapter_name=name, metadata=metadata,
                                    low_cpu_mem_usage=False)
    except Exception as e:  # noqa: BLE001 - PEFT/diffusers raise ValueError, RuntimeError, KeyError alike
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        detail = next((line for line in lines if "mismatch" in line), lines[0])  # the line that names a module
        raise InputError("lora", label, f"a LoRA for this transformer ({detail[:400]}; a LoRA for another "
                         "model?)") from None
    found = {}
    for module, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and name in layer.scaling:
            base = layer.get_base_layer()
            if not isinstance(base, torch.nn.Linear):
                raise InputError("lora", label, f"LoRA on Linear layers only; {module} is a {type(base).__name__}")
            found[module] = (float(layer.scaling[name]), (base.out_features, base.in_features))
    expected = {k.rsplit(".lora_", 1)[0].removeprefix("transformer.") for k in state}
    missing = sorted(expected - set(found))
    if missing:
        raise InputError("lora", label, f"keys for modules of this transformer; not found in it: {missing[:5]}")
    return found


def read_loras(checkpoint, loras) -> list:
    """[(Adapter, scale)] for `--lora PATH[:SCALE]` arguments (or LoraSpec), read for `checkpoint`'s transformer;
    every adapter is read and checked before the caller does any heavy work."""
    from qwen_image_trt.models.checkpoint import read_config

    specs = [x if isinstance(x, LoraSpec) else LoraSpec.parse(x) for x in loras or ()]
    if not specs:
        return []
    config = read_config(checkpoint, "transformer")
    merged, names = [], set()
    for spec in specs:
        adapter = read_adapter(spec.path, config)
        while adapter.name in names:  # two files with one stem: keep both, named apart
            adapter.name += "_"
        names.add(adapter.name)
        merged.append((adapter, spec.scale))
    return merged


def recorded_loras(records, where) -> list[LoraSpec]:
    """The adapters a manifest says were merged into its graphs, as LoraSpec, each file checked against the hash
    recorded (a reference built from another file would compare the engine with the wrong model)."""
    specs = []
    for r in records or ():
        path = Path(r.get("path") or "")
        if not path.is_file() or file_sha256(path) != r["sha256"]:
            raise InputError("engines", str(where), f"its LoRA {r['file']} (sha256 {r['sha256'][:12]}...) at "
                             f"{r.get('path')}, the file its graphs were merged with; it is missing or changed")
        specs.append(LoraSpec(path, float(r["scale"])))
    return specs


def merge_into(transformer: torch.nn.Module, adapters) -> int:
    """Add scale * delta W of each (Adapter, scale) to the weights of a QwenImageTransformer2DModel, in fp32,
    rounded once to the weights' dtype. Returns the number of Linear weights changed."""
    import torch

    touched: dict[str, torch.Tensor] = {}
    for adapter, scale in adapters:
        for module, factors in adapter.modules.items():
            d = factors.delta() * scale
            touched[module] = touched[module] + d if module in touched else d
    with torch.no_grad():
        for module, delta in touched.items():
            weight = transformer.get_submodule(module).weight
            weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(touched)


__all__ = ["LoraSpec", "LoraFactors", "Adapter", "read_adapter", "read_loras", "recorded_loras", "merge_into", "adapter_name_for",
           "check_adapter_name"]
