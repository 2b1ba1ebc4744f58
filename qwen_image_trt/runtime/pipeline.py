"""Pipeline assembly: a stock QwenImagePipeline whose transformer and VAE may be engine drop-ins,
plus a denoising loop that runs both true-CFG branches as one batched transformer call."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.manifest import read_manifest
from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET
from qwen_image_trt.models import checkpoint as ckpt
from qwen_image_trt.models.pipelines import load_eager_parts, pipeline_kind, stock_class
from qwen_image_trt.models.sampling import SamplingRecipe
from qwen_image_trt.runtime.backends import check_backend, make_runner
from qwen_image_trt.runtime.cfg import combine_cfg, stack_cfg_text
from qwen_image_trt.runtime.embed_cache import EmbeddingCache, cache_prompt_embeddings
from qwen_image_trt.runtime.lora import EngineLoraLoader
from qwen_image_trt.runtime.saved import engine_record, is_saved_engine_pipeline, open_engine_folder
from qwen_image_trt.runtime.step_cache import step_cache
from qwen_image_trt.runtime.torch_fast import TorchOptions, apply_torch_options, check_torch_options
from qwen_image_trt.runtime.transformer import EngineTransformer
from qwen_image_trt.runtime.vae import EngineVAE

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _with_batch_cfg(call, stock_call):
    """`call` with the stock __call__'s signature plus `batch_cfg`: help(), IDEs and diffusers' own signature
    inspection see every stock argument, not (*args, **kwargs)."""
    import inspect

    sig = inspect.signature(stock_call)
    extra = [inspect.Parameter("batch_cfg", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="bool | None"),
             inspect.Parameter("step_cache", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="float | None")]
    params = list(sig.parameters.values())
    call.__signature__ = sig.replace(parameters=params + extra if params[-1].kind != params[-1].VAR_KEYWORD
                                     else params[:-1] + extra + [params[-1]])
    call.__doc__ = (stock_call.__doc__ or "") + (
        "\n\n        batch_cfg: run both true-CFG branches as one engine call (text-to-image, and Qwen-Image-2.1 on "
        "engines after its first step; None: the "
        "pipeline's default).\n        step_cache: skip a transformer call while the first block's modulated input "
        "has changed less than this in total (relative L1) since the last computed step, reusing that step's "
        "output; per CFG branch and per sample (runtime.step_cache). None: every step runs. After the call, "
        "`pipe.step_cache_stats` says what was skipped.")
    return call


def _cached(pipe, threshold, run):
    """`run()` with the transformer behind a step cache when `threshold` is set; stats kept on the pipeline."""
    with step_cache(pipe, threshold) as cache:
        out = run()
    pipe.step_cache_stats = cache.stats if cache is not None else None
    return out


class EngineContract(EngineLoraLoader):
    """What the diffusers pipeline API means for engine drop-ins: offloading moves torch modules between devices,
    and an engine holds its own device memory, so it is refused by name (the torch backend offloads as stock).
    LoRA calls change the engine's weights by name (runtime.lora)."""

    def enable_model_cpu_offload(self, *args, **kwargs):
        if self._on_engines():
            raise NotImplementedError(
                "enable_model_cpu_offload: the transformer and VAE are engines that hold their own device memory and "
                "cannot be moved by accelerate hooks; offload the torch backend (load_pipeline(backend='torch')), or "
                "stream a large TensorRT engine's weights (`qitrt build --weight-streaming`, "
                "trt_options={'weight_streaming_budget': ...})")
        return super().enable_model_cpu_offload(*args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """diffusers' save, with model_index.json naming the stock class (so that `DiffusionPipeline.from_pretrained`
        finds it) and the drop-ins as this package's classes; engines are recorded by folder, not copied."""
        import json

        super().save_pretrained(save_directory, *args, **kwargs)
        index_file = Path(save_directory) / "model_index.json"
        index = json.loads(index_file.read_text())
        index["_class_name"] = stock_class(self.pipeline_kind).__name__
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        if self._on_engines():
            raise NotImplementedError("enable_sequential_cpu_offload: engines cannot be offloaded layer by layer; "
                                      "see enable_model_cpu_offload's message")
        return super().enable_sequential_cpu_offload(*args, **kwargs)


class QwenImageEnginePipeline(EngineContract, QwenImagePipeline):
    """QwenImagePipeline with CFG batching. `pipe(..., batch_cfg=False)` is the stock two-call loop.

    Extras over the stock call: `true_cfg_scale` may be a list (one per prompt) and `generator` a list,
    so several requests with their own prompts, negatives, scales and seeds share one batch.
    """

    batch_cfg: bool = True

    def __call__(self, *args, batch_cfg: bool | None = None, step_cache: float | None = None, **kwargs):
        return _cached(self, step_cache, lambda: self._call(*args, batch_cfg=batch_cfg, **kwargs))

    def _call(self, *args, batch_cfg: bool | None = None, **kwargs):
        batch_cfg = self.batch_cfg if batch_cfg is None else batch_cfg
        steps = kwargs.get("num_inference_steps", 50)
        if steps == 1 and kwargs.get("sigmas") is None and self.scheduler.config.get("shift_terminal"):
            # diffusers stretches sigmas to shift_terminal with (1 - s) / (1 - s[-1]): 0/0 for a 1-step schedule.
            raise InputError("num_inference_steps", steps, ">= 2 with this scheduler (shift_terminal is set)")
        scale = kwargs.get("true_cfg_scale", 4.0)  # the stock default
        has_neg = kwargs.get("negative_prompt") is not None or kwargs.get("negative_prompt_embeds") is not None
        scales = scale if isinstance(scale, (list, tuple)) else [scale]
        if args or not has_neg or not all(s > 1 for s in scales):
            if isinstance(scale, (list, tuple)):
                raise InputError("true_cfg_scale", scale, "a list only with negative prompts and every scale > 1")
            return super().__call__(*args, **kwargs)  # no CFG: the stock loop already makes one call per step
        if not batch_cfg:
            if isinstance(scale, (list, tuple)):
                raise InputError("true_cfg_scale", scale, "a single float when batch_cfg=False")
            return super().__call__(**kwargs)
        return self._call_batched_cfg(**kwargs)

    __call__ = _with_batch_cfg(__call__, QwenImagePipeline.__call__)

    @torch.no_grad()
    def _call_batched_cfg(self, prompt=None, negative_prompt=None, true_cfg_scale=4.0, height=None, width=None,
                          num_inference_steps=50, sigmas=None, guidance_scale=None, num_images_per_prompt=1,
                          generator=None, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                          negative_prompt_embeds=None, negative_prompt_embeds_mask=None, output_type="pil",
                          return_dict=True, attention_kwargs=None, callback_on_step_end=None,
                          callback_on_step_end_tensor_inputs=("latents",), max_sequence_length=512):
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        if self.transformer.config.guidance_embeds:
            raise NotImplementedError("batched CFG is for true-CFG models; guidance-distilled ones need no CFG")
        self._guidance_scale, self._attention_kwargs = guidance_scale, attention_kwargs or {}
        self._current_timestep, self._interrupt = None, False
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device

        cond, cond_mask = self.encode_prompt(prompt=prompt, prompt_embeds=prompt_embeds,
                                             prompt_embeds_mask=prompt_embeds_mask, device=device,
                                             num_images_per_prompt=num_images_per_prompt,
                                             max_sequence_length=max_sequence_length)
        if isinstance(negative_prompt, str) and batch_size > 1:
            negative_prompt = [negative_prompt] * batch_size
        uncond, uncond_mask = self.encode_prompt(prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
                                                 prompt_embeds_mask=negative_prompt_embeds_mask, device=device,
                                                 num_images_per_prompt=num_images_per_prompt,
                                                 max_sequence_length=max_sequence_length)
        text, text_mask = stack_cfg_text(cond, cond_mask, uncond, uncond_mask)
        scale = true_cfg_scale
        if isinstance(scale, (list, tuple)):
            if len(scale) != batch_size:
                raise InputError("true_cfg_scale", scale, f"one value per prompt ({batch_size})")
            scale = [s for s in scale for _ in range(num_images_per_prompt)]

        latents = self.prepare_latents(batch_size * num_images_per_prompt, self.transformer.config.in_channels // 4,
                                       height, width, cond.dtype, device, generator, latents)
        grid = (1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)
        img_shapes = [[grid]] * (2 * latents.shape[0])
        timesteps = self._timesteps(num_inference_steps, sigmas, latents.shape[1], device)
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)

        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = t.expand(2 * latents.shape[0]).to(latents.dtype)
                with self.transformer.cache_context("cfg"):
                    both = self.transformer(hidden_states=torch.cat([latents, latents]), timestep=timestep / 1000,
                                            encoder_hidden_states=text, encoder_hidden_states_mask=text_mask,
                                            img_shapes=img_shapes, attention_kwargs=self._attention_kwargs,
                                            return_dict=False)[0]
                noise_pred = combine_cfg(*both.chunk(2), scale)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": cond}
                    outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    changed = outputs.pop("prompt_embeds", cond)
                    if changed is not cond:  # as the stock loop: later conditional calls see the new embeddings
                        cond = changed
                        text, text_mask = stack_cfg_text(cond, cond_mask, uncond, uncond_mask)
                progress.update()
        self._current_timestep = None
        image = latents if output_type == "latent" else self.decode_latents(latents, height, width, output_type)
        self.maybe_free_model_hooks()
        return QwenImagePipelineOutput(images=image) if return_dict else (image,)

    def _timesteps(self, num_inference_steps, sigmas, image_seq_len, device):
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps) if sigmas is None else sigmas
        cfg = self.scheduler.config
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        return timesteps

    def decode_latents(self, latents, height, width, output_type="pil"):
        """Packed latents -> images, exactly as the stock pipeline's tail does it."""
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
        z_dim = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device,
                                                                                              latents.dtype)
        image = self.vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return self.image_processor.postprocess(image, output_type=output_type)


