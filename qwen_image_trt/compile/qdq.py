"""Write a Q/DQ graph from a high-precision ONNX graph and ModelOpt's calibrated quantizers.

ModelOpt decides the numbers (amax per quantizer, SmoothQuant's per-channel smoothing, the smoothed
weights); this module puts exactly those numbers into the exported graph, in the form TensorRT's strongly
typed Q/DQ fusion and ONNX Runtime both take:

    x -> [Mul(pre_quant_scale)] -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- W_q

with W_q the smoothed weight stored quantized (int8 / float8e4m3fn), per output channel (int8) or per
tensor (fp8), in the layout the graph's MatMul (W^T, axis 1) or Gemm (W, axis 0) reads. Every other
tensor of the source graph is copied unchanged, streamed from its data file.

Why not ModelOpt's own ONNX export: it goes through the legacy TorchScript exporter, which holds the
whole model proto (and constant-folded weight copies) in memory - 3-5x the weights - and cannot write
graphs over 2 GB; the real transformer is 41 GB. Here the host holds the quantized weights (1/2 to 1/4
of the model) while the graph is written a tensor at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from qwen_image_trt.compile.onnx_io import linear_weights
from qwen_image_trt.core.errors import QitrtError

log = logging.getLogger(__name__)

BOUNDS = {"int8": 127.0, "fp8": 448.0}  # largest magnitude of int8 and float8 e4m3fn
MIN_AMAX = 1e-12  # a quantizer that saw only zeros still needs a finite, non-zero scale


@dataclass
class QuantizedLinear:
    """One Linear layer as ModelOpt calibrated it, in numbers the graph can hold."""

    name: str  # relative to QwenImageTransformer2DModel, e.g. transformer_blocks.2.attn.to_q
    precision: str  # int8 | fp8
    weight_q: np.ndarray  # [out, in]: int8, or float8 e4m3fn bits as uint8
    weight_scale: np.ndarray  # float32, [out] (per channel) or [] (per tensor)
    input_scale: float
    pre_quant_scale: np.ndarray | None  # float32 [in] (SmoothQuant), or None

    @property
    def nbytes(self) -> int:
        return self.weight_q.nbytes + self.weight_scale.nbytes + (
            self.pre_quant_scale.nbytes if self.pre_quant_scale is not None else 0)


def quantize_weight(fake_quantized: torch.Tensor, amax: torch.Tensor, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored weight, scale) from ModelOpt's own fake-quantized weight: every value lies on the quantization grid
    (level x amax/bound), so dividing by our scale and rounding recovers ModelOpt's level exactly, ties included
    (recomputing the levels ourselves would round an exact .5 the other way whenever the float products differ
    by an ulp). `amax`: [out, 1] for per-channel int8, a scalar per tensor."""
    bound = BOUNDS[precision]
    amax = amax.detach().float().cpu().clamp_min(MIN_AMAX)
    scale = amax / bound
    levels = fake_quantized.detach().float().cpu() / (scale if scale.dim() == 0 else scale.reshape(-1, 1))
    if precision == "int8":
        q = torch.clamp(torch.round(levels), -128, 127).to(torch.int8).numpy()
    else:
        q = levels.clamp(-bound, bound).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return q, scale.reshape(-1).numpy() if scale.numel() > 1 else scale.reshape(()).numpy()


def from_modelopt(module, precision: str, prefix: str = "transformer.") -> tuple[dict[str, QuantizedLinear], list]:
    """Read every Linear's quantizers after `mtq.quantize`: ({name: QuantizedLinear} of enabled ones, kept names)."""
    quantized, kept = {}, []
    for full, m in module.named_modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is None or not isinstance(m, torch.nn.Linear):
            continue
        name = full.removeprefix(prefix)
        if not wq.is_enabled:
            kept.append(name)
            continue
        iq = m.input_quantizer
        if not iq.is_enabled or iq.amax is None or wq.amax is None:
            raise QitrtError(f"{name}: weight quantizer on but input quantizer off or uncalibrated; the recipe "
                             "quantizes weights and activations together (no calibration data reached it?)")
        w_amax = wq.amax if wq.amax.numel() > 1 else wq.amax.reshape(())
        with torch.no_grad():  # in fp32 whatever the module's dtype: see agree_with_modelopt
            weight_q, weight_scale = quantize_weight(wq(m.weight.detach().float()), w_amax, precision)
        pqs = getattr(iq, "pre_quant_scale", None)
        layer = QuantizedLinear(
            name=name, precision=precision, weight_q=weight_q, weight_scale=weight_scale.astype(np.float32),
            input_scale=float(iq.amax.detach().float().max().clamp_min(MIN_AMAX)) / BOUNDS[precision],
            pre_quant_scale=pqs.detach().float().cpu().reshape(-1).numpy() if pqs is not None else None)
        agree_with_modelopt(m, layer)
        quantized[name] = layer
    return quantized, kept


