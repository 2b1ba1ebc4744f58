"""A drop-in for Qwen-Image-2.1's `pipe.transformer`: the stock forward (img_mask, kv_cache, kv_cache_mode) over the
three exported passes (`transformer_uncached`, `transformer_extract`, `transformer_cached`) on any Runner.

QwenImage21Pipeline's own loop runs unchanged: its first step with the cache on asks for "extract" (the prefix K/V
are computed once and kept, on the engine's device, on the pipeline's QwenImage21KVCache), every later step for
"cached" (only the target's tokens run); `use_kv_cache=False` runs the uncached pass every step.

Text is not padded to buckets here, unlike the 2509 drop-in: in 2.1 a padded prompt token still advances the RoPE
positions of everything after it (the target image included), so padding would change the image. The engines take
every prompt length their profile allows; the layout tensors (token order, block ids, RoPE tables) are computed on the
host once per layout and kept, moved to the device, for the request's later steps and its CFG branch.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from qwen_image_trt.models.flops21 import linear_cost_in_keys
from qwen_image_trt.models.transformer21_export import (
    CACHED_INPUTS,
    EXTRACT_INPUTS,
    NOISE_PRED,
    PREFIX_KV,
    UNCACHED_INPUTS,
    Layout21,
    StockForward21,
    layout_21,
)
from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.cfg21 import BatchedCfg21
from qwen_image_trt.runtime.co_batch21 import MergedPrefixes, run_round_21
from qwen_image_trt.runtime.saved import EngineModule
from qwen_image_trt.runtime.transformer import move_dropin

# diffusers' loader resolves a saved component's loading method by looking its base classes up by name in the module
# model_index.json names (this one): DiffusionPipeline.from_pretrained needs ModelMixin to be found here.
ModelMixin = EngineModule.__mro__[1]

PASSES = ("uncached", "extract", "cached")
COMPONENTS = tuple(f"transformer_{p}" for p in PASSES)
REQUIRED = ("extract", "cached")  # without an uncached graph, a forward without the cache runs extract then cached
OUTPUTS = {"uncached": NOISE_PRED, "extract": PREFIX_KV, "cached": NOISE_PRED}
_LAYOUTS_KEPT = 32  # a few requests' layouts (each with its CFG branch)


class EngineTransformer21(BatchedCfg21, StockForward21, EngineModule):
    """Stands in for QwenImage21Transformer2DModel: a ModelMixin with the checkpoint's config, saved and loaded by
    the pipeline's save_pretrained / from_pretrained (runtime.saved), its three passes on `runners`
    ({"uncached"|"extract"|"cached": Runner}). With `batch_cfg` on (the pipeline sets it per call) a step's two
    CFG branches share one cached call (runtime.cfg21)."""

    def __init__(self, runners: dict[str, Runner], config: dict, device="cpu"):
        super().__init__()
        self._register_checkpoint_config(config)
        missing = [p for p in REQUIRED if p not in runners]
        if missing:
            raise ValueError(f"EngineTransformer21 needs the extract and cached passes; missing {missing}")
        self.runners = dict(runners)
        self._device = torch.device(device)
        self._layouts: OrderedDict[tuple, Layout21] = OrderedDict()
        # the pipeline sizes its QwenImage21KVCache with len(transformer.transformer_blocks)
        self.transformer_blocks = range(int(config["num_layers"]))
        self.calls = {p: 0 for p in PASSES}  # engine calls per pass, for tests and benchmarks
        self.co_batcher = None  # runtime.co_batch: set while concurrent pipeline calls share this engine's calls
        self._merged = MergedPrefixes()
        self.linear_keys = linear_cost_in_keys(config)  # what padding a prefix costs, relatively (co_batch21)

    @classmethod
    def from_record(cls, config: dict, record: dict):
        from qwen_image_trt.runtime.backends import make_runner
        from qwen_image_trt.runtime.saved import engines_for

        folder, manifest = engines_for(record)
        opts = dict(engines_dir=folder, device=record["device"], threads=record.get("threads"))
        module = cls({p: make_runner(record["backend"], f"transformer_{p}", **opts) for p in PASSES
                      if f"transformer_{p}" in manifest.components}, config, device=record["device"])
        module.engine_source = record
        if record.get("checkpoint") and Path(record["checkpoint"]).is_dir():
            module.checkpoint = Path(record["checkpoint"])
        return module

    def to(self, *args, **kwargs):
        move_dropin(self, "transformer", *args, **kwargs)
        return self

    # -- layout, cached per (mask row, grids, prompt mask, batch) ---------------------------------------------------
    def layout(self, img_mask, img_shapes, encoder_hidden_states_mask, batch: int) -> Layout21:
        row = img_mask[0].bool().cpu()
        mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool().cpu()
        shapes = _shapes_key(img_shapes)
        key = (row.numpy().tobytes(), row.shape[0], shapes, batch,
               None if mask is None else (tuple(mask.shape), mask.numpy().tobytes()))
        lay = self._layouts.get(key)
        if lay is None:
            lay = layout_21(img_mask, img_shapes, encoder_hidden_states_mask, self.config["axes_dims_rope"],
                            batch=batch)
            lay = _on_device(lay, self._device)
            self._layouts[key] = lay
            while len(self._layouts) > _LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(key)
        return lay

    # -- the three passes -------------------------------------------------------------------------------------------
    def _run(self, name: str, names: list[str], args, output: str) -> torch.Tensor:
        feeds = {n: _feed(n, a, self._device) for n, a in zip(names, args)}
        batcher = self.co_batcher
        return batcher.submit({"name": name, "feeds": feeds}) if batcher is not None else self.forward_tensor(name, feeds)

    def forward_tensor(self, name: str, feeds: dict) -> torch.Tensor:
        """One engine call of pass `name` (possibly co-batched: runtime.co_batch21)."""
        self.calls[name] += 1
        return self.runners[name].infer(feeds)[OUTPUTS[name]]

    def co_batch_round(self, forward, calls: dict[int, dict]):
        """runtime.co_batch's round for this drop-in: concurrent requests' cached passes in one call."""
        return run_round_21(forward, calls, self._merged, self.linear_keys)

    def co_batch_done(self) -> None:
        self._merged.clear()

    def _uncached(self, *args):
        if "uncached" in self.runners:
            return self._run("uncached", UNCACHED_INPUTS, args, NOISE_PRED)
        # No uncached graph: the prefix's K/V for this step, then the target against them; equal to the uncached
        # forward under causal_condition (the prefix sees neither the target nor the timestep)
        prefix = args[:len(EXTRACT_INPUTS)]
        names = dict(zip(UNCACHED_INPUTS, args))
        kv = self._extract(*prefix)
        latents = names["hidden_states"][:, names["hidden_states"].shape[1] - names["target_rope_cos"].shape[0]:]
        batch = latents.shape[0]
        return self._cached(latents, kv, names["prefix_key_valid"], names["target_rope_cos"].expand(batch, -1, -1),
                            names["target_rope_sin"].expand(batch, -1, -1), names["timestep"])

    def _extract(self, *args):
        return self._run("extract", EXTRACT_INPUTS, args, PREFIX_KV)

    def _cached(self, *args):
        return self._run("cached", CACHED_INPUTS, args, NOISE_PRED)


def _shapes_key(img_shapes) -> tuple:
    first = img_shapes[0]
    sample = first if len(first) and isinstance(first[0], (list, tuple)) else img_shapes
    return tuple(tuple(int(v) for v in s) for s in sample)


def _on_device(lay: Layout21, device: torch.device) -> Layout21:
    from dataclasses import fields, replace

    return replace(lay, **{f.name: getattr(lay, f.name).to(device) for f in fields(lay)
                           if isinstance(getattr(lay, f.name), torch.Tensor)})


def _feed(name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Graph inputs on the engine's device: floats as float32 (the graphs' I/O), except the K/V, which stays in the
    dtype the extract pass gave it (the engine's compute dtype)."""
    if value.is_floating_point() and name != PREFIX_KV:
        value = value.float()
    return value.to(device).contiguous()


__all__ = ["EngineTransformer21", "COMPONENTS", "PASSES", "REQUIRED"]
