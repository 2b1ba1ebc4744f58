"""A drop-in for `pipe.transformer` that runs an exported graph through any Runner.

It keeps the stock forward signature, so the diffusers denoising loop does not change. Around the
runner call it only: pads text to a length bucket (a handful of shapes for engines and CUDA graphs),
builds the text mask, and looks up real RoPE tables. Padded buffers and tables are cached per shape.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, padded_text_len
from qwen_image_trt.models.transformer_export import CONTROLNET_RESIDUALS, MODULATE_INDEX, RopeTables, modulate_index
from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.saved import EngineModule

# diffusers' loader resolves a saved component's loading method by looking its base classes up by name in the module
# model_index.json names (this one): DiffusionPipeline.from_pretrained needs ModelMixin to be found here.
ModelMixin = EngineModule.__mro__[1]


class EngineTransformer(EngineModule):
    """Stands in for QwenImageTransformer2DModel inside the Qwen-Image pipelines: a ModelMixin with the checkpoint's
    config, saved and loaded by the pipeline's save_pretrained / from_pretrained (runtime.saved)."""

    def __init__(self, runner: Runner, config: dict, text_bucket: int = DEFAULT_TEXT_BUCKET, device="cpu",
                 controlnet_runner: Runner | None = None, controlnet_blocks: int | None = None):
        super().__init__()
        self._register_checkpoint_config(config)
        self.runner = runner
        # The graph variant that adds ControlNet residuals after its blocks (exported with a ControlNet), and how
        # many residuals it was exported for.
        self.controlnet_runner, self.controlnet_blocks = controlnet_runner, controlnet_blocks
        self.text_bucket = max(1, int(text_bucket))
        self._device = torch.device(device)
        self._rope = RopeTables(config["axes_dims_rope"])
        self._text_buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._modulate: dict[tuple, torch.Tensor] = {}
        self.co_batcher = None  # runtime.co_batch: set while concurrent pipeline calls share this engine's calls

    @classmethod
    def from_record(cls, config: dict, record: dict):
        from qwen_image_trt.runtime.backends import make_runner
        from qwen_image_trt.runtime.saved import engines_for

        folder, manifest = engines_for(record)
        opts = dict(engines_dir=folder, device=record["device"], threads=record.get("threads"))
        controlnet = None
        if "transformer_controlnet" in manifest.components:
            controlnet = make_runner(record["backend"], "transformer_controlnet", **opts)
        module = cls(make_runner(record["backend"], "transformer", **opts), config,
                     text_bucket=record.get("text_bucket", DEFAULT_TEXT_BUCKET), device=record["device"],
                     controlnet_runner=controlnet, controlnet_blocks=record.get("controlnet_blocks"))
        module.engine_source = record
        if record.get("checkpoint") and Path(record["checkpoint"]).is_dir():
            module.checkpoint = Path(record["checkpoint"])  # the step cache's signal weights, where still there
        return module

    def to(self, *args, **kwargs):
        move_dropin(self, "transformer", *args, **kwargs)
        return self

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
                img_shapes=None, guidance=None, attention_kwargs=None, controlnet_block_samples=None,
                additional_t_cond=None, return_dict: bool = True):
        kwargs = dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                      encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep, img_shapes=img_shapes,
                      guidance=guidance, attention_kwargs=attention_kwargs,
                      controlnet_block_samples=controlnet_block_samples, additional_t_cond=additional_t_cond)
        batcher = self.co_batcher
        out = batcher.submit(kwargs) if batcher is not None else self.forward_tensor(**kwargs)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def forward_tensor(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                       timestep=None, img_shapes=None, guidance=None, attention_kwargs=None,
                       controlnet_block_samples=None, additional_t_cond=None) -> torch.Tensor:
        """The noise prediction for one (possibly co-batched) forward."""
        # What the graph does not take is refused by name: dropping it would be a silently wrong image.
        for name, value in (("guidance", guidance), ("additional_t_cond", additional_t_cond)):
            if value is not None:
                raise NotImplementedError(f"{name}: the exported transformer graph has no such input")
        residuals = self._controlnet_residuals(controlnet_block_samples, hidden_states)
        groups = image_grid_groups(img_shapes, hidden_states.shape)
        text, text_mask, text_len = self._padded_text(encoder_hidden_states, encoder_hidden_states_mask)
        if len(groups) == 1:  # the pipelines' case: every sample has the same grids
            (grids, _), = groups.items()
            return self._run(grids, hidden_states, text, text_mask, timestep, text_len, residuals)
        # samples with different condition grids but equal token counts: one call per grid layout
        out = torch.empty(*hidden_states.shape[:2], self.runner_output_channels, dtype=hidden_states.dtype,
                          device=hidden_states.device)
        for grids, rows in groups.items():
            idx = torch.tensor(rows, device=hidden_states.device)
            out[idx] = self._run(grids, hidden_states[idx], text[idx], text_mask[idx], timestep[idx], text_len,
                                 None if residuals is None else residuals[:, idx])
        return out

    def _controlnet_residuals(self, samples, hidden_states) -> torch.Tensor | None:
        """The ControlNet's per-block residuals as the graph's one input [blocks, batch, image_tokens, inner_dim]."""
        if samples is None:
            return None
        if self.controlnet_runner is None:
            raise NotImplementedError("controlnet_block_samples: this engine folder has no transformer_controlnet "
                                      "graph; export with the ControlNet (`qitrt export CKPT --controlnet DIR`)")
        if len(samples) != self.controlnet_blocks:
            raise ValueError(f"controlnet_block_samples has {len(samples)} residuals; the transformer_controlnet graph "
                             f"was exported for a ControlNet of {self.controlnet_blocks} blocks")
        stacked = torch.stack([s.float() for s in samples])
        if stacked.shape[1:3] != hidden_states.shape[:2]:
            raise ValueError(f"controlnet_block_samples are {list(stacked.shape[1:])}; hidden_states is "
                             f"{list(hidden_states.shape)}")
        return stacked

    @property
    def runner_output_channels(self) -> int:
        c = self.config
        return c["patch_size"] ** 2 * (c.get("out_channels") or c["in_channels"])

    def _run(self, grids, hidden_states, text, text_mask, timestep, text_len, residuals=None):
        img_cos, img_sin, txt_cos, txt_sin = self._rope.for_grids(grids, text_len, hidden_states.device)
        feeds = {
            "hidden_states": hidden_states.float().contiguous(),
            "encoder_hidden_states": text.contiguous(),
            "encoder_hidden_states_mask": text_mask.contiguous(),
            "timestep": timestep.float().contiguous(),
            "img_rope_cos": img_cos, "img_rope_sin": img_sin, "txt_rope_cos": txt_cos, "txt_rope_sin": txt_sin,
        }
        if self.config.get("zero_cond_t"):
            key = (grids, hidden_states.shape[0], hidden_states.device)
            if key not in self._modulate:
                self._modulate[key] = modulate_index(grids, hidden_states.shape[0], hidden_states.device)
            feeds[MODULATE_INDEX] = self._modulate[key]
        runner = self.runner
        if residuals is not None:
            feeds[CONTROLNET_RESIDUALS], runner = residuals.contiguous(), self.controlnet_runner
        return runner.infer(feeds)["noise_pred"].to(hidden_states.dtype)


