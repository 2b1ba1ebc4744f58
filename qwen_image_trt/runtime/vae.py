"""A drop-in for `pipe.vae` whose decode (and encode, for the edit pipelines) run exported graphs."""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.saved import EngineModule

# diffusers' loader resolves a saved component's loading method by looking its base classes up by name in the module
# model_index.json names (this one): DiffusionPipeline.from_pretrained needs ModelMixin to be found here.
ModelMixin = EngineModule.__mro__[1]
from qwen_image_trt.runtime.transformer import move_dropin


class EngineVAE(EngineModule):
    """Stands in for AutoencoderKLQwenImage: one-frame decode/encode through runners; a ModelMixin with the
    checkpoint's VAE config (runtime.saved)."""

    def __init__(self, decoder: Runner, config: dict, encoder: Runner | None = None, device="cpu"):
        super().__init__()
        self._register_checkpoint_config(config)
        self.decoder_runner, self.encoder_runner = decoder, encoder
        self._device = torch.device(device)
        # Spelled as diffusers spells it: the pipeline derives its scale factor from it.
        self.temperal_downsample = list(config.get("temperal_downsample", [False, True, True]))

    @classmethod
    def from_record(cls, config: dict, record: dict):
        from qwen_image_trt.runtime.backends import make_runner
        from qwen_image_trt.runtime.saved import engines_for

        folder, manifest = engines_for(record)
        opts = dict(engines_dir=folder, device=record["device"], threads=record.get("threads"))
        encoder = make_runner(record["backend"], "vae_encoder", **opts) if "vae_encoder" in manifest.components \
            else None
        module = cls(make_runner(record["backend"], "vae_decoder", **opts), config, encoder=encoder,
                     device=record["device"])
        module.engine_source = record
        return module

    def to(self, *args, **kwargs):
        move_dropin(self, "VAE", *args, **kwargs)
        return self

    # diffusers' AutoencoderKL switches, with the same meaning where an engine can honour them.
    use_slicing = False

    def enable_slicing(self):
        """Decode (and encode) one sample at a time: less activation memory, as the stock VAE's slicing."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, *args, **kwargs):
        raise NotImplementedError("enable_tiling: the VAE engine decodes whole frames (its profile bounds the size); "
                                  "tiled decoding needs the torch backend's VAE (load_pipeline(backend='torch'))")

    def disable_tiling(self):
        pass

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        if z.dim() != 5 or z.shape[2] != 1:
            raise ValueError(f"EngineVAE decodes one frame: expected latents [B, C, 1, h, w], got {list(z.shape)}")
        parts = z.split(1) if self.use_slicing and z.shape[0] > 1 else (z,)
        images = torch.cat([self.decoder_runner.infer({"latents": p.float().contiguous()})["images"]
                            for p in parts]).to(z.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if self.encoder_runner is None:
            raise RuntimeError("this engine folder has no vae_encoder graph; export it for the edit pipelines")
        parts = x.split(1) if self.use_slicing and x.shape[0] > 1 else (x,)
        params = torch.cat([self.encoder_runner.infer({"images": p.float().contiguous()})["latent_params"]
                            for p in parts]).to(x.dtype)
        dist = DiagonalGaussianDistribution(params)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)
