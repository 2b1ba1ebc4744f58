"""The torch fast path: what `backend="torch"` can do without TensorRT, on the stock diffusers transformer.

- `compile`: torch.compile of the transformer's blocks (regional compilation: the identical blocks share one
  graph, so compile time is about one block's). Text is padded to a length bucket (masked, as the engine
  drop-ins do), so a server compiles once per (batch, image size, text bucket), not once per prompt length;
  dynamo's recompile limit is raised to hold those buckets, and every graph compiled is counted
  (`transformer.compiled_graphs`) so a test or a benchmark can see a recompile.
- `fp8`: torchao's float8 linears (dynamic per-tensor E4M3 activations and weights) on GPUs with FP8 tensor cores
  (compute capability >= 8.9: Ada, Hopper, Blackwell), on the same Linear layers the FP8 build recipe quantizes
  (compile/recipe.py: embedders, norm_out/proj_out and the first and last 2 blocks stay in bf16).
- `cuda_graphs`: torch.compile's "reduce-overhead" mode, one CUDA graph per shape bucket (implies `compile`).

Options a device cannot run are refused before any weight is loaded, naming the option and what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET, padded_text_len

RECOMPILE_LIMIT = 64  # (batch, image size, text bucket) shapes one process may compile before dynamo gives up
FP8_MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class TorchOptions:
    compile: bool = False
    fp8: bool = False
    cuda_graphs: bool = False
    text_bucket: int = DEFAULT_TEXT_BUCKET
    compile_backend: str = "inductor"

    @property
    def any(self) -> bool:
        return self.compile or self.fp8 or self.cuda_graphs

    @classmethod
    def parse(cls, value) -> "TorchOptions":
        """From a TorchOptions, a dict, or a comma-separated string ("compile,fp8")."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            names = [v.strip().replace("-", "_") for v in value.split(",") if v.strip()]
            value = {n: True for n in names}
        if not isinstance(value, dict):
            raise InputError("torch_options", value, "a dict or 'compile,fp8,cuda_graphs'")
        allowed = {"compile", "fp8", "cuda_graphs", "text_bucket", "compile_backend"}
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise InputError("torch_options", unknown, f"keys among {', '.join(sorted(allowed))}")
        return cls(**value)


def check_torch_options(options: TorchOptions, device: str, capability=None) -> TorchOptions:
    """Refuse what `device` cannot run; `capability` (major, minor) stands in for the GPU's in tests."""
    dev = torch.device(device)
    if options.cuda_graphs and dev.type != "cuda":
        raise InputError("cuda_graphs", True, f"a CUDA device (device is {device}): CUDA graphs replay GPU kernels")
    if options.fp8:
        if dev.type != "cuda":
            raise InputError("fp8", True, f"a CUDA GPU with FP8 tensor cores, compute capability >= 8.9 (device is "
                             f"{device}); on this machine use the FP8 build (`qitrt build --precision fp8`) with "
                             "ONNX Runtime to check accuracy")
        if capability is None and not torch.cuda.is_available():
            raise InputError("device", device, "a CUDA device this machine has (torch sees none) for fp8")
        cap = capability or torch.cuda.get_device_capability(dev)
        if tuple(cap) < FP8_MIN_CAPABILITY:
            raise InputError("fp8", True, f"a GPU with compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                             f"{device} has {cap[0]}.{cap[1]}")
        try:
            import torchao.quantization  # noqa: F401
        except ImportError:
            raise InputError("fp8", True, "torchao installed (pip install torchao): its float8 linears run it") \
                from None
    if options.text_bucket < 1:
        raise InputError("text_bucket", options.text_bucket, "an integer >= 1")
    return options


# The FP8 build recipe's default exclusions (compile/recipe.py; the runtime does not read the build stage, so they
# are restated here and tests/test_torch_fast.py holds the two equal): embedders and the output head, and the
# first and last 2 blocks, stay in high precision.
FP8_KEEP_MODULES = ("img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out")
FP8_KEEP_FIRST, FP8_KEEP_LAST = 2, 2


def fp8_linear_names(transformer) -> list[str]:
    """The Linear layers the FP8 path converts: those the FP8 build recipe quantizes, no others."""
    blocks = len(transformer.transformer_blocks)
    kept = set(range(FP8_KEEP_FIRST)) | set(range(blocks - FP8_KEEP_LAST, blocks))
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if not isinstance(module, torch.nn.Linear) or parts[0] in FP8_KEEP_MODULES:
            continue
        if parts[0] == "transformer_blocks" and int(parts[1]) in kept:
            continue
        names.append(name)
    return names


def apply_torch_options(transformer, options: TorchOptions):
    """Apply `options` to the stock transformer in place (before the pipeline is assembled) and return it."""
    if options.fp8:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerTensor, quantize_

        chosen = set(fp8_linear_names(transformer))
        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerTensor()),
                  filter_fn=lambda module, fqn: fqn in chosen)
    if options.compile or options.cuda_graphs:
        _compile(transformer, options)
    return transformer


class _Counted:
    """A dynamo backend that counts the graphs it compiles, then hands them to the real backend."""

    def __init__(self, backend: str, owner):
        self.backend, self.owner = backend, owner

    def __call__(self, gm, example_inputs):
        self.owner.compiled_graphs += 1
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


def _compile(transformer, options: TorchOptions) -> None:
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    object.__setattr__(transformer, "compiled_graphs", 0)
    kwargs = dict(dynamic=False, mode="reduce-overhead") if options.cuda_graphs else dict(
        dynamic=False, backend=_Counted(options.compile_backend, transformer))
    if getattr(transformer, "_repeated_blocks", None):
        # Regional compilation (diffusers' compile_repeated_blocks): the 60 identical blocks share one compiled
        # graph per shape, so compiling costs about one block, not the whole model; the rest stays eager.
        transformer.compile_repeated_blocks(**kwargs)
        compiled = transformer.forward
    else:
        compiled = torch.compile(transformer.forward, **kwargs)
    bucket = options.text_bucket

    def forward(hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, *args, **kwargs):
        # Pad text to its bucket (masked): prompt lengths then share compiled graphs.
        batch, length, width = encoder_hidden_states.shape
        padded = padded_text_len(length, bucket)
        if padded != length:
            text = encoder_hidden_states.new_zeros(batch, padded, width)
            text[:, :length] = encoder_hidden_states
            mask = torch.zeros(batch, padded, dtype=torch.bool, device=text.device)
            mask[:, :length] = True if encoder_hidden_states_mask is None else encoder_hidden_states_mask.bool()
            encoder_hidden_states, encoder_hidden_states_mask = text, mask
        return compiled(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, *args, **kwargs)

    transformer.forward = forward  # an instance attribute: nn.Module.__call__ runs it, the class is untouched
