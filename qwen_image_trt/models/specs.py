"""One export spec per component: how to build its exportable module, its I/O names, dynamic axes
and sample inputs. Export, lint, engine profiles and the runtime drop-ins all read these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from qwen_image_trt.models import checkpoint as ckpt, transformer_export as tx


class VaeDecoderExport(nn.Module):
    """One-frame decode: the stock frame loop and feature cache reduce to post_quant_conv -> decoder -> clamp."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        _nearest_upsampling(vae.decoder)

    def forward(self, latents):  # [B, z, 1, h, w] float32, already un-normalised by the pipeline
        x = self.vae.post_quant_conv(latents.to(self.vae.dtype))
        return torch.clamp(self.vae.decoder(x), -1.0, 1.0).float()


class VaeEncoderExport(nn.Module):
    """One-frame encode to the latent distribution's parameters (mean and logvar stacked on channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images):  # [B, 3, 1, H, W] float32 in [-1, 1]
        return self.vae.quant_conv(self.vae.encoder(images.to(self.vae.dtype))).float()


def _nearest_upsampling(module: nn.Module) -> None:
    # The legacy ONNX exporter rejects 'nearest-exact'; at an integer 2x scale 'nearest' is identical.
    for m in module.modules():
        if isinstance(m, nn.Upsample) and m.mode == "nearest-exact":
            m.mode = "nearest"


# Sample inputs trace the graph: the dynamo exporter specializes any dynamic dim whose sample is 0 or 1, and
# may tie two dims whose samples are equal, so every dynamic dim gets its own value >= 2 here.
@dataclass(frozen=True)
class ExportSpec:
    name: str
    part: str  # checkpoint subfolder it is built from
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    build_module: Callable  # (checkpoint, dtype) -> nn.Module
    sample_inputs: Callable  # (config, **shape) -> tuple of tensors
    test_shapes: list[dict] = field(default_factory=list)  # extra shapes the export check runs


def _transformer_module(checkpoint, dtype):
    return tx.ExportableTransformer(ckpt.load_transformer(checkpoint, dtype)).eval()


def _vae_latents(config, batch=2, height=32, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, config["z_dim"], 1, height // 8, width // 8, generator=g),)


def _vae_images(config, batch=2, height=32, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, 1, height, width, generator=g) * 2 - 1,)


TRANSFORMER = ExportSpec(
    name="transformer", part="transformer", input_names=tx.INPUT_NAMES, output_names=tx.OUTPUT_NAMES,
    dynamic_axes=tx.DYNAMIC_AXES, build_module=_transformer_module,
    sample_inputs=lambda config, **kw: tx.sample_inputs(config, **kw),
    test_shapes=[dict(batch=1, grid=(4, 6), text_len=7), dict(batch=3, grid=(8, 8), text_len=20)],
)
VAE_DECODER = ExportSpec(
    name="vae_decoder", part="vae", input_names=["latents"], output_names=["images"],
    dynamic_axes={"latents": {0: "batch", 3: "latent_height", 4: "latent_width"},
                  "images": {0: "batch", 3: "height", 4: "width"}},
    build_module=lambda c, dtype: VaeDecoderExport(ckpt.load_vae(c, dtype)).eval(),
    sample_inputs=_vae_latents, test_shapes=[dict(batch=1, height=64, width=32)],
)
VAE_ENCODER = ExportSpec(
    name="vae_encoder", part="vae", input_names=["images"], output_names=["latent_params"],
    dynamic_axes={"images": {0: "batch", 3: "height", 4: "width"},
                  "latent_params": {0: "batch", 3: "latent_height", 4: "latent_width"}},
    build_module=lambda c, dtype: VaeEncoderExport(ckpt.load_vae(c, dtype)).eval(),
    sample_inputs=_vae_images, test_shapes=[dict(batch=1, height=64, width=32)],
)
# The transformer with ControlNet residuals as an input: exported beside `transformer` when a ControlNet is given.
TRANSFORMER_CONTROLNET = ExportSpec(
    name="transformer_controlnet", part="transformer", input_names=tx.input_names({}, controlnet=True),
    output_names=tx.OUTPUT_NAMES, dynamic_axes=tx.dynamic_axes({}, controlnet=True),
    build_module=lambda c, dtype: tx.ControlNetExportableTransformer(ckpt.load_transformer(c, dtype)).eval(),
    sample_inputs=lambda config, **kw: tx.sample_inputs(config, **kw),  # bound to a block count by spec_for
    test_shapes=TRANSFORMER.test_shapes,
)
SPECS = {s.name: s for s in (TRANSFORMER, VAE_DECODER, VAE_ENCODER, TRANSFORMER_CONTROLNET)}
# What every export holds; transformer_controlnet is added where a ControlNet is given.
DEFAULT_COMPONENTS = ("transformer", "vae_decoder", "vae_encoder")


def spec_for(name: str, config: dict | None = None, controlnet_blocks: int | None = None) -> ExportSpec:
    """The spec of component `name` for a checkpoint part's config: Edit-2511's transformer (`zero_cond_t`) takes
    one more input than every other; the ControlNet variant's sample inputs carry `controlnet_blocks` residuals."""
    from dataclasses import replace

    spec = SPECS[name]
    if name == "transformer" and config and config.get("zero_cond_t"):
        spec = replace(spec, input_names=tx.input_names(config), dynamic_axes=tx.dynamic_axes(config))
    if name == "transformer_controlnet":
        if not controlnet_blocks or controlnet_blocks < 1:
            raise ValueError("transformer_controlnet: controlnet_blocks (the ControlNet's num_layers) is required")
        n = int(controlnet_blocks)
        spec = replace(spec, sample_inputs=lambda config, **kw: tx.sample_inputs(config, controlnet_blocks=n, **kw))
    return spec
