"""LoRA on engine pipelines at run time, with diffusers' API and semantics, and no rebuild.

diffusers adapts a torch transformer through PEFT layers; an engine has no layers, only named weights. So the
engine pipeline keeps the adapters as low-rank factors (models.lora), works out which Linear weights the current
adapter state changes, and hands the runner new values for exactly those by name: ONNX Runtime swaps initializers
(session options' initializer overrides, no re-export), and a weight no adapter touches any more goes back to the
graph's own value. What "current state" means follows diffusers with PEFT (checked against it in the tests):

- `load_lora_weights` adds an adapter (default names default_0, default_1, ...) and makes it the only active one;
- `set_adapters(names, weights)` picks the active adapters and their weights; `disable_lora`/`enable_lora`;
- `fuse_lora(lora_scale, adapter_names)` merges adapters into the base weights; while merged, the active adapters
  add nothing more (PEFT's merged forward); `unfuse_lora` takes the merge back out;
- `unload_lora_weights` removes every adapter; a fused merge stays in the weights (PEFT's unload keeps it);
- `disable_lora` while fused: PEFT unmerges at the next forward, so here disabling also unfuses.

With backend="torch" the pipeline's transformer is diffusers' own module and every call goes to diffusers.
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.models.lora import Adapter, check_adapter_name, read_adapter
from qwen_image_trt.runtime.graph_weights import GraphLinears

log = logging.getLogger(__name__)


class AdapterState:
    """The adapters of one engine pipeline and what they currently add to each Linear weight. Weights persist
    per adapter as PEFT's scaling does: `set_adapters` sets them, `fuse_lora(lora_scale)` multiplies the active
    ones (and they stay multiplied after `unfuse_lora`, as in diffusers)."""

    def __init__(self):
        self.adapters: dict[str, Adapter] = {}
        self.weights: dict[str, float] = {}  # name -> weight (set_adapters' weights, 1.0 when loaded)
        self.active: list[str] = []
        self.enabled = True
        self.fused: dict[str, float] = {}  # adapter -> weight it was merged with
        self.baked: dict[str, torch.Tensor] = {}  # module -> delta left merged by an unload after a fuse
        self.serials: dict[str, int] = {}  # adapter -> load number (a hot-swapped adapter is another one)
        self.baked_serial = 0
        self._next_serial = itertools.count(1)
        # What the runner holds now (not part of a snapshot): per changed module, the signature of its delta.
        self.applied: dict[str, tuple] = {}
        self.graph: GraphLinears | None = None

    def add(self, adapter: Adapter) -> None:
        if adapter.name in self.adapters:
            raise InputError("adapter_name", adapter.name, f"a name not already loaded ({sorted(self.adapters)})")
        self.adapters[adapter.name] = adapter
        self.serials[adapter.name] = next(self._next_serial)
        self.weights[adapter.name] = 1.0
        self.active = [adapter.name]

    def next_default_name(self) -> str:
        n = 0
        while f"default_{n}" in self.adapters:
            n += 1
        return f"default_{n}"

    def check_names(self, names) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise InputError("adapter_names", unknown, f"loaded adapters: {sorted(self.adapters) or 'none'}")
        return names

    def fuse(self, names, lora_scale: float) -> None:
        for name in self.active:
            self.weights[name] *= lora_scale
        for name in names:
            self.fused.setdefault(name, self.weights[name])

    def remove(self, name: str) -> None:
        self.adapters.pop(name)
        self.serials.pop(name)
        self.weights.pop(name)
        self.fused.pop(name, None)
        self.active = [n for n in self.active if n != name]

    def contributions(self) -> dict[str, float]:
        """adapter -> the weight it adds with now (besides what an unload left baked in)."""
        if self.fused:
            return dict(self.fused)  # merged: the active adapters add nothing more
        return {n: self.weights[n] for n in self.active} if self.enabled else {}

    def signatures(self) -> dict[str, tuple]:
        """module -> what its delta is made of; a module whose signature is unchanged keeps the weight it has."""
        sig: dict[str, tuple] = {m: (("baked", self.baked_serial),) for m in self.baked}
        for name, weight in self.contributions().items():
            for module in self.adapters[name].modules:
                sig[module] = sig.get(module, ()) + ((name, self.serials[name], weight),)
        return sig

    def delta(self, module: str) -> torch.Tensor | None:
        """The total fp32 delta the current state adds to one module's weight (None: none)."""
        out = self.baked[module].clone() if module in self.baked else None
        for name, weight in self.contributions().items():
            factors = self.adapters[name].modules.get(module)
            if factors is not None:
                d = factors.delta() * weight
                out = d if out is None else out + d
        return out

    def deltas(self) -> dict[str, torch.Tensor]:
        return {m: self.delta(m) for m in self.signatures()}

    def snapshot(self) -> tuple:
        return (dict(self.adapters), dict(self.weights), list(self.active), self.enabled, dict(self.fused),
                dict(self.baked), dict(self.serials), self.baked_serial)

    def restore(self, saved: tuple) -> None:
        (self.adapters, self.weights, self.active, self.enabled, self.fused, self.baked, self.serials,
         self.baked_serial) = saved

    def unload(self) -> None:
        if self.fused:
            self.baked = self.deltas()  # the merged weights stay, as PEFT leaves them
            self.baked_serial = next(self._next_serial)
        self.adapters, self.weights, self.active, self.fused, self.enabled = {}, {}, [], {}, True
        self.serials = {}


