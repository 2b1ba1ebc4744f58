"""A drop-in for `pipe.transformer` that runs an exported graph through any Runner.

It keeps the stock forward signature, so the diffusers denoising loop does not change. Around the
runner call it only: pads text to a length bucket (a handful of shapes for engines and CUDA graphs),
builds the text mask, and looks up real RoPE tables. Padded buffers and tables are cached per shape.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, padded_text_len
from qwen_image_trt.models.transformer_export import RopeTables
from qwen_image_trt.runtime.backends.base import Runner


class EngineTransformer(nn.Module):
    """Stands in for QwenImageTransformer2DModel inside QwenImagePipeline."""

    def __init__(self, runner: Runner, config: dict, text_bucket: int = DEFAULT_TEXT_BUCKET, device="cpu"):
        super().__init__()
        self.runner = runner
        self.config = FrozenDict(config)
        self.text_bucket = max(1, int(text_bucket))
        self._device = torch.device(device)
        self._rope = RopeTables(config["axes_dims_rope"])
        self._text_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # What QwenImagePipeline reads from its transformer.
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # graph I/O is float32 whatever the engine computes in

    def cache_context(self, name: str):
        return contextlib.nullcontext()

    def padded_text_len(self, text_len: int) -> int:
        return padded_text_len(text_len, self.text_bucket)

    def _padded_text(self, states: torch.Tensor, mask: torch.Tensor | None):
        batch, length, width = states.shape
        padded = self.padded_text_len(length)
        key = (batch, padded, width, states.device)
        if key not in self._text_buffers:
            self._text_buffers[key] = (torch.zeros(batch, padded, width, device=states.device),
                                       torch.zeros(batch, padded, dtype=torch.bool, device=states.device))
        text, text_mask = self._text_buffers[key]
        text[:, :length].copy_(states)
        text[:, length:].zero_()  # masked out, but zeroed so a result never depends on earlier calls
        if mask is None:
            text_mask[:, :length] = True
        else:
            text_mask[:, :length].copy_(mask)
        text_mask[:, length:] = False
        return text, text_mask, padded

    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, guidance=None, attention_kwargs=None, return_dict: bool = True, **unused):
        if guidance is not None:
            raise NotImplementedError("guidance-distilled transformers are not supported by the exported graph")
        frame, height, width = _single_image_shape(img_shapes, hidden_states.shape[1])
        text, text_mask, text_len = self._padded_text(encoder_hidden_states, encoder_hidden_states_mask)
        img_cos, img_sin, txt_cos, txt_sin = self._rope(frame, height, width, text_len, hidden_states.device)
        feeds = {
            "hidden_states": hidden_states.float().contiguous(),
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": text_mask,
            "timestep": timestep.float().contiguous(),
            "img_rope_cos": img_cos, "img_rope_sin": img_sin, "txt_rope_cos": txt_cos, "txt_rope_sin": txt_sin,
        }
        out = self.runner.infer(feeds)["noise_pred"].to(hidden_states.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def _single_image_shape(img_shapes, image_tokens: int) -> tuple[int, int, int]:
    """The pipeline passes [[(frame, h, w)]] * batch; every sample must share one grid."""
    if not img_shapes:
        raise ValueError("img_shapes is required: [[(1, latent_h // 2, latent_w // 2)]] * batch")
    first = tuple(img_shapes[0][0])
    if any(tuple(s[0]) != first or len(s) != 1 for s in img_shapes):
        raise ValueError(f"all samples in a batch must share one image grid; got {img_shapes}")
    frame, height, width = first
    if frame * height * width != image_tokens:
        raise ValueError(f"img_shapes {first} gives {frame * height * width} tokens, hidden_states has {image_tokens}")
    return frame, height, width