def move_dropin(module, what: str, *args, **kwargs) -> None:
    """`.to(device, dtype)` of a drop-in: an engine stays on the device it was loaded on (moving it means loading it
    again), a floating dtype becomes the pipeline-side I/O dtype (the engine keeps its built precision)."""
    from qwen_image_trt.core.errors import InputError

    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    if device is not None:
        want, have = torch.device(device), module.device
        if want.type != have.type or (want.index is not None and want.index != (have.index or 0)):
            raise InputError("device", str(want), f"{have}: the {what} engine was loaded there; load the pipeline "
                             "again with load_pipeline(device=...) to run it elsewhere")
    if dtype is not None:
        if not dtype.is_floating_point:
            raise InputError("dtype", str(dtype), f"a floating dtype (the {what} engine's I/O is float32, cast to it)")
        module._io_dtype = dtype


def image_grid_groups(img_shapes, hidden_shape) -> dict[tuple, list[int]]:
    """{grids: sample rows} from the pipelines' img_shapes: one list of (frame, h, w) per sample, the target
    first and then any condition images; each list must add up to the sample's image tokens. The ControlNet
    pipelines pass one (frame, h, w) per sample instead of a list: the same as a list of one."""
    batch, image_tokens = int(hidden_shape[0]), int(hidden_shape[1])
    if not img_shapes:
        raise ValueError("img_shapes is required: [[(1, latent_h // 2, latent_w // 2), ...]] * batch")
    if len(img_shapes) != batch and batch % len(img_shapes) == 0:
        # the stock pipelines pass one entry per prompt while hidden_states holds prompts x num_images_per_prompt
        # rows (prompt-major, as diffusers repeats the latents)
        per = batch // len(img_shapes)
        img_shapes = [sample for sample in img_shapes for _ in range(per)]
    if len(img_shapes) != batch:
        raise ValueError(f"img_shapes has {len(img_shapes)} samples, hidden_states has {batch}")
    groups: dict[tuple, list[int]] = {}
    for row, sample in enumerate(img_shapes):
        if sample and len(sample) == 3 and all(isinstance(v, int) for v in sample):
            sample = [sample]
        if not sample or isinstance(sample[0], int):
            raise ValueError(f"img_shapes[{row}] = {sample!r}: a list of (frame, height, width) per sample")
        grids = tuple(tuple(int(v) for v in g) for g in sample)
        tokens = sum(f * h * w for f, h, w in grids)
        if tokens != image_tokens:
            raise ValueError(f"img_shapes[{row}] {list(grids)} gives {tokens} tokens, hidden_states has {image_tokens}")
        groups.setdefault(grids, []).append(row)
    return groups