def load_pipeline(checkpoint, engines=None, backend: str = "torch", device: str = "cpu", dtype=None,
                  batch_cfg: bool = True, text_bucket: int | None = None, providers=None,
                  threads: int | None = None, progress: bool = False,
                  trt_options: dict | None = None, pipeline: str | None = None, torch_options=None,
                  embedding_cache_bytes: int = 0, text_encoder: bool = True, controlnet=None):
    """A ready diffusers pipeline for `checkpoint`, with the transformer and the VAE on `backend`.

    The class is the one the checkpoint's model_index.json names (QwenImagePipeline, QwenImageEditPipeline,
    QwenImageEditPlusPipeline), or the member `pipeline` names ("img2img", "inpaint", "edit-inpaint"; see
    models.pipelines.MEMBERS). Text-to-image gets the batched-CFG loop; the other members run diffusers' own loop.

    backend="torch" is the eager reference (stock diffusers modules). "onnxruntime" and "tensorrt" run the
    graphs in `engines`, which must have been built from this checkpoint (checked against its manifest).
    `threads` caps ONNX Runtime's CPU threads (several CPU workers on one machine must share its cores);
    `trt_options` go to each TensorRT runner (e.g. {"weight_streaming_budget": bytes, "cuda_graphs": True}).
    `torch_options` is the torch fast path (runtime.torch_fast): {"compile": True, "fp8": True, "cuda_graphs": True}
    or "compile,fp8"; backend torch only, refused by name where the device cannot run it.
    `embedding_cache_bytes` > 0 caches prompt embeddings (runtime.embed_cache): a repeated prompt skips the encoder.
    `text_encoder=False` loads no text encoder: the caller supplies `prompt_embeds` or replaces the pipeline's
    `_get_qwen_prompt_embeds` (serve.remote_encoder).
    `controlnet`: the ControlNet folder of the controlnet member (default: the checkpoint's controlnet/). It runs
    eagerly; its residuals go into the engine folder's transformer_controlnet graph.
    """
    check_backend(backend)
    if is_saved_engine_pipeline(checkpoint):  # a folder an engine pipeline's save_pretrained wrote
        return _load_saved(checkpoint, pipeline, dtype, batch_cfg, progress, text_encoder, embedding_cache_bytes)
    root = ckpt.validate_checkpoint(checkpoint)
    kind = pipeline_kind(root, pipeline)
    dtype = dtype or torch.float32
    if ckpt.is_qwen21(root):
        for name, value in (("torch_options", TorchOptions.parse(torch_options).any),
                            ("controlnet", controlnet), ("text_bucket", text_bucket)):
            if value:
                raise InputError(name, value, "none for a Qwen-Image-2.1 checkpoint (not modelled for 2.1)")
        from qwen_image_trt.runtime.pipeline21 import load_pipeline_21

        pipe = load_pipeline_21(root, kind, engines=engines, backend=backend, device=device, dtype=dtype,
                                providers=providers, threads=threads, trt_options=trt_options, progress=progress,
                                text_encoder=text_encoder, batch_cfg=batch_cfg)
        if embedding_cache_bytes:
            cache_prompt_embeddings(pipe, EmbeddingCache(embedding_cache_bytes))
        return pipe
    fast = check_torch_options(TorchOptions.parse(torch_options), device)
    if fast.any and backend != "torch":
        raise InputError("torch_options", torch_options, f"only with backend torch ({backend} engines are already "
                         "compiled; TensorRT's CUDA graphs: trt_options={'cuda_graphs': True})")
    if backend == "torch":
        if engines is not None:
            raise InputError("engines", str(engines), "no engine folder with backend torch (the eager reference); "
                             "pick --backend onnxruntime or tensorrt to run engines")
        transformer = apply_torch_options(ckpt.load_transformer(root, dtype).to(device), fast)
        vae = ckpt.load_vae(root, dtype).to(device)
    else:
        manifest = open_engine_folder(engines, ckpt.checkpoint_identity(root), backend)
        opts = dict(engines_dir=engines, device=device, providers=providers, threads=threads,
                    trt_options=trt_options)
        runner = make_runner(backend, "transformer", **opts)
        controlnet_runner, blocks = None, None
        if "transformer_controlnet" in manifest.components:
            controlnet_runner = make_runner(backend, "transformer_controlnet", **opts)
            blocks = manifest.components["transformer_controlnet"].source.get("controlnet_blocks")
        elif kind == "controlnet":
            raise InputError("engines", str(engines), "a folder with a transformer_controlnet graph for the controlnet "
                             "member (`qitrt export CKPT --controlnet DIR`)")
        transformer = EngineTransformer(runner, ckpt.read_config(root, "transformer"),
                                        text_bucket=text_bucket or DEFAULT_TEXT_BUCKET, device=device,
                                        controlnet_runner=controlnet_runner, controlnet_blocks=blocks)
        transformer.checkpoint = root  # the step cache's signal reads its few weights from here
        has_encoder = "vae_encoder" in manifest.components
        vae = EngineVAE(make_runner(backend, "vae_decoder", **opts), ckpt.read_config(root, "vae"), device=device,
                        encoder=make_runner(backend, "vae_encoder", **opts) if has_encoder else None)
        # What save_pretrained records so that the saved folder loads back onto these engines (runtime.saved).
        record = dict(engines=engines, backend=backend, identity=manifest.checkpoint.identity, device=device,
                      threads=threads, checkpoint=str(Path(root).resolve()))
        transformer.engine_source = engine_record(component="transformer", text_bucket=transformer.text_bucket,
                                                  controlnet_blocks=blocks, **record)
        vae.engine_source = engine_record(component="vae", **record)
    pipe = engine_pipeline_class(kind)(vae=vae, transformer=transformer,
                                       **load_eager_parts(root, device, dtype, kind, text_encoder=text_encoder,
                                                                         controlnet=controlnet))
    recipe = SamplingRecipe.from_record(manifest.sampling) if engines is not None else None
    if recipe is not None:  # the scheduler the engines were made for (a few-step LoRA merged at build)
        recipe.apply(pipe)
    pipe.sampling = recipe
    pipe.batch_cfg = batch_cfg
    pipe.set_progress_bar_config(disable=not progress)
    pipe.backend, pipe.engines, pipe.pipeline_kind = backend, engines, kind
    pipe.torch_options = fast
    pipe.encoder_identity = ckpt.checkpoint_identity(root, parts=("text_encoder",))  # what its embeddings depend on
    if embedding_cache_bytes:
        cache_prompt_embeddings(pipe, EmbeddingCache(embedding_cache_bytes))
    return pipe


