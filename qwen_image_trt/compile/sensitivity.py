"""Quantization by sensitivity (`qitrt sensitivity`): which block parts to keep in high precision, measured.

    qitrt sensitivity CKPT --precision int8|fp8 (--target-cosine 0.999 | --target-psnr 40) [--out DIR]
                      [--calibration CALIB] [--graphs EXPORT]

writes `recipe.json` (taken by `qitrt build --recipe` / `qitrt quantize --recipe` as it is), `sensitivity.json`,
`sensitivity.md` and `sensitivity.png` into `--out DIR`.

Units. A unit is one part of one double-stream block, grouped by what it computes and over which tokens:
`img_attn` (to_q, to_k, to_v, to_out: image tokens), `txt_attn` (add_q/k/v_proj, to_add_out: text tokens),
`img_mlp`, `txt_mlp` (image / text tokens), `img_mod`, `txt_mod` (one row per sample). The attention projections
are split by stream, not kept as one `attn` part, because their costs differ by the ratio of image to text tokens
(4096 against ~100-300 at 1024x1024): keeping the text projections costs a few percent of keeping the image ones,
and one `attn` unit would force both or neither. The six units cover every Linear of a block (recipe.BLOCK_PARTS
are the names they are written with). Layers the exporter dropped as dead code (the last block's text outputs)
belong to no unit: they cost nothing in the graph.

Cost. Each unit's FLOPs per forward of one sample: 2 x tokens x in x out summed over its live Linears, the
weights' shapes read from the graph, the token counts those of the evaluated calls (text padded to the runtime's
bucket, as the engine runs it). `models/flops.py` counts the same layers (tests check the sum). The modulation
Linears run once per sample, so they cost ~0 FLOPs and are kept first whenever they matter, although they hold
a third of a block's weights: FLOPs are the cost asked for here, not weight bytes.

Error. Measured in ONNX Runtime, never estimated from torch: the transformer's noise prediction of a graph against
the high-precision export's (fp32 on a CPU), on the calibration set's held-out calls (the calibration calls if it
has none): the worst call's cosine similarity and PSNR (dB, peak = the reference's range). A target holds when
the worst call reaches it.

One unit at a time. Each unit is measured quantized alone, everything else in high precision (the recipe that
quantizes nothing, plus that unit). The other way round (everything quantized but one unit) measures a unit as
the small difference between two large errors, which interactions and rounding swamp; one-at-a-time measures each
unit's own damage directly, and the combined graph is measured anyway before anything is chosen.

How the graphs are made. Running `qitrt quantize` once per unit (ModelOpt calibration each time) is exact but
costs a calibration per unit: a minute on the tiny model (35 units x ~2 s), ~15 days for the real one (360 units x
the ~1 h quantize stage of docs/real-model.md). ModelOpt computes
each layer's numbers from high-precision activations only (max calibration and SmoothQuant collect statistics
with quantization off, then smooth layer by layer, with no second pass), so a layer's scales, smoothing and
quantized weights do not depend on which other layers are quantized. So: ONE `quantize_onnx` run with every block
Linear quantized (the existing path, its checks included), then a graph that holds both that Q/DQ graph and the
high-precision weights of every quantized layer, written once. Each measured variant is that graph with the Q/DQ
(and SmoothQuant Mul) of the layers to keep removed and their MatMuls pointed back at the high-precision weights:
a graph proto of a few hundred KB next to the shared data file, no weight copied (at real size each measured graph
is still one ONNX Runtime session over the whole model: ~360 per-unit sessions plus ~10-30 for the selection).
This equivalence is not assumed:
the chosen recipe is quantized again through `quantize_onnx` (a fresh ModelOpt calibration, the path
`qitrt build --recipe` runs), measured the same way, and must reach the target (tests compare both graphs).

Selection. Units are ranked by damage per FLOP (damage: 1 - cosine, or 10^(-PSNR/10), the quantities that add up
over small independent errors), most damaging per FLOP first. Units that miss the target even when quantized
alone are kept outright. If no unit reaches the target alone, the target cannot be met while quantizing anything:
refused, naming the range that can be met. Otherwise the kept set is the shortest prefix of the ranking whose
COMBINED graph meets the target in ONNX Runtime: the first probe is where the summed per-unit damages (scaled to the
measured all-quantized graph) say, then a gallop (1, 2, 4, ... units) and a bisection, each step a measured graph.
The prefix is then pruned: each kept unit, largest first, is quantized again if the combined graph still meets the
target (with errors that grow with what is quantized, one pass leaves a set from which no unit can be dropped).
Every combined graph measured is recorded (`trials`) and plotted. The set is locally minimal, not the proven
optimum (that is a knapsack over measured graphs); tests compare it with brute force on hand-made tables.

Re-runs: the all-quantized graph (quantize_onnx skips when unchanged) and the per-unit table (keyed by the graphs'
hashes and the evaluated calls) are reused, so another target costs only the selection.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_image_trt.calibration.capture import CalibrationSet, calibrate, replay_inputs
from qwen_image_trt.compile import onnx_io
from qwen_image_trt.compile.export import export_onnx
from qwen_image_trt.compile.quantize import _require_modelopt, quantize_onnx
from qwen_image_trt.compile.recipe import QUANT_PRECISIONS, RECIPE_FORMAT, is_excluded, make_recipe
from qwen_image_trt.core.errors import InputError, QitrtError
from qwen_image_trt.core.identity import tool_versions
from qwen_image_trt.core.metrics import tensor_metrics
from qwen_image_trt.core.resources import default_device
from qwen_image_trt.core.shapes import DEFAULT_TEXT_BUCKET
from qwen_image_trt.models import checkpoint as ckpt

log = logging.getLogger(__name__)

FORMAT = "qwen-image-trt/sensitivity@1"
PREFIX = "transformer."  # module paths in the exported graph: the wrapper holds the model as `transformer`
# unit -> the block sub-modules (recipe `keep` suffixes) it holds; together every Linear of a double-stream block
UNIT_PARTS = {
    "img_attn": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out"),
    "txt_attn": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    "img_mlp": ("img_mlp",),
    "txt_mlp": ("txt_mlp",),
    "img_mod": ("img_mod",),
    "txt_mod": ("txt_mod",),
}
STREAM = {"img_attn": "image", "txt_attn": "text", "img_mlp": "image", "txt_mlp": "text", "img_mod": "sample",
          "txt_mod": "sample"}
PSNR_CAP_DB = 200.0  # identical outputs: a finite number keeps the JSON strict
DEFAULT_EVAL_CALLS = 8
TARGET_RANGES = {"cosine": (0.0, 1.0), "psnr_db": (0.0, PSNR_CAP_DB)}  # open intervals


# ----------------------------------------------------------------------------------------------- target, metrics
@dataclass(frozen=True)
class Target:
    metric: str  # "cosine" | "psnr_db"
    value: float

    @property
    def flag(self) -> str:
        return "target_cosine" if self.metric == "cosine" else "target_psnr"

    def met(self, metrics: dict) -> bool:
        return bool(metrics.get("finite", True)) and metrics[self.metric] >= self.value

    def damage(self, metrics: dict) -> float:
        """The additive form of the error: 1 - cosine (~ half the relative MSE), or MSE / peak^2 for PSNR."""
        if not metrics.get("finite", True):
            return math.inf
        return max(0.0, 1.0 - metrics["cosine"]) if self.metric == "cosine" else 10 ** (-metrics["psnr_db"] / 10)

    @property
    def damage_limit(self) -> float:
        return 1.0 - self.value if self.metric == "cosine" else 10 ** (-self.value / 10)

    def text(self, metrics: dict | None = None) -> str:
        v = self.value if metrics is None else metrics[self.metric]
        return f"cosine {v:.7f}" if self.metric == "cosine" else f"PSNR {v:.2f} dB"

    def as_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value}


def check_target(target_cosine=None, target_psnr=None) -> Target:
    """Exactly one target, in its range: cosine in (0, 1), PSNR in (0, 200) dB."""
    given = [(f, v) for f, v in (("target_cosine", target_cosine), ("target_psnr", target_psnr)) if v is not None]
    if len(given) != 1:
        raise InputError("target", {f: v for f, v in given} or None,
                         "exactly one of target_cosine (--target-cosine, in (0, 1)) or target_psnr "
                         f"(--target-psnr, dB in (0, {PSNR_CAP_DB:g}))")
    name, value = given[0]
    metric = "cosine" if name == "target_cosine" else "psnr_db"
    lo, hi = TARGET_RANGES[metric]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
        allowed = "a number in (0, 1), e.g. 0.999" if metric == "cosine" else \
            f"a number of dB in (0, {PSNR_CAP_DB:g}), e.g. 40"
        raise InputError(name, value, allowed)
    return Target(metric, float(value))


def forward_metrics(refs, outs) -> dict:
    """Worst-call and mean cosine and PSNR (peak = the reference's range) of `outs` against `refs`."""
    cos, psnr, mse_sum, ref_sum, finite = [], [], 0.0, 0.0, True
    for ref, got in zip(refs, outs):
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        finite &= bool(np.isfinite(got).all())
        cos.append(tensor_metrics(ref, got)["cosine"] if finite else -1.0)
        mse = float(np.mean((got - ref) ** 2)) if finite else math.inf
        peak = float(ref.max() - ref.min())
        psnr.append(PSNR_CAP_DB if mse == 0 else 0.0 if not math.isfinite(mse) else
                    min(PSNR_CAP_DB, 10 * math.log10(max(peak, 1e-30) ** 2 / mse)))
        mse_sum += float(np.sum((got - ref) ** 2)) if finite else math.inf
        ref_sum += float(np.sum(ref ** 2))
    return {"cosine": min(cos), "psnr_db": min(psnr), "cosine_mean": float(np.mean(cos)),
            "psnr_db_mean": float(np.mean(psnr)), "rel_l2": math.sqrt(mse_sum / max(ref_sum, 1e-30)),
            "finite": finite, "calls": len(cos)}


# ---------------------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    kept: list[str]  # unit names kept in high precision
    metrics: dict  # the combined graph's, measured
    order: list[str]  # candidates, most damage per FLOP first
    forced: list[str]  # units that miss the target even when quantized alone
    trials: list[dict] = field(default_factory=list)  # every combined graph measured: kept, flops_kept, metrics


def rank_units(units: list[dict], target: Target) -> list[dict]:
    """Most damage per FLOP first; ties: more damage first, then by name (deterministic)."""
    def key(u):
        d = target.damage(u["metrics"])
        per_flop = d / u["flops"] if u["flops"] > 0 else (math.inf if d > 0 else 0.0)
        return (-per_flop, -d, u["name"])

    return sorted(units, key=key)


def select_units(units: list[dict], target: Target, measure: Callable[[frozenset], dict],
                 progress: Callable[[str], None] | None = None) -> Selection:
    """The kept set with the fewest FLOPs found whose combined graph meets `target`.

    `units`: [{"name", "flops", "metrics"}], metrics measured with only that unit quantized. `measure(kept)`:
    metrics of the graph that keeps the units named in `kept` (a frozenset) and quantizes every other one."""
    by_name = {u["name"]: u for u in units}

    def flops_of(kept) -> float:
        return float(sum(by_name[n]["flops"] for n in kept))

    cache: dict[frozenset, dict] = {}
    trials: list[dict] = []

    def ok(kept: frozenset, why: str) -> bool:
        if kept not in cache:
            if len(kept) == len(units) - 1:  # one unit quantized: its own row is that very graph
                (alone,) = set(by_name) - kept
                cache[kept] = by_name[alone]["metrics"]
            else:
                cache[kept] = measure(kept)
            trials.append({"kept": sorted(kept), "flops_kept": flops_of(kept), "why": why,
                           "meets": target.met(cache[kept]), "metrics": cache[kept]})
            if progress:
                progress(f"{why}: keep {len(kept)} unit(s), {target.text(cache[kept])}")
        return target.met(cache[kept])

    if not units:
        raise QitrtError("no quantized block layer to choose from")
    forced = sorted(u["name"] for u in units if not target.met(u["metrics"]))
    ranked = rank_units(units, target)
    if ok(frozenset(), "everything quantized"):
        return Selection([], cache[frozenset()], [u["name"] for u in ranked], forced, trials)
    if len(forced) == len(units):
        best = max(units, key=lambda u: u["metrics"][target.metric])
        lo, _ = TARGET_RANGES[target.metric]
        raise InputError(target.flag, target.value,
                         f"a value in ({lo:g}, {best['metrics'][target.metric]:.7g}] for this model, precision and "
                         f"calibration set: the least sensitive unit quantized alone ({best['name']}) gives "
                         f"{target.text(best['metrics'])}, every other unit alone less; a higher target leaves "
                         "nothing to quantize")
    candidates = [u for u in ranked if u["name"] not in forced]
    base = frozenset(forced)

    def prefix(k: int) -> frozenset:
        return base | {u["name"] for u in candidates[:k]}

    def label(k: int) -> str:
        return f"{len(base)} missing alone + first {k} ranked kept" if base else f"first {k} ranked kept"

    # prefix(len - 1) quantizes only the last candidate, which meets the target alone (it is not forced): the
    # search is between "nothing but the forced units kept" (lo, failing) and that (hi, meeting).
    lo, hi = 0, len(candidates) - 1
    if hi == 0 or (base and ok(base, "units that miss the target alone kept")):
        kept = base
        ok(kept, "units that miss the target alone kept")  # recorded even when it is the one-unit row
    else:
        # first probe: the shortest prefix whose summed per-unit damage, scaled to the measured all-quantized
        # damage, is within the target's
        damages = [target.damage(u["metrics"]) for u in candidates]
        scale = target.damage(cache[frozenset()]) / max(sum(target.damage(u["metrics"]) for u in units), 1e-300)
        left, k = sum(damages), hi
        for i, d in enumerate(damages):
            if left * scale <= target.damage_limit:
                k = i
                break
            left -= d
        k = min(max(k, lo + 1), hi)
        # from the estimate, gallop (1, 2, 4, ... units) towards the boundary, then bisect what is left
        going_up = not ok(prefix(k), label(k)) if k < hi else False
        lo, hi = (k, hi) if going_up else (lo, k)
        step = 1
        while hi - lo > 1:
            k = lo + step if going_up else hi - step
            if not lo < k < hi:
                break
            if ok(prefix(k), label(k)):
                hi = k
                if going_up:
                    break
            else:
                lo = k
                if not going_up:
                    break
            step *= 2
        while hi - lo > 1:
            k = (lo + hi) // 2
            if ok(prefix(k), label(k)):
                hi = k
            else:
                lo = k
        kept = prefix(hi)
        ok(kept, label(hi))  # recorded even when it is the one-unit row
    for u in sorted((by_name[n_] for n_ in kept - base), key=lambda u: (-u["flops"], u["name"])):
        trial = kept - {u["name"]}
        if ok(trial, f"{u['name']} quantized again"):
            kept = trial
    return Selection(sorted(kept), cache[kept], [u["name"] for u in ranked], forced, trials)


# ------------------------------------------------------------------------------------------------ units and FLOPs
def unit_of(layer: str) -> tuple[int, str] | None:
    """(block, unit) of a layer name relative to the transformer, or None outside the blocks."""
    parts = layer.split(".")
    if len(parts) < 3 or parts[0] != "transformer_blocks" or not parts[1].isdigit():
        return None
    rest = ".".join(parts[2:])
    for unit, subs in UNIT_PARTS.items():
        if any(rest == s or rest.startswith(s + ".") for s in subs):
            return int(parts[1]), unit
    return None


def unit_keep(block: int, unit: str) -> list[str]:
    """The recipe `keep` entries that keep one unit."""
    return [f"transformer_blocks.{block}.{s}" for s in UNIT_PARTS[unit]]


def make_units(layers: list[str], shapes: dict[str, tuple[int, int]], image_tokens: float,
               text_tokens: float) -> list[dict]:
    """Group quantized layers into units with their FLOPs per sample forward and parameter count.
    `shapes`: {layer: (in, out)}."""
    tokens = {"image": image_tokens, "text": text_tokens, "sample": 1.0}
    units: dict[tuple[int, str], dict] = {}
    for layer in sorted(layers):
        where = unit_of(layer)
        if where is None:
            raise QitrtError(f"{layer}: a quantized layer outside the block parts {', '.join(UNIT_PARTS)}")
        block, unit = where
        fi, fo = shapes[layer]
        u = units.setdefault(where, {"name": f"{block}.{unit}", "block": block, "unit": unit, "layers": [],
                                     "flops": 0.0, "params": 0})
        u["layers"].append(layer)
        u["flops"] += 2.0 * tokens[STREAM[unit]] * fi * fo
        u["params"] += fi * fo
    order = list(UNIT_PARTS)
    return [units[k] for k in sorted(units, key=lambda k: (k[0], order.index(k[1])))]


def recipe_for(kept_units: list[dict], all_units: list[dict], precision: str, num_blocks: int) -> dict:
    """A `qitrt build --recipe` file keeping `kept_units`: leading/trailing fully kept blocks as
    keep_first_blocks/keep_last_blocks, other fully kept blocks as `transformer_blocks.N.*`, the rest per unit."""
    kept = {u["name"] for u in kept_units}
    blocks = sorted({u["block"] for u in all_units})
    full = {b for b in blocks if all(u["name"] in kept for u in all_units if u["block"] == b)}
    # blocks with no quantizable unit at all count as kept: nothing in them is quantized either way
    full |= set(range(num_blocks)) - set(blocks)
    first = next((i for i in range(num_blocks) if i not in full), num_blocks)
    last = next((i for i in range(num_blocks) if num_blocks - 1 - i not in full), num_blocks)
    if first + last > num_blocks:
        last = num_blocks - first
    keep = []
    for b in blocks:
        if b < first or b >= num_blocks - last:
            continue
        if b in full:
            keep.append(f"transformer_blocks.{b}.*")
        else:
            keep += [k for u in all_units if u["block"] == b and u["name"] in kept for k in unit_keep(b, u["unit"])]
    return {"format": RECIPE_FORMAT, "precision": precision, "keep_first_blocks": first, "keep_last_blocks": last,
            "keep": keep}


# ------------------------------------------------------------------------------------------------- graph variants
class VariantGraphs:
    """The all-quantized Q/DQ graph and the high-precision weight of each quantized layer, in one folder (one data
    file); `write(quantized)` writes a graph that keeps Q/DQ only on the layers in `quantized`, its MatMuls on the
    others reading the high-precision weights again. The variant is a small proto beside the shared data file.

    Where each layer's nodes sit is read once (ONNX IR, `linear_weights`); a variant is then an edit of the graph
    proto (weights not loaded): the MatMul's inputs pointed back at the activation and the high-precision weight,
    the layer's Mul (SmoothQuant), Q, DQ and weight DQ deleted, initializers nothing reads dropped."""

    GRAPH = "transformer.onnx"
    VARIANT = "variant.onnx"

    def __init__(self, folder: Path, layers: list[str]):
        self.folder, self.layers = Path(folder), list(layers)
        self._base = None
        self._plan: dict[str, dict] = {}

    @staticmethod
    def hp_name(layer: str) -> str:
        return f"{PREFIX}{layer}.weight.high_precision"

    @classmethod
    def build(cls, quantized_graph: Path, source_graph: Path, folder: Path, layers: list[str]) -> VariantGraphs:
        import onnx_ir as ir

        model = onnx_io.load_structure(quantized_graph)
        source = onnx_io.linear_weights(onnx_io.load_structure(source_graph))
        for layer in layers:
            w = source[PREFIX + layer].weight
            v = ir.Value(name=cls.hp_name(layer), shape=w.shape, type=w.type, const_value=w.const_value)
            model.graph.register_initializer(v)
        folder.mkdir(parents=True, exist_ok=True)
        onnx_io.save(model, folder / cls.GRAPH)
        return cls(folder, layers)

    def _load(self) -> None:
        """The base proto (no weights) and, per layer, the positions of its nodes and the names to rewire."""
        import onnx

        if self._base is not None:
            return
        model = onnx_io.load_structure(self.folder / self.GRAPH)
        position = {id(n): i for i, n in enumerate(model.graph)}
        found = onnx_io.linear_weights(model, initializers_only=False)
        for layer in self.layers:
            lw = found.get(PREFIX + layer)
            node = lw.node if lw is not None else None
            dq = node.inputs[0].producer() if node is not None else None
            w_dq = node.inputs[1].producer() if node is not None else None
            q = dq.inputs[0].producer() if dq is not None else None
            if q is None or w_dq is None or (dq.op_type, q.op_type, w_dq.op_type) != (
                    "DequantizeLinear", "QuantizeLinear", "DequantizeLinear"):
                raise QitrtError(f"{layer}: not the Q/DQ pattern qitrt quantize writes, in {self.folder / self.GRAPH}")
            smooth = q.inputs[0].producer()
            smooth = smooth if smooth is not None and smooth.op_type == "Mul" and smooth.name == f"{layer}/smooth" \
                else None
            x = smooth.inputs[0] if smooth is not None else q.inputs[0]
            shape = tuple(int(d) for d in model.graph.initializers[self.hp_name(layer)].shape)
            self._plan[layer] = {
                "matmul": position[id(node)], "x": x.name, "weight": self.hp_name(layer),
                "remove": {position[id(n)] for n in (w_dq, dq, q, smooth) if n is not None},
                # (in, out): MatMul reads W^T [in, out], Gemm W [out, in]
                "shape": shape if lw.transposed else shape[::-1]}
        self._base = onnx.load(str(self.folder / self.GRAPH), load_external_data=False)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """{layer: (in, out)} of each quantized layer's weight."""
        self._load()
        return {layer: self._plan[layer]["shape"] for layer in self.layers}

    def write(self, quantized: set[str] | frozenset, name: str = VARIANT) -> Path:
        import onnx

        self._load()
        model = onnx.ModelProto()
        model.CopyFrom(self._base)
        g = model.graph
        remove: set[int] = set()
        for layer in self.layers:
            if layer in quantized:
                continue
            p = self._plan[layer]
            g.node[p["matmul"]].input[0] = p["x"]
            g.node[p["matmul"]].input[1] = p["weight"]
            remove |= p["remove"]
        for i in sorted(remove, reverse=True):
            del g.node[i]
        used = {i for n in g.node for i in n.input}
        for i in sorted((i for i, t in enumerate(g.initializer) if t.name not in used), reverse=True):
            del g.initializer[i]
        path = self.folder / name
        onnx.save(model, str(path))  # external tensors stay references into this folder's data file
        return path


class Evaluator:
    """Graphs run in ONNX Runtime on fixed calls against the high-precision graph's outputs."""

    def __init__(self, reference_graph: Path, calls: list[tuple], input_names: list[str], provider: str):
        self.provider = provider
        self.feeds = [{n: onnx_io.as_numpy(a) for n, a in zip(input_names, args)} for args in calls]
        self.refs = self.outputs(reference_graph)
        self.runs = 0

    def outputs(self, path: Path) -> list[np.ndarray]:
        sess = onnx_io.ort_session(path, self.provider)
        names = {i.name for i in sess.get_inputs()}
        outs = [sess.run(None, {k: v for k, v in f.items() if k in names})[0] for f in self.feeds]
        del sess
        return outs

    def metrics(self, path: Path) -> dict:
        self.runs += 1
        return forward_metrics(self.refs, self.outputs(path))


# ------------------------------------------------------------------------------------------------------ the stage
@dataclass
class SensitivityResult:
    out: Path
    recipe_path: Path
    report: dict
    paths: dict

    def summary(self) -> str:
        r = self.report
        c = r["chosen"]
        t = Target(**r["inputs"]["target"])
        lines = [(f"sensitivity {r['inputs']['precision']} -> {self.out} ({len(r['units'])} units, "
                 f"{r['evaluations']} graphs run in ONNX Runtime)"),
                 f"  everything quantized: {t.text(r['all_quantized'])}; target {t.text()}",
                 f"  keep {len(c['kept'])} unit(s) in high precision: {', '.join(c['kept']) or 'none'}",
                 (f"  FLOPs kept: {c['flops_kept_fraction']:.1%} of the blocks' quantizable Linear FLOPs; "
                 f"combined graph {t.text(c['metrics'])}")]
        v = r.get("verified")
        if v:
            lines.append(f"  recipe re-quantized with qitrt quantize: {t.text(v['metrics'])} "
                         f"({'meets' if v['meets'] else 'MISSES'} the target)")
        lines += [f"  recipe: {self.recipe_path}", f"  {r['build_command']}"]
        return "\n".join(lines)


def default_out(checkpoint, precision: str) -> Path:
    return Path("runs") / "sensitivity" / f"{Path(checkpoint).resolve().name}-{precision}"


def run_sensitivity(checkpoint, precision: str, *, target_cosine: float | None = None,
                    target_psnr: float | None = None, out_dir=None, calibration=None, graphs=None,
                    num_prompts: int | None = None, steps: int | None = None, seed: int = 0,
                    eval_calls: int | None = DEFAULT_EVAL_CALLS, verify: bool = True, device: str | None = None,
                    force: bool = False, progress: bool = True, command: list | None = None) -> SensitivityResult:
    """Measure each block part's quantization error in ONNX Runtime and write the recipe that keeps the fewest FLOPs
    in high precision for the target (see the module doc). `calibration`: an existing `qitrt calibrate` set (else
    one is recorded into OUT/calibration with `num_prompts`, `steps`, `seed`); `graphs`: an existing high-precision
    `qitrt export` folder (else exported into OUT/onnx in the checkpoint's own precision)."""
    # --- every check before heavy work
    if precision not in QUANT_PRECISIONS:
        raise InputError("precision", precision, f"one of {', '.join(QUANT_PRECISIONS)}")
    target = check_target(target_cosine, target_psnr)
    if eval_calls is not None and (isinstance(eval_calls, bool) or not isinstance(eval_calls, int) or eval_calls < 1):
        raise InputError("eval_calls", eval_calls, "an integer >= 1 (held-out forwards measured per graph)")
    root = ckpt.validate_checkpoint(checkpoint, parts=("transformer", "vae"))
    ckpt.refuse_21(root, "the sensitivity sweep")
    identity = ckpt.checkpoint_identity(root)
    num_blocks = int(ckpt.read_config(root, "transformer")["num_layers"])
    make_recipe(precision, num_blocks, overrides=_all_blocks())  # the recipe that quantizes every block part
    if calibration is not None:
        CalibrationSet(calibration).check_checkpoint(identity)
    else:
        from qwen_image_trt.calibration.capture import make_settings

        make_settings(root, num_prompts, steps, None, seed)
    if graphs is not None:
        _provider(_check_graphs(graphs, identity).precision, graphs)
    else:  # the export this run would make must run in ONNX Runtime here: say so before exporting
        from qwen_image_trt.compile.export import resolve_precision

        _provider(resolve_precision(root, "auto"), f"{root} (exported in its own precision)")
    _require_modelopt()
    device = device or default_device()
    out = Path(out_dir) if out_dir is not None else default_out(root, precision)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    say = (lambda text: print(f"sensitivity: {text}", file=sys.stderr, flush=True)) if progress else (lambda _: None)

    # --- high-precision graph and calibration set (reused when given)
    if graphs is None:
        graphs = out / "onnx"
        say(f"export -> {graphs}")
        export_onnx(root, graphs, precision="auto", force=force, progress=progress)
    source = _check_graphs(graphs, identity)
    provider = _provider(source.precision, graphs)
    if calibration is None:
        calibration = out / "calibration"
        say(f"calibrate -> {calibration}")
        calibrate(root, calibration, num_prompts=num_prompts, steps=steps, seed=seed, device=device, force=force,
                  progress=progress)
    calib = CalibrationSet(calibration)
    calib.check_checkpoint(identity)

    # --- every block Linear quantized once, through the stage `qitrt quantize` runs
    say("quantize every block part once (ModelOpt calibration, Q/DQ graph, its checks)")
    qm = quantize_onnx(root, calibration, work / "quantized", precision, graphs=graphs, recipe=_all_blocks(),
                       device=device, force=force, progress=progress)
    layers = list(qm.quantization.quantized_layers)
    dead = sorted(set(qm.components["transformer"].qdq.get("dead_layers", [])))
    qgraph = qm.components["transformer"].graph

    # --- the evaluated calls and the reference outputs
    axes = ckpt.read_config(root, "transformer")["axes_dims_rope"]
    split = "holdout" if calib.num_calls("holdout") else "calib"
    chosen_calls = _spread(calib.num_calls(split), eval_calls)
    calls = [replay_inputs(c, axes, DEFAULT_TEXT_BUCKET) for i, c in enumerate(calib.calls(split)) if i in chosen_calls]
    from qwen_image_trt.models.transformer_export import INPUT_NAMES

    evaluator = Evaluator(source.graph.path(graphs), calls, INPUT_NAMES, provider)
    image_tokens = float(np.mean([a[0].shape[1] for a in calls]))
    text_tokens = float(np.mean([a[1].shape[1] for a in calls]))

    # --- the variant graphs, the per-unit table
    key = {"quantized_graph": qgraph.sha256, "quantized_data": qgraph.external_data_sha256,
           "reference_graph": source.graph.sha256, "reference_data": source.graph.external_data_sha256,
           "calibration": calib.set_id, "split": split, "calls": sorted(chosen_calls), "provider": provider,
           "format": FORMAT,
           "onnxruntime": tool_versions().get("onnxruntime")}
    cache_path = work / "units.json"
    cached = _read_json(cache_path)
    variants = VariantGraphs(work / "variants", layers)
    if force or cached is None or cached.get("key") != key or not (variants.folder / VariantGraphs.GRAPH).is_file():
        say(f"graph with the high-precision weights beside the quantized ones -> {variants.folder}")
        variants = VariantGraphs.build(qgraph.path(work / "quantized"), source.graph.path(graphs), variants.folder,
                                       layers)
        units = make_units(layers, variants.shapes(), image_tokens, text_tokens)
        from tqdm.auto import tqdm

        for u in tqdm(units, desc=f"sensitivity {precision} (one unit quantized)", unit="unit",
                      disable=not progress):
            u["metrics"] = evaluator.metrics(variants.write(set(u["layers"])))
        cache_path.write_text(json.dumps({"key": key, "units": units}, indent=1))
    else:
        say(f"per-unit table unchanged, reused ({cache_path})")
        units = cached["units"]

    # --- selection, verified in ONNX Runtime on combined graphs
    layers_of = {u["name"]: set(u["layers"]) for u in units}

    def measure(kept: frozenset) -> dict:
        quantized = set().union(*(layers_of[n] for n in layers_of if n not in kept))
        return evaluator.metrics(variants.write(quantized))

    selection = select_units(units, target, measure, progress=say)
    by_name = {u["name"]: u for u in units}
    kept_units = [by_name[n] for n in selection.kept]
    recipe = recipe_for(kept_units, units, precision, num_blocks)
    resolved = make_recipe(precision, num_blocks, overrides=recipe)  # what `qitrt build --recipe` will take
    wrong = [layer for u in units for layer in u["layers"]
             if is_excluded(layer, resolved) != (u["name"] in selection.kept)]
    if wrong:
        raise QitrtError(f"internal: the written recipe does not keep exactly the chosen units ({wrong[0]})")
    recipe_path = out / "recipe.json"
    recipe_path.write_text(json.dumps(recipe, indent=2) + "\n")

    # --- the recipe through the real quantize path, measured the same way
    verified = None
    if verify:
        say("re-quantize with the written recipe (qitrt quantize --recipe) and measure it")
        vm = quantize_onnx(root, calibration, work / "verified", precision, graphs=graphs,
                           recipe=json.loads(recipe_path.read_text()), device=device, force=force, progress=progress)
        vmetrics = evaluator.metrics(vm.components["transformer"].graph.path(work / "verified"))
        verified = {"folder": str(work / "verified"), "quantized_layers": len(vm.quantization.quantized_layers),
                    "metrics": vmetrics, "meets": target.met(vmetrics)}

    total_flops = float(sum(u["flops"] for u in units))
    ranks = {n: i + 1 for i, n in enumerate(selection.order)}
    rows = []
    for u in units:
        d = target.damage(u["metrics"])
        rows.append({**u, "damage": d, "damage_per_gflop": d / (u["flops"] / 1e9) if u["flops"] else None,
                     "flops_fraction": u["flops"] / total_flops,
                     "rank": ranks[u["name"]], "forced": u["name"] in selection.forced,
                     "kept": u["name"] in selection.kept})
    flops_kept = float(sum(u["flops"] for u in kept_units))
    report = {
        "format": FORMAT,
        "inputs": {
            "checkpoint": {"path": str(root.resolve()), "identity": identity},
            "calibration": {"folder": str(Path(calibration).resolve()), "set_id": calib.set_id, "split": split,
                            "calls": len(calls)},
            "graphs": {"folder": str(Path(graphs).resolve()), "precision": source.precision,
                       "transformer_sha256": source.graph.sha256},
            "precision": precision, "target": target.as_dict(), "seed": seed, "provider": provider,
            "flops_per_sample": {"image_tokens": image_tokens, "text_tokens": text_tokens},
        },
        "all_quantized": selection.trials[0]["metrics"] if selection.trials else None,
        "units": rows,
        "dead_layers": dead,
        "quantizable_flops": total_flops,
        "chosen": {"kept": selection.kept, "forced": selection.forced, "flops_kept": flops_kept,
                   "flops_kept_fraction": flops_kept / total_flops, "metrics": selection.metrics,
                   "meets": target.met(selection.metrics)},
        "trials": selection.trials,
        "verified": verified,
        "recipe": recipe,
        "evaluations": evaluator.runs,
        "build_command": f"qitrt build {root} --precision {precision} --recipe {recipe_path} "
                         f"--calibration {Path(calibration)} --out engines/{root.name}-{precision}-sensitivity",
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": tool_versions(),
        "command": command,
    }
    paths = {"recipe": recipe_path, "json": out / "sensitivity.json", "md": out / "sensitivity.md"}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["md"].write_text(markdown(report))
    png = plot(report, out / "sensitivity.png")
    if png is not None:
        paths["png"] = png
    if verified is not None and not verified["meets"]:
        raise QitrtError(f"the recipe re-quantized by qitrt quantize gives {target.text(verified['metrics'])}, short "
                         f"of the target {target.text()} that the derived graph met ({target.text(selection.metrics)})"
                         ": the graphs derived from the all-quantized one do not stand for this recipe's build. "
                         f"Report: {paths['json']}")
    return SensitivityResult(out, recipe_path, report, paths)


def _spread(n: int, k: int | None) -> set[int]:
    """k of n call indices spread evenly over the set (steps early and late, several prompts), all when k >= n."""
    if k is None or k >= n:
        return set(range(n))
    return {round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}


def _all_blocks() -> dict:
    return {"keep_first_blocks": 0, "keep_last_blocks": 0, "keep": [], "quantize_modulation": True}


def _check_graphs(graphs, identity: str):
    """The high-precision transformer of a `qitrt export` folder of this checkpoint (checks as quantize does)."""
    from qwen_image_trt.compile.quantize import _source_graph

    return _source_graph(graphs, identity)[1]


def _provider(high_precision: str, where) -> str:
    import onnxruntime as ort

    gpu = "CUDAExecutionProvider" in ort.get_available_providers() and default_device().startswith("cuda")
    if high_precision == "bf16" and not gpu:
        raise InputError("graphs", str(where), "an fp32 or fp16 export on a machine without ONNX Runtime's CUDA "
                         "provider (its CPU provider has no bf16 kernels): `qitrt export CKPT --precision fp32 --out "
                         "E` and pass --graphs E, or run on a GPU")
    return "CUDAExecutionProvider" if gpu else "CPUExecutionProvider"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- reporting
def _fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if f >= scale:
            return f"{f / scale:.3g} {unit}"
    return f"{f:.3g} FLOP"


def markdown(report: dict) -> str:
    i = report["inputs"]
    t = Target(**i["target"])
    c = report["chosen"]
    lines = [f"# Quantization by sensitivity: {i['precision']}, target {t.text()}", "",
             (f"Checkpoint `{i['checkpoint']['identity']}`, calibration set `{i['calibration']['set_id']}` "
             f"({i['calibration']['calls']} {i['calibration']['split']} calls), high-precision graph "
             f"{i['graphs']['precision']}, ONNX Runtime {i['provider']}. FLOPs per forward of one sample at "
             f"{i['flops_per_sample']['image_tokens']:g} image + {i['flops_per_sample']['text_tokens']:g} text "
             "tokens."),
             "", f"- everything quantized: {t.text(report['all_quantized'])}",
             (f"- kept in high precision: {', '.join(c['kept']) or 'none'} "
             f"({_fmt_flops(c['flops_kept'])}, {c['flops_kept_fraction']:.1%} of the quantizable FLOPs)"),
             (f"- combined graph (derived from the all-quantized one): worst-call cosine "
              f"{c['metrics']['cosine']:.7f}, PSNR {c['metrics']['psnr_db']:.2f} dB")]
    v = report.get("verified")
    if v:
        lines.append(f"- recipe re-quantized by `qitrt quantize`: cosine {v['metrics']['cosine']:.7f}, PSNR "
                     f"{v['metrics']['psnr_db']:.2f} dB ({'meets' if v['meets'] else 'misses'} the target)")
    lines += [f"- recipe: `{json.dumps(report['recipe'])}`", "",
              "Each unit quantized alone, everything else in high precision (worst call):", "",
              "| rank | unit | layers | FLOPs | share | cosine | PSNR dB | damage / GFLOP | kept |",
              "|---:|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for u in sorted(report["units"], key=lambda u: u["rank"]):
        m = u["metrics"]
        dpf = f"{u['damage_per_gflop']:.3g}" if u["damage_per_gflop"] is not None else "-"
        kept = "forced" if u["forced"] else ("yes" if u["kept"] else "")
        lines.append(f"| {u['rank']} | {u['name']} | {len(u['layers'])} | {_fmt_flops(u['flops'])} | "
                     f"{u['flops_fraction']:.1%} | {m['cosine']:.7f} | {m['psnr_db']:.2f} | {dpf} | {kept} |")
    lines += ["", "Combined graphs measured during the selection:", "",
              "| kept units | FLOPs kept | cosine | PSNR dB | meets | why |", "|---:|---:|---:|---:|:---:|---|"]
    total = report["quantizable_flops"]
    for tr in report["trials"]:
        m = tr["metrics"]
        lines.append(f"| {len(tr['kept'])} | {tr['flops_kept'] / total:.1%} | {m['cosine']:.7f} | "
                     f"{m['psnr_db']:.2f} | {'yes' if tr['meets'] else 'no'} | {tr['why']} |")
    if report["dead_layers"]:
        lines += ["", f"Not in any unit (dropped by the exporter as dead code): {', '.join(report['dead_layers'])}."]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path | None:
    """Error against FLOPs kept in high precision: the ranked prefixes' summed per-unit damage (estimate), every
    combined graph measured, the target, the chosen point."""
    try:
        import matplotlib
    except ImportError:
        log.warning("sensitivity: matplotlib is not installed; no plot (pip install 'qwen-image-trt[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = Target(**report["inputs"]["target"])
    total = report["quantizable_flops"]
    # the selection's order: units missing the target alone first, then by damage per FLOP
    units = sorted(report["units"], key=lambda u: (not u["forced"], u["rank"]))
    damages = [u["damage"] for u in units]
    scale = t.damage(report["all_quantized"]) / max(sum(damages), 1e-300)
    xs, ys, kept, left = [0.0], [sum(damages) * scale], 0.0, sum(damages)
    for u, d in zip(units[:-1], damages[:-1]):  # the last prefix keeps everything: no error, off the scale
        kept += u["flops"]
        left -= d
        xs.append(100 * kept / total)
        ys.append(max(left, 0.0) * scale)
    val = (lambda m: max(1 - m["cosine"], 1e-12)) if t.metric == "cosine" else (lambda m: m["psnr_db"])

    def shown(damage: float) -> float:  # the estimate on the plot's own scale
        if t.metric == "cosine":
            return max(damage, 1e-12)
        return PSNR_CAP_DB if damage <= 0 else min(PSNR_CAP_DB, -10 * math.log10(damage))

    tr = report["trials"]
    c = report["chosen"]
    limit = 1 - t.value if t.metric == "cosine" else t.value
    measured = [val(x["metrics"]) for x in tr] + [limit]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(xs, [shown(y) for y in ys], "-", color="0.6", lw=1,
            label="ranked prefixes: summed per-unit damage (estimate)")
    ax.scatter([100 * x["flops_kept"] / total for x in tr], [val(x["metrics"]) for x in tr],
               c=["tab:green" if x["meets"] else "tab:red" for x in tr], s=28, zorder=3,
               label="combined graphs measured in ONNX Runtime (green: meets)")
    ax.scatter([100 * c["flops_kept_fraction"]], [val(c["metrics"])], marker="*", s=260, facecolor="gold",
               edgecolor="black", zorder=4, label=f"chosen: {len(c['kept'])} unit(s) kept, "
               f"{100 * c['flops_kept_fraction']:.1f}% of the FLOPs")
    ax.axhline(limit, color="tab:blue", ls="--", lw=1, label=f"target {t.text()}")
    if t.metric == "cosine":
        ax.set_yscale("log")
        ax.set_ylim(min(measured) / 30, max(measured) * 3)
    else:
        ax.set_ylim(min(measured) - 5, max(measured) + 15)
    ax.set_xlabel("FLOPs kept in high precision (% of the blocks' quantizable Linear FLOPs)")
    if t.metric == "cosine":
        ax.set_ylabel("1 - cosine (worst held-out call)")
    else:
        ax.set_ylabel("PSNR dB (worst held-out call)")
    i = report["inputs"]
    ax.set_title(f"{i['precision']} sensitivity, {Path(i['checkpoint']['path']).name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = [
    "UNIT_PARTS",
    "Selection",
    "Target",
    "VariantGraphs",
    "check_target",
    "forward_metrics",
    "make_units",
    "rank_units",
    "recipe_for",
    "run_sensitivity",
    "select_units",
    "unit_keep",
    "unit_of",
]
