"""Evidence that a quantized graph is quantized as the recipe says, in numbers that can fail.

On random weights the transformer blocks add little to the output (a few percent at real width), so a
quantized graph's closeness to fp32 says almost nothing: a graph with wrong scales, or no quantization at
all, stays close too. Two comparisons that do see such bugs, on held-out calibration calls:

- agreement with ModelOpt's fake-quantized torch model (`fake_quant`), which simulates the same
  quantizers: `mismatch` = ||graph - fake_quant|| / ||fake_quant - high_precision||, the graph's departure
  from the simulation measured in units of the quantization error itself (0 = the same quantization;
  a broken scale or layout gives >> 1);
- error against high precision relative to what the quantized blocks contribute: `block_rel_err` =
  ||graph - high_precision|| / ||high_precision - bypassed||, where `bypassed` skips every block that
  holds a quantized layer.

The inputs and the three reference outputs are saved beside the graph (EVIDENCE_FILE, named in the
manifest), so `qitrt parity` recomputes both figures for any backend that runs the graph. (In core/: the
quantize stage writes this file and parity reads it; neither reaches into the other.)
"""

from __future__ import annotations

import re
from pathlib import Path

from qwen_image_trt.core.metrics import l2, tensor_metrics

EVIDENCE_FILE = "quantization_evidence.safetensors"
CHECK_CALLS = 4  # held-out forwards
# Measured (docs/quantization.md): a correct int8 graph departs from the fake-quantized model by 0.06 of the
# quantization error on the tiny model and 0.24 / 0.26 / 0.32 at real width with 1 / 2 / 4 blocks: ONNX
# Runtime and torch compute each quantizer's input with different float rounding, so values at bin edges
# round to neighbouring levels, more of them the deeper the graph. fp8: 0.0002 (tiny). Broken scales give
# 1.2 and more. This end-to-end bound is the coarse guard; the exact, depth-independent check is the
# per-layer comparison of the graph's numbers with the calibrated ones (compile/qdq.py).
MISMATCH_MAX = {"int8": 0.75, "fp8": 0.25}


# Qwen-Image-2.1 quantizes two graphs that run in turn (compile.quantize21): an evidence call is the first denoising
# step end to end, the extract graph's inputs (models.transformer21_export.EXTRACT_INPUTS) then the cached graph's
# others; the extract graph's K/V go into the cached graph.
EXTRACT_INPUTS_21 = ("encoder_hidden_states", "hidden_states", "prefix_index", "prefix_block_ids", "prefix_key_valid",
                     "prefix_rope_cos", "prefix_rope_sin")
E2E_INPUTS_21 = [*EXTRACT_INPUTS_21, "latents", "latents_rope_cos", "latents_rope_sin", "timestep"]


def run_end_to_end_21(run_extract, run_cached, feeds: dict):
    """The first step on the two 2.1 graphs' runners (callables {name: tensor} -> tensor): extract, then cached."""
    kv = run_extract({n: feeds[n] for n in EXTRACT_INPUTS_21})
    return run_cached({"latents": feeds["latents"], "prefix_kv": kv, "prefix_key_valid": feeds["prefix_key_valid"],
                       "latents_rope_cos": feeds["latents_rope_cos"], "latents_rope_sin": feeds["latents_rope_sin"],
                       "timestep": feeds["timestep"]})


def quantized_blocks(layer_names) -> list[int]:
    blocks = {int(m.group(1)) for n in layer_names if (m := re.match(r"transformer_blocks\.(\d+)\.", n))}
    return sorted(blocks)


def reference_outputs(module, inputs: list[tuple], skip_blocks=()) -> list:
    """Outputs of the (ExportableTransformer) module on `inputs`, optionally with some blocks bypassed."""
    import torch

    device = next(module.parameters()).device
    old = module.skip_blocks
    module.skip_blocks = frozenset(skip_blocks)
    try:
        with torch.no_grad():
            return [module(*(a.to(device) for a in args)).float().cpu() for args in inputs]
    finally:
        module.skip_blocks = old