def _load_saved(folder, pipeline, dtype, batch_cfg, progress, text_encoder, embedding_cache_bytes):
    """load_pipeline of a saved engine pipeline folder: the drop-ins from their records, everything else from the
    folder as diffusers saved it."""
    from qwen_image_trt.runtime.saved import read_saved

    root = Path(folder)
    _, record = read_saved(root / "transformer")
    kind = pipeline_kind(root, pipeline)
    dtype = dtype or torch.float32
    if ckpt.is_qwen21(root):
        from qwen_image_trt.runtime.pipeline21 import load_saved_21

        pipe = load_saved_21(root, kind, record, dtype, progress, text_encoder, batch_cfg)
        if embedding_cache_bytes:
            cache_prompt_embeddings(pipe, EmbeddingCache(embedding_cache_bytes))
        return pipe
    transformer = EngineTransformer.from_pretrained(root / "transformer", torch_dtype=dtype)
    vae = EngineVAE.from_pretrained(root / "vae", torch_dtype=dtype)
    device = record["device"]
    pipe = engine_pipeline_class(kind)(vae=vae, transformer=transformer,
                                       **load_eager_parts(root, device, dtype, kind, text_encoder=text_encoder))
    manifest = read_manifest(record["engines"])
    pipe.sampling = SamplingRecipe.from_record(manifest.sampling) if manifest.sampling else None
    pipe.batch_cfg = batch_cfg
    pipe.set_progress_bar_config(disable=not progress)
    pipe.backend, pipe.engines, pipe.pipeline_kind = record["backend"], record["engines"], kind
    pipe.torch_options = TorchOptions.parse(None)
    pipe.encoder_identity = ckpt.checkpoint_identity(root, parts=("text_encoder",))
    if embedding_cache_bytes:
        cache_prompt_embeddings(pipe, EmbeddingCache(embedding_cache_bytes))
    return pipe


