"""A tensor-only view of QwenImageTransformer2DModel that ONNX and TensorRT can take.

The stock forward builds complex RoPE tables from Python lists (`img_shapes`) and rotates q/k with
complex arithmetic; neither exports. Here the tables come in as real cos/sin inputs computed on the
host from the model's own `pos_embed`, and the attention processor rotates in real arithmetic. The
result equals the stock module (max abs 0.0 in fp32 on the tiny model, see tests).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

INPUT_NAMES = ["hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
               "img_rope_cos", "img_rope_sin", "txt_rope_cos", "txt_rope_sin"]
# Edit-2511 (`zero_cond_t`): per image token, 0 = modulate with the step's timestep (the target), 1 = with
# timestep 0 (condition images). The stock model builds it from img_shapes; here it is a graph input.
MODULATE_INDEX = "modulate_index"
# ControlNet: the residuals QwenImageControlNetModel returns (one [batch, image_tokens, inner_dim] tensor per
# ControlNet block), stacked on a first axis whose size is fixed at export (the ControlNet's num_layers).
CONTROLNET_RESIDUALS = "controlnet_residuals"
OUTPUT_NAMES = ["noise_pred"]
DYNAMIC_AXES = {
    "hidden_states": {0: "batch", 1: "image_tokens"},
    "encoder_hidden_states": {0: "batch", 1: "text_tokens"},
    "encoder_hidden_states_mask": {0: "batch", 1: "text_tokens"},
    "timestep": {0: "batch"},
    "img_rope_cos": {0: "image_tokens"},
    "img_rope_sin": {0: "image_tokens"},
    "txt_rope_cos": {0: "text_tokens"},
    "txt_rope_sin": {0: "text_tokens"},
    "noise_pred": {0: "batch", 1: "image_tokens"},
}


def input_names(config, controlnet: bool = False) -> list[str]:
    """The graph's inputs for a transformer config: the eight of every model, plus modulate_index for Edit-2511,
    plus the ControlNet residuals for the ControlNet variant of the graph."""
    names = INPUT_NAMES + [MODULATE_INDEX] if config.get("zero_cond_t") else list(INPUT_NAMES)
    return names + [CONTROLNET_RESIDUALS] if controlnet else names


def dynamic_axes(config, controlnet: bool = False) -> dict:
    axes = dict(DYNAMIC_AXES)
    if config.get("zero_cond_t"):
        axes[MODULATE_INDEX] = {0: "batch", 1: "image_tokens"}
    if controlnet:
        axes[CONTROLNET_RESIDUALS] = {1: "batch", 2: "image_tokens"}
    return axes


def controlnet_interval(num_layers: int, residuals: int) -> int:
    """Blocks per ControlNet residual, as QwenImageTransformer2DModel.forward computes it: block i adds residual
    i // interval."""
    return int(math.ceil(num_layers / residuals))


def modulate_index(grids, batch: int, device="cpu") -> torch.Tensor:
    """[batch, image tokens] int32: 0 over the target grid (the first), 1 over the condition grids, as the stock
    QwenImageTransformer2DModel computes it from img_shapes."""
    (f, h, w), rest = grids[0], grids[1:]
    target, cond = f * h * w, sum(a * b * c for a, b, c in rest)
    row = torch.cat([torch.zeros(target, dtype=torch.int32), torch.ones(cond, dtype=torch.int32)])
    return row.expand(batch, -1).contiguous().to(device)