def dequantize(q: np.ndarray, scale: np.ndarray, precision: str, axis: int = 0) -> torch.Tensor:
    """The float values an int8 / fp8 tensor with its scale stands for."""
    t = torch.from_numpy(q)
    t = t.view(torch.float8_e4m3fn).float() if precision == "fp8" else t.float()
    s = torch.from_numpy(np.asarray(scale, dtype=np.float32))
    if s.dim() == 1:
        shape = [1] * t.dim()
        shape[axis] = -1
        s = s.reshape(shape)
    return t * s


@torch.no_grad()
def agree_with_modelopt(linear, layer: QuantizedLinear, probe_rows: int = 64, seed: int = 0) -> None:
    """Our numbers must quantize exactly as ModelOpt's own quantizers do, layer by layer (depth plays no part):
    the stored weight, dequantized, equals `weight_quantizer(weight)`; and on a probe input spanning the
    calibrated range (past it, to see clamping), our smoothing + scale + rounding equals `input_quantizer(x)`.
    A change in ModelOpt's rounding, range or smoothing convention fails here, naming the layer."""
    # In fp32 whatever the module's dtype: ModelOpt's quantizer is a function of its input and amax, and a bf16
    # fake-quant output is itself rounded to bf16 (up to a quarter level off); the stored int8 / fp8 weights are
    # what ModelOpt's quantization gives in exact arithmetic, which fp32 is here.
    w = linear.weight.detach().float()
    want_w = linear.weight_quantizer(w).float().cpu()
    got_w = dequantize(layer.weight_q, layer.weight_scale, layer.precision, axis=0)
    # ModelOpt multiplies by bound/amax where we divide by amax/bound: a value at a rounding tie may land one
    # level apart. A few such elements are expected; a scale or rounding convention of its own shows everywhere.
    step = torch.from_numpy(np.asarray(layer.weight_scale, dtype=np.float32)).reshape(-1, 1)
    if layer.precision == "fp8":  # one e4m3 mantissa step near each value (3 mantissa bits; subnormals below)
        step = torch.maximum(want_w.abs() / 8, step * 2.0**-9)
    levels = (got_w - want_w).abs() / step
    if (levels > 1.01).any() or (levels > 1e-3).float().mean().item() > 1e-3:
        raise QitrtError(f"{layer.name}: the stored quantized weight does not dequantize to ModelOpt's fake-quantized "
                         f"weight ({(levels > 1e-3).float().mean().item():.2%} of values differ, up to "
                         f"{levels.max().item():.2f} levels): weight scale or rounding differs from ModelOpt's")
    g = torch.Generator().manual_seed(seed)
    pqs = torch.from_numpy(layer.pre_quant_scale) if layer.pre_quant_scale is not None else torch.ones(w.shape[1])
    reach = layer.input_scale * BOUNDS[layer.precision] * 1.5  # past amax: clamping/saturation is checked too
    x = (torch.rand(probe_rows, w.shape[1], generator=g) * 2 - 1) * reach / pqs
    x = x.to(device=w.device)
    want_x = linear.input_quantizer(x).float().cpu()
    scaled = x.float().cpu() * pqs
    bound = BOUNDS[layer.precision]
    if layer.precision == "int8":
        ours = torch.clamp(torch.round(scaled / layer.input_scale), -128, 127) * layer.input_scale
    else:
        ours = (scaled / layer.input_scale).clamp(-bound, bound).to(torch.float8_e4m3fn).float() * layer.input_scale
    # Ties can round either way after a float multiply: allow a few elements one step apart, nothing more.
    step = layer.input_scale * (1.0 if layer.precision == "int8" else bound / 8)
    off = (ours - want_x).abs() > 1e-4 * step + 1e-6 * float(want_x.abs().max())
    if off.float().mean().item() > 0.001 or ((ours - want_x).abs() > 1.01 * step).any():
        raise QitrtError(f"{layer.name}: our input quantization (smoothing, scale {layer.input_scale:.4g}, rounding) "
                         f"does not reproduce ModelOpt's input quantizer on a probe ({off.float().mean().item():.2%} "
                         "of values differ)")