class EngineLoraLoader:
    """diffusers' LoRA API for engine pipelines (a mixin placed before the stock pipeline class)."""

    def _on_engines(self) -> bool:
        return getattr(self, "backend", "torch") != "torch"

    @property
    def _lora(self) -> AdapterState:
        """The adapter state lives with the engine transformer, not the pipeline: the family members a server makes
        from one pipeline's components (img2img, inpaint) share its transformer, so they share its adapters."""
        holder = self.transformer.__dict__
        if "_engine_lora" not in holder:
            holder["_engine_lora"] = AdapterState()
        return holder["_engine_lora"]

    @contextmanager
    def _changing_lora(self):
        """Change the adapter state and apply it; on any failure the state (and the weights) stay as they were."""
        state = self._lora
        saved = state.snapshot()
        try:
            yield state
            self._apply_lora()
        except BaseException:
            state.restore(saved)
            raise

    # -- loading -------------------------------------------------------------------------------------
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        if not self._on_engines():
            return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
                                             hotswap=hotswap, **kwargs)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, (str, Path)) and Path(source).is_dir():
            weight_name = kwargs.get("weight_name") or "pytorch_lora_weights.safetensors"
            source = Path(source) / weight_name
        name = check_adapter_name(adapter_name or self._lora.next_default_name())
        if hotswap and name not in self._lora.adapters:
            raise InputError("adapter_name", name, f"a loaded adapter to hot-swap ({sorted(self._lora.adapters)})")
        adapter = read_adapter(source, dict(self.transformer.config), name=name)  # before any state changes
        with self._changing_lora() as state:
            active, weights = list(state.active), dict(state.weights)
            if hotswap:
                state.adapters.pop(name)
            state.add(adapter)
            if hotswap:  # same name, same place in the active set and the same weight: only the factors change
                state.active, state.weights = active, weights

    def get_list_adapters(self) -> dict[str, list[str]]:
        if not self._on_engines():
            return super().get_list_adapters()
        return {"transformer": list(self._lora.adapters)} if self._lora.adapters else {}

    def get_active_adapters(self) -> list[str]:
        if not self._on_engines():
            return super().get_active_adapters()
        return list(self._lora.active) if self._lora.adapters else []

    # -- choosing ------------------------------------------------------------------------------------
    def set_adapters(self, adapter_names, adapter_weights=None):
        if not self._on_engines():
            return super().set_adapters(adapter_names, adapter_weights)
        names = self._lora.check_names(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise InputError("adapter_weights", adapter_weights, f"one weight per adapter ({len(names)})")
        for w in weights:
            if w is not None and not isinstance(w, (int, float)):
                raise InputError("adapter_weights", w, "numbers (per-block weight dicts are torch-backend only)")
        with self._changing_lora() as state:
            state.active = names
            state.weights.update({n: 1.0 if w is None else float(w) for n, w in zip(names, weights)})

    def disable_lora(self):
        if not self._on_engines():
            return super().disable_lora()
        with self._changing_lora() as state:
            state.enabled, state.fused = False, {}

    def enable_lora(self):
        if not self._on_engines():
            return super().enable_lora()
        with self._changing_lora() as state:
            state.enabled = True

    def delete_adapters(self, adapter_names):
        if not self._on_engines():
            return super().delete_adapters(adapter_names)
        names = self._lora.check_names(adapter_names)
        with self._changing_lora() as state:
            for name in names:
                state.remove(name)

    # -- merging -------------------------------------------------------------------------------------
    def fuse_lora(self, components=("transformer",), lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None, **kwargs):
        if not self._on_engines():
            return super().fuse_lora(components=list(components), lora_scale=lora_scale, safe_fusing=safe_fusing,
                                     adapter_names=adapter_names, **kwargs)
        names = self._lora.check_names(adapter_names) if adapter_names is not None else list(self._lora.active)
        with self._changing_lora() as state:
            state.fuse(names, float(lora_scale))
            if safe_fusing:
                for module, delta in state.deltas().items():
                    if not torch.isfinite(delta).all():
                        raise QitrtError(f"fuse_lora(safe_fusing=True): the fused weights of {module} are not finite")

    def unfuse_lora(self, components=("transformer",), **kwargs):
        if not self._on_engines():
            return super().unfuse_lora(components=list(components), **kwargs)
        with self._changing_lora() as state:
            state.fused = {}

    def unload_lora_weights(self, *args, **kwargs):
        if not self._on_engines():
            return super().unload_lora_weights(*args, **kwargs)
        with self._changing_lora() as state:
            state.unload()

    # -- the one place weights change ----------------------------------------------------------------
    def _apply_lora(self) -> None:
        """Give the runner the new value of every Linear weight whose delta changed (and only those); weights no
        adapter touches any more go back to the graph's own values."""
        runner, state = self.transformer.runner, self._lora
        t0 = time.perf_counter()
        if state.graph is None or state.graph.path != Path(runner.weights_source):
            state.graph = GraphLinears(runner.weights_source)
        linears = state.graph
        signatures = state.signatures()
        values: dict[str, np.ndarray | None] = {}
        for module in set(signatures) | set(state.applied):
            if signatures.get(module) == state.applied.get(module):
                continue
            ref = linears.locate(module)
            if module not in signatures:
                values.update(linears.restored(ref))
                continue
            values.update(linears.merged(ref, state.delta(module).numpy()))
        if values:
            runner.set_weights(values)
        state.applied = signatures
        log.info("lora: %d weights set on %s in %.3f s", len(values), runner.name, time.perf_counter() - t0)


__all__ = ["EngineLoraLoader", "AdapterState"]
