"""The Qwen-Image quantization recipe: which layers are quantized, how, and which stay in high precision.

Defaults follow NVIDIA Model-Optimizer's Qwen-Image recipe and what serving stacks (vLLM-Omni, SGLang) found:
- int8: SmoothQuant (alpha 0.8), per-channel int8 weights, per-tensor int8 activations;
- fp8: E4M3, per-tensor weights and activations, max calibration;
- only the Linear layers inside `transformer_blocks` are quantized. Kept in high precision: every
  embedder (`img_in`, `txt_in`, `txt_norm`, `time_text_embed`), `norm_out`, `proj_out`, and the first 2 and
  last 2 blocks. `keep` adds block sub-modules (e.g. `img_mlp`, the most sensitive one) or any module
  pattern. Norm layers are never quantized.

A recipe is a plain dict (JSON) recorded in the engine manifest; `--recipe FILE` overrides any field.
Patterns are fnmatch patterns over module names of QwenImageTransformer2DModel (`transformer_blocks.3.img_mlp`).
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
from pathlib import Path

from qwen_image_trt.core.errors import InputError

QUANT_PRECISIONS = ("int8", "fp8")
RECIPE_FORMAT = "qwen-image-trt/quant-recipe@1"
HIGH_PRECISION_MODULES = ("img_in", "txt_in", "txt_norm", "time_text_embed", "norm_out", "proj_out")
# Sub-modules of a double-stream block that `keep` may name without a pattern.
BLOCK_PARTS = ("attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "attn.to_q", "attn.to_k", "attn.to_v",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out", "attn.to_add_out")

# Qwen-Image-2.1 (single-stream blocks): the shared `modulation` (one for every block, and the prefix's t = 0 row)
# stays in high precision with the embedders; a block is attention (to_q/k/v, to_out.0) and a SwiGLU MLP.
FAMILY_21 = "qwen-image-2.1"
HIGH_PRECISION_MODULES_21 = ("img_in", "txt_in", "time_text_embed", "modulation", "norm_out", "proj_out")
BLOCK_PARTS_21 = ("attn", "img_mlp", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "img_mlp.proj",
                  "img_mlp.gate_layer", "img_mlp.out")

DEFAULTS = {
    "int8": {"algorithm": "smoothquant", "smoothquant_alpha": 0.8, "weights": "int8 per-channel (axis 0)",
             "activations": "int8 per-tensor"},
    "fp8": {"algorithm": "max", "weights": "fp8 e4m3 per-tensor", "activations": "fp8 e4m3 per-tensor"},
}
ALLOWED_KEYS = {"format", "precision", "algorithm", "smoothquant_alpha", "weights", "activations",
                "keep_modules", "keep_first_blocks", "keep_last_blocks", "keep", "quantize_modulation", "family"}


def _unresolved_default(precision: str, family: str | None = None) -> dict:
    if precision not in QUANT_PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(QUANT_PRECISIONS)} for quantization")
    if family == FAMILY_21:
        return {"format": RECIPE_FORMAT, "family": FAMILY_21, "precision": precision, **DEFAULTS[precision],
                "keep_modules": list(HIGH_PRECISION_MODULES_21), "keep_first_blocks": 2, "keep_last_blocks": 2,
                "keep": []}
    return {"format": RECIPE_FORMAT, "precision": precision, **DEFAULTS[precision],
            "keep_modules": list(HIGH_PRECISION_MODULES), "keep_first_blocks": 2, "keep_last_blocks": 2,
            "keep": [], "quantize_modulation": True}


def _sized(recipe: dict, num_blocks: int) -> dict:
    """2.1: the first and last 2 blocks kept, or num_blocks // 4 each where that is fewer (a small model still
    quantizes its middle blocks)."""
    if recipe.get("family") == FAMILY_21:
        recipe["keep_first_blocks"] = recipe["keep_last_blocks"] = min(2, max(0, num_blocks // 4))
    return recipe


def default_recipe(precision: str, num_blocks: int, keep=(), family: str | None = None) -> dict:
    return resolve_recipe(_sized(_unresolved_default(precision, family), num_blocks), num_blocks, keep=keep)


def load_recipe_file(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError("recipe", str(path), "an existing JSON file")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError("recipe", str(path), f"valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError("recipe", str(path), "a JSON object")
    return data


def make_recipe(precision: str, num_blocks: int, overrides: dict | None = None, keep=(),
                family: str | None = None) -> dict:
    """Default recipe for `precision` (and model family: None for 2509, FAMILY_21), with `overrides` (from --recipe)
    and extra `keep` entries applied. Checked once, after the overrides: a 1-block model may set
    keep_first_blocks=0 over the default 2."""
    recipe = _sized(_unresolved_default(precision, family), num_blocks)
    if overrides:
        unknown = sorted(set(overrides) - ALLOWED_KEYS)
        if unknown:
            raise InputError("recipe", unknown, f"keys among {', '.join(sorted(ALLOWED_KEYS))}")
        if overrides.get("precision", precision) != precision:
            raise InputError("recipe.precision", overrides["precision"], f"{precision} (the --precision asked)")
        if overrides.get("family", family) != family:
            raise InputError("recipe.family", overrides["family"], f"{family or 'none'} (the checkpoint's family)")
        if family == FAMILY_21 and "quantize_modulation" in overrides:
            raise InputError("recipe.quantize_modulation", overrides["quantize_modulation"], "absent for "
                             "Qwen-Image-2.1: its one shared modulation stays in high precision (keep_modules)")
        recipe.update({k: v for k, v in overrides.items() if k != "format"})
    return resolve_recipe(recipe, num_blocks, keep=keep)


def resolve_recipe(recipe: dict, num_blocks: int, keep=()) -> dict:
    """Check the recipe and expand `keep` and block counts into module patterns (`excluded_patterns`)."""
    recipe = copy.deepcopy(recipe)
    recipe["keep"] = sorted(set(recipe.get("keep", [])) | {k.strip() for k in keep if k.strip()})
    first, last = recipe["keep_first_blocks"], recipe["keep_last_blocks"]
    for name, v in (("keep_first_blocks", first), ("keep_last_blocks", last)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= num_blocks:
            raise InputError(f"recipe.{name}", v, f"an integer in [0, {num_blocks}]")
    alpha = recipe.get("smoothquant_alpha")
    if recipe["precision"] == "int8" and recipe["algorithm"] == "smoothquant" and not (
            isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InputError("recipe.smoothquant_alpha", alpha, "a number in [0, 1]")
    if recipe["algorithm"] not in ("smoothquant", "max"):
        raise InputError("recipe.algorithm", recipe["algorithm"], "smoothquant (int8) or max")
    kept_blocks = sorted(set(range(first)) | set(range(num_blocks - last, num_blocks)))
    if recipe.get("family") == FAMILY_21 and len(kept_blocks) == num_blocks:
        raise InputError("recipe.keep_first_blocks/keep_last_blocks", (first, last), f"fewer than the model's "
                         f"{num_blocks} blocks together: as asked, no block would be quantized")
    patterns = []
    for m in recipe["keep_modules"]:
        patterns += [m, f"{m}.*"]
    patterns += [f"transformer_blocks.{i}.*" for i in kept_blocks]
    parts, high = (BLOCK_PARTS_21, HIGH_PRECISION_MODULES_21) if recipe.get("family") == FAMILY_21 else \
        (BLOCK_PARTS, HIGH_PRECISION_MODULES)
    for k in recipe["keep"]:
        if k in parts:
            patterns += [f"transformer_blocks.*.{k}", f"transformer_blocks.*.{k}.*"]
        elif any(ch in k for ch in "*?[") or "." in k or k in high:
            patterns += [k, f"{k}.*"]
        else:
            raise InputError("keep", k, f"a block part ({', '.join(parts)}) or a module name pattern "
                             "such as 'transformer_blocks.3.*'")
    if not recipe.get("quantize_modulation", True):
        patterns += ["transformer_blocks.*.img_mod.*", "transformer_blocks.*.txt_mod.*"]
    recipe["kept_blocks"] = kept_blocks
    recipe["excluded_patterns"] = list(dict.fromkeys(patterns))
    return recipe


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_excluded(module_name: str, recipe: dict) -> bool:
    """module_name relative to QwenImageTransformer2DModel, e.g. 'transformer_blocks.2.img_mlp.net.0.proj'."""
    return any(fnmatch.fnmatchcase(module_name, p) for p in recipe["excluded_patterns"])


def modelopt_config(recipe: dict, prefix: str = "transformer.") -> dict:
    """The ModelOpt quantize config for `recipe`, for a model whose transformer lives under `prefix`."""
    import modelopt.torch.quantization as mtq

    base = mtq.INT8_SMOOTHQUANT_CFG if recipe["precision"] == "int8" else mtq.FP8_DEFAULT_CFG
    cfg = copy.deepcopy(base)
    entries = cfg["quant_cfg"]
    # Only Linear layers: norms (LayerNorm/RMSNorm inputs) stay unquantized.
    for cls in ("nn.LayerNorm",):
        entries.append({"quantizer_name": "*", "parent_class": cls, "enable": False})
    entries.append({"quantizer_name": "*output_quantizer", "enable": False})
    for p in recipe["excluded_patterns"]:
        entries.append({"quantizer_name": f"{prefix}{p}quantizer" if p.endswith(".*") else f"{prefix}{p}.*quantizer",
                        "enable": False})
    if recipe["precision"] == "int8" and recipe["algorithm"] == "smoothquant":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": float(recipe["smoothquant_alpha"])}
    else:
        cfg["algorithm"] = recipe["algorithm"]
    return cfg