def save(folder: Path, inputs: list[tuple], high_precision, fake_quant, bypassed, input_names,
         numbers: dict[str, dict] | None = None) -> Path:
    """Inputs and reference outputs of the held-out calls, and the calibrated numbers of every quantized layer
    ({layer: {"input_scale", "weight_scale", "pre_quant_scale"}}) the written graph must hold."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for layer, values in (numbers or {}).items():
        for key, v in values.items():
            if v is not None:
                tensors[f"numbers.{layer}.{key}"] = torch.from_numpy(np.array(v, dtype=np.float32, ndmin=1))
    for i, args in enumerate(inputs):
        for name, a in zip(input_names, args):
            tensors[f"{i}.input.{name}"] = a.clone().contiguous()  # RoPE tables are shared between calls
        tensors[f"{i}.high_precision"] = high_precision[i].contiguous()
        tensors[f"{i}.fake_quant"] = fake_quant[i].contiguous()
        tensors[f"{i}.bypassed"] = bypassed[i].contiguous()
    path = Path(folder) / EVIDENCE_FILE
    save_file(tensors, str(path))
    return path


def load(path: Path, input_names) -> list[dict]:
    """[{"inputs": {name: tensor}, "high_precision", "fake_quant", "bypassed"}] per saved call."""
    from safetensors.torch import load_file

    t = {k: v for k, v in load_file(str(path)).items() if not k.startswith("numbers.")}
    n = 1 + max(int(k.split(".", 1)[0]) for k in t)
    return [{"inputs": {name: t[f"{i}.input.{name}"] for name in input_names},
             **{k: t[f"{i}.{k}"] for k in ("high_precision", "fake_quant", "bypassed")}} for i in range(n)]


def load_numbers(path: Path) -> dict[str, dict]:
    """{layer: {"input_scale", "weight_scale", "pre_quant_scale" (None if absent)}} as saved."""
    from safetensors.torch import load_file

    out: dict[str, dict] = {}
    for key, v in load_file(str(path)).items():
        if key.startswith("numbers."):
            layer, name = key.removeprefix("numbers.").rsplit(".", 1)
            arr = v.numpy()
            out.setdefault(layer, {"pre_quant_scale": None})[name] = arr.reshape(()) if name == "input_scale" else arr
    return out


def compare(outputs, calls: list[dict]) -> dict:
    """Both figures (worst over calls) for a backend's `outputs` of the saved calls."""
    import torch

    rows = []
    for got, c in zip(outputs, calls):
        got = torch.as_tensor(got).float()
        hp, fq, by = c["high_precision"], c["fake_quant"], c["bypassed"]
        rows.append({
            "mismatch": l2(got, fq) / max(l2(fq, hp), 1e-30),
            "block_rel_err": l2(got, hp) / max(l2(hp, by), 1e-30),
            "fake_quant_block_rel_err": l2(fq, hp) / max(l2(hp, by), 1e-30),
            "block_contribution": l2(hp, by) / max(l2(hp), 1e-30),
            "cosine_vs_fake_quant": tensor_metrics(fq, got)["cosine"],
            "cosine_vs_high_precision": tensor_metrics(hp, got)["cosine"],
            "finite": bool(torch.isfinite(got).all()),
        })
    worst = {k: (min if k.startswith("cosine") else max)(r[k] for r in rows)
             for k in rows[0] if k != "finite"}
    worst["finite"] = all(r["finite"] for r in rows)
    worst["calls"] = len(rows)
    return worst


def verdict(figures: dict, precision: str) -> str | None:
    """None when the graph is the quantization ModelOpt simulated; else what is wrong, in words."""
    mismatch_max = MISMATCH_MAX[precision]
    if not figures.get("finite", True):
        return "the quantized graph's output has non-finite values"
    if figures["mismatch"] > mismatch_max:
        return (f"the quantized graph disagrees with ModelOpt's fake-quantized model by {figures['mismatch']:.2f}x "
                f"the quantization error itself (allowed {mismatch_max}): a Q/DQ scale, zero point, smoothing "
                "factor or weight layout in the graph is not the one ModelOpt calibrated")
    return None


__all__ = ["EVIDENCE_FILE", "CHECK_CALLS", "MISMATCH_MAX", "E2E_INPUTS_21", "EXTRACT_INPUTS_21", "run_end_to_end_21", "reference_outputs", "save", "load", "compare", "verdict",
           "quantized_blocks"]
