"""Qwen-Image-2.1 pipelines on engines: diffusers' QwenImage21Pipeline (generation and editing in one call) and the
2.1-Turbo modular pipeline, with the transformer and VAE as engine drop-ins (runtime.transformer21, runtime.vae) or,
with backend torch, the stock modules. `load_pipeline` hands 2.1 checkpoints here.

The stock loop runs unchanged: its prefix KV cache (`use_kv_cache`, default on) maps to the engine's extract and
cached passes, its true CFG to a second call on the same engines with the negative prompt's own cache; with
`batch_cfg` (the engine default) the two branches of every step after the first share one cached call below the loop
(runtime.cfg21).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.pipelines import load_eager_parts, shipped_sigmas
from qwen_image_trt.models.sampling import SamplingRecipe
from qwen_image_trt.runtime.backends import make_runner
from qwen_image_trt.runtime.cfg21 import BatchedCfg21
from qwen_image_trt.runtime.saved import engine_record, open_engine_folder
from qwen_image_trt.runtime.transformer21 import PASSES, REQUIRED, EngineTransformer21
from qwen_image_trt.runtime.vae import EngineVAE

TURBO = "qwen-image-2.1-turbo"


def load_pipeline_21(root: Path, kind: str, engines=None, backend: str = "torch", device="cpu", dtype=None,
                     providers=None, threads=None, trt_options=None, progress: bool = False,
                     text_encoder: bool = True, batch_cfg: bool = True):
    """The 2.1 pipeline of `kind` ("qwen-image-2.1" or "qwen-image-2.1-turbo") for checkpoint `root`."""
    dtype = dtype or torch.float32
    recipe = None
    if backend == "torch":
        if engines is not None:
            raise InputError("engines", str(engines), "no engine folder with backend torch (the eager reference)")
        transformer = ckpt.load_transformer(root, dtype).to(device)
        vae = ckpt.load_vae(root, dtype).to(device)
    else:
        transformer, vae, manifest = _engine_modules(root, engines, backend, device, providers, threads, trt_options)
        recipe = SamplingRecipe.from_record(manifest.sampling)
    if kind == TURBO:
        pipe = TurboPipeline(root, transformer, vae, device, dtype, text_encoder)
    else:
        from qwen_image_trt.runtime.pipeline import engine_pipeline_class

        pipe = engine_pipeline_class(kind)(vae=vae, transformer=transformer,
                                           **load_eager_parts(root, device, dtype, kind, text_encoder=text_encoder))
    pipe.sampling = recipe
    pipe.batch_cfg = bool(batch_cfg) and isinstance(transformer, BatchedCfg21) and kind != TURBO
    pipe.set_progress_bar_config(disable=not progress)
    pipe.backend, pipe.engines, pipe.pipeline_kind = backend, engines, kind
    pipe.encoder_identity = ckpt.checkpoint_identity(root, parts=("text_encoder",))
    return pipe


def _engine_modules(root, engines, backend, device, providers, threads, trt_options):
    manifest = open_engine_folder(engines, ckpt.checkpoint_identity(root), backend)
    missing = [c for c in (*(f"transformer_{p}" for p in REQUIRED), "vae_decoder") if c not in manifest.components]
    if missing:
        raise InputError("engines", str(engines), f"a Qwen-Image-2.1 engine folder with {', '.join(missing)} "
                         "(`qitrt export` of a 2.1 checkpoint makes them)")
    opts = dict(engines_dir=engines, device=device, providers=providers, threads=threads, trt_options=trt_options)
    transformer = EngineTransformer21({p: make_runner(backend, f"transformer_{p}", **opts) for p in PASSES
                                       if f"transformer_{p}" in manifest.components},
                                      ckpt.read_config(root, "transformer"), device=device)
    transformer.checkpoint = root
    encoder = make_runner(backend, "vae_encoder", **opts) if "vae_encoder" in manifest.components else None
    vae = EngineVAE(make_runner(backend, "vae_decoder", **opts), ckpt.read_config(root, "vae"), encoder=encoder,
                    device=device)
    record = dict(engines=engines, backend=backend, identity=manifest.checkpoint.identity, device=device,
                  threads=threads, checkpoint=str(Path(root).resolve()))
    transformer.engine_source = engine_record(component="transformer", **record)
    vae.engine_source = engine_record(component="vae", **record)
    return transformer, vae, manifest


def load_saved_21(root: Path, kind: str, record: dict, dtype, progress: bool, text_encoder: bool,
                  batch_cfg: bool = True):
    """A folder an engine pipeline's save_pretrained wrote for a 2.1 checkpoint: the drop-ins from their records,
    the text encoder, processor and scheduler from the folder."""
    transformer = EngineTransformer21.from_pretrained(root / "transformer", torch_dtype=dtype)
    vae = EngineVAE.from_pretrained(root / "vae", torch_dtype=dtype)
    device = record["device"]
    if kind == TURBO:
        pipe = TurboPipeline(root, transformer, vae, device, dtype, text_encoder)
    else:
        from qwen_image_trt.runtime.pipeline import engine_pipeline_class

        pipe = engine_pipeline_class(kind)(vae=vae, transformer=transformer,
                                           **load_eager_parts(root, device, dtype, kind, text_encoder=text_encoder))
    manifest = read_manifest(record["engines"])
    pipe.sampling = SamplingRecipe.from_record(manifest.sampling)
    pipe.batch_cfg = bool(batch_cfg) and kind != TURBO
    pipe.set_progress_bar_config(disable=not progress)
    pipe.backend, pipe.engines, pipe.pipeline_kind = record["backend"], record["engines"], kind
    pipe.encoder_identity = ckpt.checkpoint_identity(root, parts=("text_encoder",))
    return pipe


def call_21(pipe, batch_cfg, step_cache, run):
    """A QwenImage21Pipeline call (`run()`) with the drop-in's batched CFG on or off for it; `pipe.cfg_stats` says
    afterwards how many steps ran both branches in one call."""
    if step_cache:
        raise InputError("step_cache", step_cache, "none for Qwen-Image-2.1 (its prefix KV cache already skips the "
                         "text and condition images after the first step)")
    transformer = pipe.transformer
    on = pipe.batch_cfg if batch_cfg is None else bool(batch_cfg)
    if not isinstance(transformer, BatchedCfg21):
        if batch_cfg:
            raise InputError("batch_cfg", batch_cfg, "False or None with the torch backend: the stock 2.1 "
                             "transformer runs true CFG as two calls (batched CFG is the engine drop-in's)")
        pipe.cfg_stats = None
        return run()
    # per thread (runtime.cfg21): co-batched calls share the drop-in
    previous, transformer.batch_cfg = transformer.batch_cfg, on
    transformer.cfg_stats = {"batched": 0, "taken": 0, "missed": 0}
    try:
        return run()
    finally:
        transformer.batch_cfg = previous
        pipe.cfg_stats = dict(transformer.cfg_stats)


class TurboPipeline:
    """diffusers' QwenImage21TurboModularPipeline (its blocks: no guider, the checkpoint's `sample_sigmas` grid) with
    the given transformer and VAE, called like the other pipelines: `pipe(prompt=..., image=..., ...)` returns an
    object with `.images`. What Turbo has no use for is refused by name: a negative prompt or CFG scale (it runs
    without guidance) and a step count other than its grid's."""

    co_batchable = False  # copies would share the modular pipeline's scheduler (runtime.co_batch.can_co_batch)

    def __init__(self, root: Path, transformer, vae, device, dtype, text_encoder: bool = True):
        from diffusers import ModularPipeline

        from qwen_image_trt.models.processor import load_qwen3vl_processor

        self.sigmas = shipped_sigmas(root)
        # a str: ModularPipeline.from_pretrained keeps a Path, and load_components then fails on it
        self.modular = ModularPipeline.from_pretrained(str(root))
        names = ["scheduler"] + (["text_encoder"] if text_encoder else [])
        self.modular.load_components(names=names, dtype=dtype)
        if text_encoder:
            self.modular.text_encoder.to(device)
        self.modular.update_components(processor=load_qwen3vl_processor(root / "processor"), transformer=transformer,
                                       vae=vae)

    def __getattr__(self, name):  # transformer, vae, scheduler, text_encoder, processor, ...
        if name == "modular":
            raise AttributeError(name)
        return getattr(self.modular, name)

    def set_progress_bar_config(self, **kwargs):
        self.modular.set_progress_bar_config(**kwargs)

    @torch.no_grad()
    def __call__(self, prompt=None, negative_prompt=None, true_cfg_scale: float = 1.0, num_inference_steps=None,
                 output_type: str = "pil", batch_cfg=None, step_cache=None, **kwargs):
        from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput

        if negative_prompt is not None or (true_cfg_scale or 1.0) > 1.0:
            raise InputError("negative_prompt", negative_prompt, "none for Qwen-Image-2.1-Turbo: it runs without "
                             "guidance (true_cfg_scale 1)")
        if num_inference_steps is not None and num_inference_steps != len(self.sigmas):
            raise InputError("num_inference_steps", num_inference_steps, f"{len(self.sigmas)}: Qwen-Image-2.1-Turbo "
                             f"runs its shipped sigma grid {self.sigmas}")
        for name, value in (("batch_cfg", batch_cfg), ("step_cache", step_cache)):
            if value:
                raise InputError(name, value, "none for Qwen-Image-2.1-Turbo")
        state = self.modular(prompt=prompt, output_type=output_type, **kwargs)
        return QwenImagePipelineOutput(images=state.values["images"])


__all__ = ["load_pipeline_21", "load_saved_21", "TurboPipeline", "TURBO"]
