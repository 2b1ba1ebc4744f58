"""Step caching (TeaCache / First-Block-Cache style) around any transformer: torch, ONNX Runtime or TensorRT.

Before each transformer call a cheap signal is computed in torch: the timestep-modulated input of the first
block, `LayerNorm(img_in(x)) * (1 + scale) + shift` with (shift, scale) from block 0's `img_mod(temb)` (TeaCache's
signal; it is ~0.1% of one forward's FLOPs and needs only `img_in`, the timestep embedder and block 0's `img_mod`:
read from the checkpoint for engines, shared with the module for torch). Per sample row the relative L1 change
of that signal since the previous step is accumulated; while the sum stays under the threshold, the call is
skipped for that row and its last output is reused, else the row is computed and the sum restarts at zero.

What is reused is the transformer's output itself: under flow matching the prediction is a velocity, nearly
constant along the straight paths these models learn, so a skipped step is an Euler step with a slightly stale
velocity. (Re-adding the latent change, `out - x`, would not be: the velocity does not move with x.)

Decisions are per (CFG branch, row): the stock loop's `cache_context("cond"/"uncond")` names the branch, the
batched-CFG loop stacks both branches as rows of one call, and requests batched together are rows too. Rows that
must be computed go to the wrapped forward as one smaller batch. The first `warmup` steps and the last step are
always computed (TeaCache does the same: the first steps fix the layout, the last one the detail).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.runtime.limits import check_threshold

SIGNAL_KEYS = ("img_in.", "time_text_embed.timestep_embedder.", "transformer_blocks.0.img_mod.")


class ModulatedInput(nn.Module):
    """The first block's modulated image input: the signal the cache decides on."""

    def __init__(self, img_in: nn.Module, timestep_embed: nn.Module, img_mod: nn.Module, dim: int, eps: float = 1e-6):
        super().__init__()
        self.img_in, self.timestep_embed, self.img_mod, self.dim, self.eps = img_in, timestep_embed, img_mod, dim, eps

    @classmethod
    def of_transformer(cls, transformer: nn.Module) -> "ModulatedInput":
        """Shares the stock module's own layers (no copy)."""
        block = transformer.transformer_blocks[0]
        return cls(transformer.img_in, transformer.time_text_embed, block.img_mod, block.dim)

    @classmethod
    def from_checkpoint(cls, checkpoint, config: dict, device="cpu") -> "ModulatedInput":
        """Reads only the tensors the signal needs from the checkpoint's transformer weights (~1% of them)."""
        from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings
        from safetensors import safe_open

        dim = config["num_attention_heads"] * config["attention_head_dim"]
        module = cls(nn.Linear(config["in_channels"], dim), QwenTimestepProjEmbeddings(dim),
                     nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)), dim)
        state = {}
        for f in sorted((Path(checkpoint) / "transformer").glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    if key.startswith(SIGNAL_KEYS):
                        name = key.replace("time_text_embed.", "timestep_embed.", 1).replace(
                            "transformer_blocks.0.img_mod.", "img_mod.", 1)
                        state[name] = sf.get_tensor(key).float()
        wanted = {k for k in module.state_dict() if not k.startswith("timestep_embed.time_proj")}
        missing = sorted(wanted - set(state))
        if missing:
            raise InputError("step_cache", checkpoint, f"a checkpoint whose transformer has {', '.join(missing)} "
                             "(the step cache's signal)")
        module.load_state_dict(state, strict=False)
        return module.to(device).eval()

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        weight = next(self.img_in.parameters())
        x = self.img_in(hidden_states.to(weight.dtype))
        embed = self.timestep_embed
        temb = embed.timestep_embedder(embed.time_proj(timestep.to(weight.dtype).flatten()).to(weight.dtype))
        shift, scale, _ = self.img_mod(temb)[:, : 3 * self.dim].chunk(3, dim=-1)
        x = torch.nn.functional.layer_norm(x, (self.dim,), eps=self.eps)
        return (x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).float()


@dataclass
class _Row:
    signal: torch.Tensor
    output: torch.Tensor
    accumulated: float = 0.0


@dataclass
class StepCacheStats:
    computed: int = 0  # row-steps run through the transformer
    skipped: int = 0  # row-steps answered from the cache
    calls: int = 0  # transformer calls made (a call with no row to compute is not made)
    per_step: list = field(default_factory=list)  # (branch, step, rows computed, rows skipped)

    @property
    def skip_ratio(self) -> float:
        total = self.computed + self.skipped
        return self.skipped / total if total else 0.0

    def as_dict(self) -> dict:
        return {"computed": self.computed, "skipped": self.skipped, "calls": self.calls,
                "skip_ratio": round(self.skip_ratio, 4)}


class StepCache:
    """One generation's cache state. `total_steps` (a callable) says how many steps the loop has, so that the last
    one is always computed; `warmup` first steps are too."""

    def __init__(self, threshold: float, signal: ModulatedInput, total_steps=lambda: None, warmup: int = 1):
        self.threshold, self.signal, self.total_steps, self.warmup = float(threshold), signal, total_steps, warmup
        self.branch = "default"
        self.rows: dict[str, list[_Row | None]] = {}
        self.steps: dict[str, int] = {}
        self.stats = StepCacheStats()

    def decide(self, signal: torch.Tensor) -> list[bool]:
        """Which rows must be computed at this call (True) and which may reuse their last output."""
        rows = self.rows.get(self.branch)
        if rows is None or len(rows) != signal.shape[0]:  # a new branch, or the batch changed: start over
            rows = self.rows[self.branch] = [None] * signal.shape[0]
            self.steps[self.branch] = 0
        step = self.steps[self.branch]
        total = self.total_steps()
        forced = step < self.warmup or (total is not None and step >= total - 1)
        compute = []
        for i, row in enumerate(rows):
            if row is None or forced:
                compute.append(True)
                continue
            prev = row.signal
            row.accumulated += float((signal[i] - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            compute.append(row.accumulated >= self.threshold)
        return compute

    def record(self, signal: torch.Tensor, compute: list[bool], output: torch.Tensor | None,
               computed_rows: list[int]) -> torch.Tensor:
        """Store the new signals and computed outputs; return the full batch's output."""
        rows = self.rows[self.branch]
        by_row = dict(zip(computed_rows, output)) if output is not None else {}
        for i, run in enumerate(compute):
            if run:
                rows[i] = _Row(signal[i], by_row[i].detach().clone())
            else:
                rows[i].signal = signal[i]
        step = self.steps[self.branch]
        self.steps[self.branch] = step + 1
        done = sum(compute)
        self.stats.computed += done
        self.stats.skipped += len(compute) - done
        self.stats.calls += bool(done)
        self.stats.per_step.append((self.branch, step, done, len(compute) - done))
        return torch.stack([r.output for r in rows])


def _rows_of(value, rows: list[int], batch: int):
    """`value` restricted to `rows` when it is per-sample (batch-first tensor or list), else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[torch.tensor(rows, device=value.device)]
    if isinstance(value, (list, tuple)) and len(value) == batch:
        return [value[i] for i in rows]
    return value


def _target_tokens(img_shapes, row: int, total: int) -> int:
    """Tokens of the generated image in a row (edit pipelines append condition images after it)."""
    try:
        sample = img_shapes[row] if len(img_shapes) > 1 else img_shapes[0]
        f, h, w = sample[0]
        return int(f * h * w)
    except (TypeError, IndexError, ValueError):
        return total


class _CachedForward:
    """Replaces `transformer.forward` (an instance attribute) while a pipeline call runs with a step cache."""

    def __init__(self, forward, cache: StepCache):
        self.forward, self.cache = forward, cache

    def __call__(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                 img_shapes=None, return_dict: bool = True, **kwargs):
        batch, tokens = hidden_states.shape[:2]
        target = min(_target_tokens(img_shapes, 0, tokens), tokens) if img_shapes else tokens
        signal = self.cache.signal(hidden_states[:, :target], timestep.expand(batch) if timestep.dim() == 0
                                   else timestep)
        compute = self.cache.decide(signal)
        rows = [i for i, run in enumerate(compute) if run]
        output = None
        if rows:
            args = dict(encoder_hidden_states=encoder_hidden_states,
                        encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                        img_shapes=img_shapes, **kwargs)
            if len(rows) < batch:  # only the rows that must run, as one smaller batch
                args = {k: _rows_of(v, rows, batch) for k, v in args.items()}
            output = self.forward(_rows_of(hidden_states, rows, batch), return_dict=False, **args)[0]
        out = self.cache.record(signal, compute, output, rows).to(hidden_states.dtype)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)


def signal_for(transformer: nn.Module) -> ModulatedInput:
    """The signal module for a pipeline's transformer, built once and kept on it."""
    signal = getattr(transformer, "_step_signal", None)
    if signal is None:
        if hasattr(transformer, "transformer_blocks"):  # the stock torch module
            signal = ModulatedInput.of_transformer(transformer)
        else:  # an engine drop-in: the few weights come from the checkpoint it was loaded with
            root = getattr(transformer, "checkpoint", None)
            if root is None:
                raise InputError("step_cache", "on", "a transformer loaded by load_pipeline (its checkpoint holds the "
                                 "signal's weights)")
            signal = ModulatedInput.from_checkpoint(root, dict(transformer.config), transformer.device)
        object.__setattr__(transformer, "_step_signal", signal)  # not a registered submodule: never saved
    return signal


@contextlib.contextmanager
def step_cache(pipe, threshold, warmup: int = 1):
    """Run `pipe`'s transformer with a step cache for the duration of the block; yields the StepCache (its
    `stats` say what was skipped). threshold None/0: a no-op that yields None."""
    threshold = check_threshold(threshold)
    if threshold is None:
        yield None
        return
    transformer = pipe.transformer
    if dict(transformer.config).get("guidance_embeds"):
        raise InputError("step_cache", threshold, "off for guidance-distilled transformers (the signal has no "
                         "guidance embedding)")
    cache = StepCache(threshold, signal_for(transformer), lambda: getattr(pipe, "_num_timesteps", None), warmup)
    stock_context = transformer.cache_context

    @contextlib.contextmanager
    def branch(name: str):
        before, cache.branch = cache.branch, name
        try:
            with stock_context(name):
                yield
        finally:
            cache.branch = before

    own = {name: vars(transformer)[name] for name in ("forward", "cache_context") if name in vars(transformer)}
    transformer.forward = _CachedForward(transformer.forward, cache)  # wraps a compiled forward too
    transformer.cache_context = branch
    try:
        yield cache
    finally:
        for name in ("forward", "cache_context"):  # back to what was there: the class's, or an instance's own
            if name in own:
                setattr(transformer, name, own[name])
            else:
                delattr(transformer, name)
