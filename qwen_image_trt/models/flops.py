"""A FLOP and byte model of the Qwen-Image transformer (QwenImageTransformer2DModel), from its config alone.

Pure arithmetic: no torch, no weights. One forward over `batch` samples, each `image_tokens` packed latent
tokens (2x2 patches) plus `text_tokens` text tokens, joint attention over both streams.

Counted (a multiply-add is 2 FLOP):
- linear layers: img_in, txt_in, the timestep MLP, per block the img/txt modulation (per sample), the 4 image and
  4 text attention projections (q, k, v, out), the img/txt MLPs (D -> 4D -> D), norm_out's modulation, proj_out;
- attention: Q K^T and P V over all image + text tokens, 2 * 2 * N^2 * D per block and sample (what
  `torch.utils.flop_counter` counts for scaled_dot_product_attention).
Not counted: norms, RoPE, softmax, GELU, residual adds (elementwise; < 1% of the FLOPs at real sizes).

Bytes are the ideal minimum traffic of one forward: every weight read once, each linear layer's input read
and output written once, attention as a fused kernel (read Q, K, V, write O). Real kernels move more, so the
byte floor is a lower bound on time, as is the FLOP floor.

With true CFG the pipeline runs the conditional and unconditional branches as one forward of 2x the batch:
`per_step(..., cfg=True)` doubles the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TIME_PROJ_DIM = 256  # QwenTimestepProjEmbeddings: Timesteps(num_channels=256) -> TimestepEmbedding
MLP_MULT = 4  # FeedForward(dim, dim_out=dim) default mult

# bytes per element of weights and activations, by graph precision
WEIGHT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
ACT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 2, "int8": 2}  # quantized graphs keep bf16 I/O


@dataclass(frozen=True)
class TransformerShape:
    dim: int  # inner dim = heads * head_dim
    heads: int
    head_dim: int
    layers: int
    in_channels: int
    joint_attention_dim: int
    out_features: int  # patch_size^2 * out_channels

    @classmethod
    def from_config(cls, config: dict) -> "TransformerShape":
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        patch = int(config.get("patch_size", 2))
        out_channels = int(config.get("out_channels") or config["in_channels"])
        return cls(dim=heads * head_dim, heads=heads, head_dim=head_dim, layers=int(config["num_layers"]),
                   in_channels=int(config["in_channels"]), joint_attention_dim=int(config["joint_attention_dim"]),
                   out_features=patch * patch * out_channels)


@dataclass(frozen=True)
class ForwardCost:
    """One transformer forward. FLOPs split into linear layers and attention; bytes at `precision`."""

    batch: int
    image_tokens: int
    text_tokens: int
    linear_flops: float
    attention_flops: float
    weight_bytes: float
    activation_bytes: float
    params: int
    precision: str

    @property
    def flops(self) -> float:
        return self.linear_flops + self.attention_flops

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    @property
    def intensity(self) -> float:
        """FLOP per byte: above the device's peak FLOP/s / peak B/s the forward is compute-bound."""
        return self.flops / self.bytes

    def floor_seconds(self, peak_flops: float | None, peak_bytes_per_s: float | None) -> float | None:
        """Roofline lower bound on the time of this forward on a device; None where a peak is unknown."""
        if not peak_flops or not peak_bytes_per_s:
            return None
        return max(self.flops / peak_flops, self.bytes / peak_bytes_per_s)

    def to_dict(self) -> dict:
        return dict(asdict(self), flops=self.flops, bytes=self.bytes, intensity=self.intensity)


def image_tokens_for(width: int, height: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Packed latent tokens of one image: (H/8/2) * (W/8/2); 1024x1024 -> 4096."""
    return (height // vae_scale // patch) * (width // vae_scale // patch)


def param_count(shape: TransformerShape) -> int:
    d, j, hd = shape.dim, shape.joint_attention_dim, shape.head_dim
    lin = lambda i, o: i * o + o  # noqa: E731 (weight + bias)
    embed = lin(shape.in_channels, d) + lin(j, d) + j + lin(TIME_PROJ_DIM, d) + lin(d, d)  # + txt_norm weight
    block = (2 * lin(d, 6 * d)  # img_mod, txt_mod
             + 8 * lin(d, d)  # to_q/k/v/out, add_q/k/v_proj, to_add_out
             + 4 * hd  # norm_q, norm_k, norm_added_q, norm_added_k (RMSNorm weights)
             + 2 * (lin(d, MLP_MULT * d) + lin(MLP_MULT * d, d)))  # img_mlp, txt_mlp
    head = lin(d, 2 * d) + lin(d, shape.out_features)  # norm_out modulation, proj_out
    return embed + shape.layers * block + head


def forward_cost(config: dict | TransformerShape, image_tokens: int, text_tokens: int, batch: int = 1,
                 precision: str = "bf16") -> ForwardCost:
    """FLOPs and ideal bytes of one transformer forward over `batch` samples."""
    s = config if isinstance(config, TransformerShape) else TransformerShape.from_config(config)
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"precision {precision!r}: one of {', '.join(WEIGHT_BYTES)}")
    b, i, t, d = batch, image_tokens, text_tokens, s.dim
    n = i + t
    # (tokens, in features, out features) of every linear layer, per sample
    linears = [(i, s.in_channels, d), (t, s.joint_attention_dim, d), (1, TIME_PROJ_DIM, d), (1, d, d)]
    per_block = [(1, d, 6 * d), (1, d, 6 * d),  # modulation (per sample, from the timestep embedding)
                 (i, d, d), (i, d, d), (i, d, d), (i, d, d),  # image q, k, v, out
                 (t, d, d), (t, d, d), (t, d, d), (t, d, d),  # text q, k, v, out
                 (i, d, MLP_MULT * d), (i, MLP_MULT * d, d), (t, d, MLP_MULT * d), (t, MLP_MULT * d, d)]
    linears += per_block * s.layers
    linears += [(1, d, 2 * d), (i, d, s.out_features)]
    macs = sum(tok * fi * fo for tok, fi, fo in linears)
    linear_flops = 2.0 * b * macs
    attention_flops = float(s.layers) * b * 4 * n * n * d
    params = param_count(s)
    a = ACT_BYTES[precision]
    act = sum(tok * (fi + fo) for tok, fi, fo in linears) + s.layers * 4 * n * d  # + fused attention q,k,v,o
    return ForwardCost(batch=b, image_tokens=i, text_tokens=t, linear_flops=linear_flops,
                       attention_flops=attention_flops, weight_bytes=float(params * WEIGHT_BYTES[precision]),
                       activation_bytes=float(b * act * a), params=params, precision=precision)


def per_step(config: dict | TransformerShape, width: int, height: int, text_tokens: int, batch: int = 1,
             cfg: bool = True, precision: str = "bf16") -> ForwardCost:
    """One denoising step for `batch` images: with true CFG one forward over 2 x batch samples."""
    return forward_cost(config, image_tokens_for(width, height), text_tokens, batch * (2 if cfg else 1), precision)