def rotate_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Complex RoPE in real arithmetic. x: [B, S, H, D]; cos/sin: [S, D/2] or per sample [B, S, D/2] (interleaved
    pairs)."""
    # unflatten keeps the sizes symbolic in the exported graph; reshape(*x.shape[:-1], -1, 2) would freeze them.
    # unbind exports as one Split; indexing [..., 0] / [..., 1] would be two Gathers over q and k.
    x_re, x_im = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # the heads axis
    out = torch.stack([x_re * cos - x_im * sin, x_re * sin + x_im * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class RealRopeAttnProcessor:
    """Joint text+image attention of QwenDoubleStreamAttnProcessor2_0 with real-valued RoPE.

    `image_rotary_emb` is ((img_cos, img_sin), (txt_cos, txt_sin)) instead of two complex tables.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        head_dim = attn.inner_dim // attn.heads
        seq_txt = encoder_hidden_states.shape[1]

        def heads(t):
            return t.unflatten(-1, (-1, head_dim))

        img_q, img_k, img_v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        txt_q, txt_k, txt_v = (heads(attn.add_q_proj(encoder_hidden_states)),
                               heads(attn.add_k_proj(encoder_hidden_states)),
                               heads(attn.add_v_proj(encoder_hidden_states)))
        img_q, img_k = attn.norm_q(img_q), attn.norm_k(img_k)
        txt_q, txt_k = attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)

        (img_cos, img_sin), (txt_cos, txt_sin) = image_rotary_emb
        img_q, img_k = rotate_real(img_q, img_cos, img_sin), rotate_real(img_k, img_cos, img_sin)
        txt_q, txt_k = rotate_real(txt_q, txt_cos, txt_sin), rotate_real(txt_k, txt_cos, txt_sin)

        # [B, S, H, D] -> [B, H, S, D], text first as in the stock processor.
        q = torch.cat([txt_q, img_q], dim=1).transpose(1, 2)
        k = torch.cat([txt_k, img_k], dim=1).transpose(1, 2)
        v = torch.cat([txt_v, img_v], dim=1).transpose(1, 2)
        bias = None
        if encoder_hidden_states_mask is not None:
            image_keep = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool)
            keep = torch.cat([encoder_hidden_states_mask.bool(), image_keep], dim=1)[:, None, None, :]
            # An additive [B, 1, 1, S] bias, not a boolean mask: exported, a boolean mask becomes Where and
            # IsNaN over every [B, H, S, S] score (37% of ONNX Runtime CPU time at 1024 image tokens); the bias
            # is one broadcast Add. Image keys are never masked, so no row is all -inf and softmax stays finite.
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)

        img_out = attn.to_out[0](out[:, seq_txt:].contiguous())
        txt_out = attn.to_add_out(out[:, :seq_txt].contiguous())
        return img_out, txt_out