def graph_numbers_problems(model, expected: dict[str, dict], prefix: str = "transformer.") -> list[str]:
    """Compare the Q/DQ numbers in a written graph (ONNX IR) with the calibrated ones, layer by layer:
    activation scale, smoothing factors, weight scales, zero points 0, the weight DQ's axis. Exact up to the
    graph's float type. Returns one line per problem (empty: the graph holds exactly what was calibrated)."""
    from qwen_image_trt.compile.onnx_io import linear_weights

    found = linear_weights(model, initializers_only=False)
    problems = []

    def value(v):
        return np.asarray(v.const_value.numpy(), dtype=np.float32) if v is not None and v.const_value is not None \
            else None

    def off(name, what, got, want):
        want = np.asarray(want, dtype=np.float32).reshape(-1)  # per-tensor: 0-d in the graph, 1 value saved
        if got is None or got.size != want.size:
            problems.append(f"{name}: {what} missing or of size {None if got is None else got.size}, "
                            f"calibrated {want.size}")
            return
        got = got.reshape(-1)
        rel = np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30)
        if rel > 1e-2:  # bf16 graphs store scales with 8 mantissa bits; a wrong number is off by far more
            ratio = float(np.median(got / np.where(want == 0, 1, want)))
            problems.append(f"{name}: {what} in the graph is {ratio:.3g}x the calibrated one")

    for name, exp in sorted(expected.items()):
        lw = found.get(prefix + name)
        if lw is None or lw.node.inputs[0] is None or lw.node.inputs[0].producer() is None:
            problems.append(f"{name}: no quantized matrix multiplication in the graph")
            continue
        dq = lw.node.inputs[0].producer()
        w_dq = lw.node.inputs[1].producer() if lw.node.inputs[1] is not None else None
        if dq.op_type != "DequantizeLinear" or w_dq is None or w_dq.op_type != "DequantizeLinear":
            problems.append(f"{name}: activation or weight of its MatMul is not dequantized")
            continue
        q = dq.inputs[0].producer()
        if q is None or q.op_type != "QuantizeLinear":
            problems.append(f"{name}: its activation DequantizeLinear is not fed by a QuantizeLinear")
            continue
        off(name, "activation scale", value(q.inputs[1]), exp["input_scale"])
        off(name, "activation scale (dequantize)", value(dq.inputs[1]), exp["input_scale"])
        off(name, "weight scale", value(w_dq.inputs[1]), exp["weight_scale"])
        for node, what in ((q, "activation"), (w_dq, "weight")):
            zp = value(node.inputs[2]) if len(node.inputs) > 2 else None
            if zp is not None and np.any(zp != 0):
                problems.append(f"{name}: {what} zero point is not 0")
        smooth = q.inputs[0].producer()
        has_mul = smooth is not None and smooth.op_type == "Mul" and value(smooth.inputs[1]) is not None
        if exp.get("pre_quant_scale") is not None:
            if not has_mul:
                problems.append(f"{name}: SmoothQuant's smoothing (Mul by pre_quant_scale) is missing before its "
                                "quantizer")
            else:
                off(name, "smoothing factor (pre_quant_scale)", value(smooth.inputs[1]), exp["pre_quant_scale"])
        axis = w_dq.attributes.get("axis")
        want_axis = 1 if lw.transposed else 0
        if np.asarray(exp["weight_scale"]).size > 1 and (axis.value if axis is not None else 1) != want_axis:
            problems.append(f"{name}: weight scale axis {axis.value if axis is not None else 1}, the stored layout "
                            f"needs {want_axis}")
    return problems


def expected_numbers(layers: dict[str, QuantizedLinear]) -> dict[str, dict]:
    """The calibrated numbers of each layer, in the form `graph_numbers_problems` compares with."""
    return {n: {"input_scale": np.float32(q.input_scale), "weight_scale": q.weight_scale,
                "pre_quant_scale": q.pre_quant_scale} for n, q in layers.items()}


def _const(ir, name: str, array: np.ndarray, dtype=None):
    value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
    return value


def _float_array(array: np.ndarray, dtype) -> tuple[np.ndarray, object]:
    """Scales and smoothing factors in the graph's float type (bf16 graphs get bf16 scales)."""
    import onnx_ir as ir

    if dtype == ir.DataType.BFLOAT16:
        bits = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16)
        return bits.numpy(), ir.DataType.BFLOAT16
    if dtype == ir.DataType.FLOAT16:
        return array.astype(np.float16), ir.DataType.FLOAT16
    return array.astype(np.float32), ir.DataType.FLOAT