_ENGINE_CLASSES: dict[str, type] = {"text-to-image": QwenImageEnginePipeline}


def engine_pipeline_class(kind: str) -> type:
    """The pipeline class `load_pipeline` builds for a family member: QwenImageEnginePipeline for text-to-image;
    for the others the stock class itself (its own loop, two transformer calls per CFG step), subclassed only so
    that `batch_cfg=` is accepted and the pipeline says what it is."""
    if kind not in _ENGINE_CLASSES:
        base = stock_class(kind)

        def __call__(self, *args, batch_cfg: bool | None = None, step_cache: float | None = None, **kwargs):
            if kind.startswith("qwen-image-2.1"):
                from qwen_image_trt.runtime.pipeline21 import call_21

                return call_21(self, batch_cfg, step_cache, lambda: base.__call__(self, *args, **kwargs))
            if batch_cfg:
                raise InputError("batch_cfg", batch_cfg, f"False or None for {kind}: batched CFG is text-to-image only")
            return _cached(self, step_cache, lambda: base.__call__(self, *args, **kwargs))

        _with_batch_cfg(__call__, base.__call__)  # help() shows the stock call
        _ENGINE_CLASSES[kind] = type(base.__name__.replace("Pipeline", "EnginePipeline"), (EngineContract, base),
                                     {"__call__": __call__, "batch_cfg": False, "__module__": __name__,
                                      "__doc__": f"{base.__name__} with engine drop-ins ({kind})."})
    return _ENGINE_CLASSES[kind]
