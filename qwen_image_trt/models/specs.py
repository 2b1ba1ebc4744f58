"""One export spec per component: how to build its exportable module, its I/O names, dynamic axes
and sample inputs. Export, lint, engine profiles and the runtime drop-ins all read these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from qwen_image_trt.models import checkpoint as ckpt, transformer_export as tx


class VaeDecoderExport(nn.Module):
    """One-frame decode: the stock frame loop and feature cache reduce to post_quant_conv -> decoder -> clamp (the
    2.1 VAE: the decoder's first chunk, then un-patchify where its config has a patch size)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.qwen21 = type(vae).__name__.endswith("21")
        _nearest_upsampling(vae.decoder)

    def forward(self, latents):  # [B, z, 1, h, w] float32, already un-normalised by the pipeline
        x = self.vae.post_quant_conv(latents.to(self.vae.dtype))
        if not self.qwen21:
            return torch.clamp(self.vae.decoder(x), -1.0, 1.0).float()
        from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import _unpatchify

        out = self.vae.decoder(x, first_chunk=True)
        if self.vae.config.patch_size is not None:
            out = _unpatchify(out, patch_size=self.vae.config.patch_size)
        return torch.clamp(out, -1.0, 1.0).float()


class VaeEncoderExport(nn.Module):
    """One-frame encode to the latent distribution's parameters (mean and logvar stacked on channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.patch = getattr(vae.config, "patch_size", None)

    def forward(self, images):  # [B, 3 (2.1: 4, RGBA), 1, H, W] float32 in [-1, 1]
        x = images.to(self.vae.dtype)
        if self.patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_qwenimage21 import _patchify

            x = _patchify(x, patch_size=self.patch)
        return self.vae.quant_conv(self.vae.encoder(x)).float()


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


def vae_scale(config) -> int:
    """Pixels per latent along each side: 8 for the 2509 VAE, its `scale_factor_spatial` (16) for 2.1's."""
    return int(config.get("scale_factor_spatial") or 8)


def _vae_latents(config, batch=2, height=32, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = vae_scale(config)
    height, width = max(height, 2 * s), max(width, 3 * s)  # distinct latent sides >= 2 (see the note above)
    return (torch.randn(batch, config["z_dim"], 1, height // s, width // s, generator=g),)


def _vae_images(config, batch=2, height=32, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = vae_scale(config)
    height, width = max(height, 2 * s), max(width, 3 * s)
    return (torch.rand(batch, int(config.get("in_channels", 3)), 1, height, width, generator=g) * 2 - 1,)


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
# Qwen-Image-2.1: one graph per pass of the prefix KV cache (models.transformer21_export). Traced at an edit layout
# (a condition image, two prompts, the last one padded) so that every dynamic dim has its own sample value:
# batch 2, text_tokens 12, image_tokens 32, prefix_tokens 28, target_tokens 16.
TRACE_21 = dict(batch=2, text=(5, 7), cond=(4, 4), target=(4, 4), pad=3)
CHECK_21 = dict(batch=3, text=(3, 9), cond=(6, 4), target=(4, 6), pad=4)  # the export check's other shape


def _inputs_21(graph: str):
    def sample(config, seed=0, **shape):
        from qwen_image_trt.models import transformer21_export as t21

        kw = t21.sample_inputs_21(config, **{**TRACE_21, **shape}, seed=seed)
        lay = t21.layout_21(kw["img_mask"], kw["img_shapes"], kw["encoder_hidden_states_mask"],
                            config["axes_dims_rope"])
        if graph == "uncached":
            return lay.uncached_inputs(kw["encoder_hidden_states"], kw["hidden_states"], kw["timestep"])
        if graph == "extract":
            return lay.prefix_inputs(kw["encoder_hidden_states"], kw["hidden_states"])
        heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
        g = torch.Generator().manual_seed(seed + 1)
        kv = torch.randn(config["num_layers"], 2, kw["hidden_states"].shape[0], lay.prefix_tokens, heads, head_dim,
                         generator=g)
        return lay.cached_inputs(kw["hidden_states"], kv, kw["timestep"])

    return sample


def _spec_21(graph: str) -> ExportSpec:
    from qwen_image_trt.models import transformer21_export as t21

    cls = {"uncached": t21.Uncached21, "extract": t21.Extract21, "cached": t21.Cached21}[graph]
    names = cls.input_names + cls.output_names
    return ExportSpec(name=f"transformer_{graph}", part="transformer", input_names=list(cls.input_names),
                      output_names=list(cls.output_names), dynamic_axes=t21.dynamic_axes(names),
                      build_module=lambda c, dtype: cls(ckpt.load_transformer(c, dtype)).eval(),
                      sample_inputs=_inputs_21(graph), test_shapes=[CHECK_21])


SPECS_21 = tuple(_spec_21(g) for g in ("uncached", "extract", "cached"))
# The transformer with ControlNet residuals as an input: exported beside `transformer` when a ControlNet is given.
TRANSFORMER_CONTROLNET = ExportSpec(
    name="transformer_controlnet", part="transformer", input_names=tx.input_names({}, controlnet=True),
    output_names=tx.OUTPUT_NAMES, dynamic_axes=tx.dynamic_axes({}, controlnet=True),
    build_module=lambda c, dtype: tx.ControlNetExportableTransformer(ckpt.load_transformer(c, dtype)).eval(),
    sample_inputs=lambda config, **kw: tx.sample_inputs(config, **kw),  # bound to a block count by spec_for
    test_shapes=TRANSFORMER.test_shapes,
)
SPECS = {s.name: s for s in (TRANSFORMER, VAE_DECODER, VAE_ENCODER, TRANSFORMER_CONTROLNET, *SPECS_21)}
# What every export holds; transformer_controlnet is added where a ControlNet is given.
DEFAULT_COMPONENTS = ("transformer", "vae_decoder", "vae_encoder")
# A Qwen-Image-2.1 export: the prefix cache's two passes and the 2.1 VAE. The uncached pass is optional: under
# causal_condition the prefix never attends to the target and is modulated at t = 0, so a forward without the cache
# equals extract then cached on the same inputs (tested), and each transformer graph holds a copy of the weights
# (14 GB in bf16 at real size): a third copy is exported only when asked for.
DEFAULT_COMPONENTS_21 = ("transformer_extract", "transformer_cached", "vae_decoder", "vae_encoder")
ALL_COMPONENTS_21 = ("transformer_uncached", *DEFAULT_COMPONENTS_21)


def default_components(qwen21: bool) -> tuple[str, ...]:
    return DEFAULT_COMPONENTS_21 if qwen21 else DEFAULT_COMPONENTS


def components_for(qwen21: bool) -> tuple[str, ...]:
    """Every component a checkpoint of this family can be exported as."""
    return ALL_COMPONENTS_21 if qwen21 else DEFAULT_COMPONENTS + ("transformer_controlnet",)


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