def insert_qdq(model, layers: dict[str, QuantizedLinear], float_dtype, prefix: str = "transformer.") -> dict:
    """Rewrite `model` (ONNX IR, from the high-precision export) in place; return counts for the manifest.
    Layers the exporter dropped as dead code are removed from `layers` and listed under "dead_layers"."""
    import onnx_ir as ir

    graph = model.graph
    found = linear_weights(model)
    missing = sorted(name for name in layers if prefix + name not in found)
    # The last block's text-stream output layers feed nothing, and the exporter drops them with their weights:
    # not a mismatch, nothing to quantize. A layer whose weight is in the graph but unmatched is an error.
    weights = set(graph.initializers)
    dead = [n for n in missing if not {f"{prefix}{n}.weight", f"{prefix}{n}.weight.T"} & weights]
    unmatched = [n for n in missing if n not in dead]
    if unmatched:
        raise QitrtError(f"{len(unmatched)} layer(s) the recipe quantizes have no matrix multiplication with a "
                         f"weight in the exported graph (first: {unmatched[0]}): was the graph exported by this "
                         "version of `qitrt export`?")
    for name in dead:
        del layers[name]
    counts = {"quantized_matmuls": 0, "smoothed_inputs": 0, "weights_stored_quantized": 0, "dead_layers": dead}
    for name, q in sorted(layers.items()):
        lw = found[prefix + name]
        node = lw.node
        fp8 = q.precision == "fp8"
        q_dtype = ir.DataType.FLOAT8E4M3FN if fp8 else ir.DataType.INT8
        new_nodes = []
        # activation: [Mul(smoothing)] -> Q -> DQ
        x = node.inputs[0]
        if q.pre_quant_scale is not None:
            arr, dt = _float_array(q.pre_quant_scale, float_dtype)
            smooth = ir.Node("", "Mul", [x, _const(ir, f"{name}.input_quantizer.pre_quant_scale", arr, dt)],
                             name=f"{name}/smooth")
            new_nodes.append(smooth)
            x = smooth.outputs[0]
            counts["smoothed_inputs"] += 1
        arr, dt = _float_array(np.array(q.input_scale, dtype=np.float32), float_dtype)
        a_scale = _const(ir, f"{name}.input_quantizer.scale", arr, dt)
        a_zp = _const(ir, f"{name}.input_quantizer.zero_point", np.zeros((), np.uint8 if fp8 else np.int8), q_dtype)
        quant = ir.Node("", "QuantizeLinear", [x, a_scale, a_zp], name=f"{name}/input_quantize")
        dequant = ir.Node("", "DequantizeLinear", [quant.outputs[0], a_scale, a_zp], name=f"{name}/input_dequantize")
        new_nodes += [quant, dequant]
        # weight: stored quantized, dequantized right into the MatMul/Gemm
        stored = np.ascontiguousarray(q.weight_q.T) if lw.transposed else q.weight_q
        w_q = _const(ir, f"{name}.weight.quantized", stored, q_dtype)
        arr, dt = _float_array(q.weight_scale, float_dtype)
        w_scale = _const(ir, f"{name}.weight_quantizer.scale", arr, dt)
        w_zp = _const(ir, f"{name}.weight_quantizer.zero_point",
                      np.zeros(q.weight_scale.shape, np.uint8 if fp8 else np.int8), q_dtype)
        attrs = [ir.AttrInt64("axis", 1 if lw.transposed else 0)] if q.weight_scale.ndim else []
        w_dq = ir.Node("", "DequantizeLinear", [w_q, w_scale, w_zp], attributes=attrs, name=f"{name}/weight_dequantize")
        new_nodes.append(w_dq)
        old_weight = lw.weight
        graph.insert_before(node, new_nodes)
        node.replace_input_with(0, dequant.outputs[0])
        node.replace_input_with(1, w_dq.outputs[0])
        for v in (w_q, w_scale, w_zp, a_scale, a_zp, *(n.inputs[1] for n in new_nodes if n.op_type == "Mul")):
            graph.register_initializer(v)
        if not old_weight.uses():
            graph.initializers.pop(old_weight.name)
        counts["quantized_matmuls"] += 1
        counts["weights_stored_quantized"] += 1
    counts["quantize_nodes"] = sum(n.op_type == "QuantizeLinear" for n in graph)
    counts["dequantize_nodes"] = sum(n.op_type == "DequantizeLinear" for n in graph)
    return counts


def graph_float_dtype(model):
    """The float type the graph computes in: that of its largest float initializer."""
    import onnx_ir as ir

    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    best = max((v for v in model.graph.initializers.values() if v.const_value is not None
                and v.const_value.dtype in floats), key=lambda v: v.const_value.nbytes, default=None)
    return best.const_value.dtype if best is not None else ir.DataType.FLOAT


__all__ = ["QuantizedLinear", "quantize_weight", "from_modelopt", "insert_qdq", "graph_float_dtype", "BOUNDS",
           "agree_with_modelopt", "graph_numbers_problems", "expected_numbers", "dequantize"]