# Config fields that change the forward beyond shapes: the graph models each at this value only.
UNMODELED_AT = {"guidance_embeds": False, "use_additional_t_cond": False, "use_layer3d_rope": False}
# Fields the graph models at any value (sizes of weights and of the RoPE tables).
SHAPE_FIELDS = {"patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "axes_dims_rope"}
MODELED_FLAGS = {"zero_cond_t"}  # modelled at either value (an extra graph input)
_WHY = {"guidance_embeds": "guidance-distilled transformers take a guidance input the graph lacks",
        "use_additional_t_cond": "Layered takes an additional timestep condition",
        "use_layer3d_rope": "Layered numbers RoPE positions per layer"}


def check_modeled_config(config) -> None:
    """Refuse, by name, any transformer config field this export does not model: every argument of the installed
    QwenImageTransformer2DModel that is neither a size nor at the value the graph reproduces. A field added by a
    later diffusers is refused until it is modelled, never silently dropped."""
    import inspect

    from diffusers import QwenImageTransformer2DModel

    params = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    for name, p in params.items():
        if name == "self" or name in SHAPE_FIELDS | MODELED_FLAGS or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        value = config.get(name, p.default)
        want = UNMODELED_AT.get(name, p.default)
        if value != want:
            why = _WHY.get(name, "the export does not model this field")
            raise NotImplementedError(f"transformer config {name}={value!r} is not supported by the export ({why}); "
                                      f"supported: {name}={want!r}")


class ExportableTransformer(nn.Module):
    """Runs a QwenImageTransformer2DModel from tensors only. Graph I/O is float32 whatever the compute dtype,
    so a drop-in feeds every precision the same way."""

    def __init__(self, transformer):
        super().__init__()
        check_modeled_config(transformer.config)
        self.transformer = transformer
        # Blocks to bypass (quantization evidence: what do the quantized blocks contribute?). Eager only:
        # a traced graph holds every block.
        self.skip_blocks: frozenset[int] = frozenset()
        transformer.set_attn_processor(RealRopeAttnProcessor())

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.transformer.img_in.weight.dtype

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                img_rope_cos, img_rope_sin, txt_rope_cos, txt_rope_sin, modulate_index=None):
        return self.run(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                        img_rope_cos, img_rope_sin, txt_rope_cos, txt_rope_sin, modulate_index)

    def run(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
            img_rope_cos, img_rope_sin, txt_rope_cos, txt_rope_sin, modulate_index=None, controlnet_residuals=None):
        m, dtype = self.transformer, self.compute_dtype
        zero_cond_t = bool(getattr(m, "zero_cond_t", False))
        if zero_cond_t != (modulate_index is not None):
            raise ValueError("modulate_index is an input exactly when the transformer has zero_cond_t")
        hidden_states = m.img_in(hidden_states.to(dtype))
        timestep = timestep.to(dtype)
        if zero_cond_t:  # the stock forward: a second embedding at t = 0 for the condition tokens
            timestep = torch.cat([timestep, timestep * 0], dim=0)
        temb = m.time_text_embed(timestep, hidden_states)
        encoder_hidden_states = m.txt_in(m.txt_norm(encoder_hidden_states.to(dtype)))
        rope = ((img_rope_cos, img_rope_sin), (txt_rope_cos, txt_rope_sin))
        if controlnet_residuals is not None:
            interval = controlnet_interval(len(m.transformer_blocks), controlnet_residuals.shape[0])
        for i, block in enumerate(m.transformer_blocks):
            if i in self.skip_blocks:
                continue
            run = zero_cond_block if zero_cond_t else block
            encoder_hidden_states, hidden_states = run(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=encoder_hidden_states_mask, temb=temb, image_rotary_emb=rope,
                **({"block": block, "modulate_index": modulate_index} if zero_cond_t else {}))
            if controlnet_residuals is not None:  # after the block, as the stock forward adds them
                hidden_states = hidden_states + controlnet_residuals[i // interval].to(dtype)
        if zero_cond_t:
            temb = temb[: temb.shape[0] // 2]
        hidden_states = m.norm_out(hidden_states, temb)
        return m.proj_out(hidden_states).float()


class ControlNetExportableTransformer(ExportableTransformer):
    """The graph with ControlNet residuals as its last input. ControlNets condition text-to-image models only, so
    there is no Edit-2511 (`zero_cond_t`) variant."""

    def __init__(self, transformer):
        if transformer.config.get("zero_cond_t"):
            raise NotImplementedError("transformer config zero_cond_t=True with a ControlNet: QwenImageControlNetPipeline "
                                      "runs text-to-image checkpoints only")
        super().__init__(transformer)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                img_rope_cos, img_rope_sin, txt_rope_cos, txt_rope_sin, controlnet_residuals):
        return self.run(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep,
                        img_rope_cos, img_rope_sin, txt_rope_cos, txt_rope_sin, None, controlnet_residuals)


def zero_cond_block(block, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
                    modulate_index):
    """QwenImageTransformerBlock.forward with zero_cond_t, its `torch.chunk(temb, 2)` written as a slice.

    The exporter cannot prove chunk's chunk count ((3B - 1) // B == 2) for a symbolic batch B and would freeze the
    batch size; a slice of B rows needs no such proof. Everything else calls the block's own modules and its own
    `_modulate`; tests pin this to the stock block (max abs difference 1e-5 on the tiny model).
    """
    img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)  # [2B, 3D] each: t for the target, 0 for the rest
    txt_mod1, txt_mod2 = block.txt_mod(temb[: temb.shape[0] // 2]).chunk(2, dim=-1)

    img_modulated, img_gate1 = block._modulate(block.img_norm1(hidden_states), img_mod1, modulate_index)
    txt_modulated, txt_gate1 = block._modulate(block.txt_norm1(encoder_hidden_states), txt_mod1)
    img_attn, txt_attn = block.attn(hidden_states=img_modulated, encoder_hidden_states=txt_modulated,
                                    encoder_hidden_states_mask=encoder_hidden_states_mask,
                                    image_rotary_emb=image_rotary_emb)
    hidden_states = hidden_states + img_gate1 * img_attn
    encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn

    img_modulated2, img_gate2 = block._modulate(block.img_norm2(hidden_states), img_mod2, modulate_index)
    hidden_states = hidden_states + img_gate2 * block.img_mlp(img_modulated2)
    txt_modulated2, txt_gate2 = block._modulate(block.txt_norm2(encoder_hidden_states), txt_mod2)
    encoder_hidden_states = encoder_hidden_states + txt_gate2 * block.txt_mlp(txt_modulated2)
    if encoder_hidden_states.dtype == torch.float16:  # the stock block's overflow clip
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


class RopeTables:
    """Host-side real RoPE tables, cached per (image grids, text length); computed from the model's own pos_embed.

    A sample's image sequence is one or more grids laid end to end: the target, then the condition images of the
    edit pipelines, each at its own frame index (QwenEmbedRope's `idx`), exactly as the stock model numbers them.
    """

    def __init__(self, axes_dims_rope, theta: int = 10000):
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        self._pos_embed = QwenEmbedRope(theta=theta, axes_dim=list(axes_dims_rope), scale_rope=True)
        self._cached = lru_cache(maxsize=64)(self._compute)

    def __call__(self, frame: int, height: int, width: int, text_len: int, device="cpu"):
        """Return (img_cos, img_sin, txt_cos, txt_sin) float32 on `device`; the same tensors for the same key."""
        return self.for_grids(((frame, height, width),), text_len, device)

    def for_grids(self, grids, text_len: int, device="cpu"):
        """Tables for a sequence of grids ((frame, h, w), ...): target first, then condition images."""
        key = tuple(tuple(int(v) for v in g) for g in grids)
        return self._cached(key, int(text_len), str(device))

    def _compute(self, grids, text_len, device):
        img, txt = self._pos_embed([list(grids)], max_txt_seq_len=text_len, device=torch.device("cpu"))
        return tuple(t.to(device=device, dtype=torch.float32).contiguous()
                     for t in (img.real, img.imag, txt.real, txt.imag))


def sample_inputs(config, batch: int = 2, grid: tuple[int, int] = (6, 8), text_len: int = 12, seed: int = 0,
                  controlnet_blocks: int = 0):
    """Example inputs for export and tests, shaped from a transformer config."""
    g = torch.Generator().manual_seed(seed)
    tables = RopeTables(config["axes_dims_rope"])(1, grid[0], grid[1], text_len)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[-1, text_len // 2:] = False  # exercise the padded path
    args = (
        torch.randn(batch, grid[0] * grid[1], config["in_channels"], generator=g),
        torch.randn(batch, text_len, config["joint_attention_dim"], generator=g),
        mask,
        torch.rand(batch, generator=g),
        *tables,
    )
    if config.get("zero_cond_t"):  # the grid's first rows as the target, the rest as one condition image
        top = max(1, grid[0] // 2)
        args += (modulate_index(((1, top, grid[1]), (1, grid[0] - top, grid[1])), batch),)
    if controlnet_blocks:
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        args += (torch.randn(controlnet_blocks, batch, grid[0] * grid[1], inner, generator=g) * 0.1,)
    return args
