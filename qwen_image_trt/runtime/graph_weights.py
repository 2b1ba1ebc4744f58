"""A transformer graph's Linear weights by module name, and their values with a LoRA delta added.

High-precision graphs (export): each Linear's weight is one initializer, `transformer.<module>.weight` ([out, in])
or `.weight.T` ([in, out]), fp32, fp16 or bf16: the merged value is W + delta in fp32, rounded once.

Q/DQ graphs (`qitrt quantize`, compile/qdq.py): the weight is stored quantized as `<module>.weight.quantized`,
INT8 with a per-output-channel scale or FP8 (e4m3) with one scale per tensor (the DequantizeLinear's scale
input), laid out as its MatMul ([in, out]) or Gemm reads it. SmoothQuant (INT8) has moved a per-input-channel
factor into the weight: the activation is multiplied by `<module>.input_quantizer.pre_quant_scale` p before it is
quantized, so the stored weight is W / p (column j divided by p[j]). The merged value is therefore
dequant(W_q) + delta / p, quantized again with a scale recomputed from it (max |w| / 127 per output channel for
INT8, max |w| / 448 over the tensor for FP8, as the writer did); the activation's scale and p are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_image_trt.core.errors import QitrtError

BOUNDS = {"INT8": 127.0, "FLOAT8E4M3FN": 448.0}  # symmetric ranges compile/qdq.py writes
FLOATS = ("FLOAT", "FLOAT16", "BFLOAT16")


@dataclass(frozen=True)
class LinearRef:
    module: str
    weight: str  # initializer holding the weight (float) or its quantized values
    transposed: bool  # stored [in, out]
    scale: str | None = None  # quantized: the DequantizeLinear's scale (per output channel, or per tensor)
    pre_quant_scale: str | None = None  # with SmoothQuant: the per-input-channel activation factor
    qtype: str | None = None  # "INT8" or "FLOAT8E4M3FN"

    @property
    def quantized(self) -> bool:
        return self.scale is not None


class GraphLinears:
    """Where each Linear weight of an exported (or quantized) transformer graph sits; values are read from the
    graph's data file only when asked, one tensor at a time."""

    PREFIX = "transformer."  # the export wrapper's attribute holding QwenImageTransformer2DModel

    def __init__(self, graph_path):
        import onnx_ir as ir

        self.path = Path(graph_path)
        self._model = ir.load(str(self.path))
        self._inits = self._model.graph.initializers

    def locate(self, module: str) -> LinearRef:
        for suffix, transposed in ((".weight.T", True), (".weight", False)):
            name = f"{self.PREFIX}{module}{suffix}"
            if name in self._inits:
                dtype = self._inits[name].dtype
                if dtype is None or dtype.name not in FLOATS:
                    raise QitrtError(f"{self.path.name}: {module}'s weight is {dtype}; run-time LoRA takes fp32, fp16, "
                                     "bf16, INT8 and FP8 graphs (merge the LoRA at build with --lora for the others)")
                return LinearRef(module, name, transposed)
        quantized = f"{module}.weight.quantized"
        if quantized in self._inits:
            return self._locate_quantized(module, quantized)
        raise QitrtError(f"{self.path.name} has no weight for {module} (looked for {self.PREFIX}{module}.weight[.T] "
                         f"and {quantized}); was it exported by this version of qitrt?")

    def _locate_quantized(self, module: str, name: str) -> LinearRef:
        value = self._inits[name]
        qtype = value.dtype.name if value.dtype is not None else "?"
        if qtype not in BOUNDS:
            raise QitrtError(f"{self.path.name}: {module}'s weight is {qtype}; run-time LoRA takes INT8 and FP8 (e4m3) "
                             "Q/DQ weights (merge the LoRA at build with --lora for the others)")
        dq = next((node for node, _ in value.uses() if node.op_type == "DequantizeLinear"), None)
        if dq is None or len(dq.inputs) < 2 or not dq.inputs[1].is_initializer():
            raise QitrtError(f"{self.path.name}: {name} is not dequantized by a DequantizeLinear with a stored scale")
        consumer = next((node for node, index in dq.outputs[0].uses() if index == 1), None)
        if consumer is None or consumer.op_type not in ("MatMul", "Gemm"):
            raise QitrtError(f"{self.path.name}: {name} does not feed a MatMul or Gemm as its weight")
        trans_b = consumer.attributes.get("transB")
        transposed = consumer.op_type == "MatMul" or not (trans_b is not None and trans_b.value == 1)
        pqs = f"{module}.input_quantizer.pre_quant_scale"
        return LinearRef(module, name, transposed=transposed, scale=dq.inputs[1].name,
                         pre_quant_scale=pqs if pqs in self._inits else None, qtype=qtype)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._inits[name].const_value.numpy())

    def merged(self, ref: LinearRef, delta: np.ndarray) -> dict[str, np.ndarray]:
        """{initializer: new value} for `ref`'s weight with `delta` ([out, in], fp32) added."""
        if not ref.quantized:
            base = self.read(ref.weight)
            merged = base.astype(np.float32) + (delta.T if ref.transposed else delta)
            return {ref.weight: np.ascontiguousarray(merged.astype(base.dtype))}
        q, scale = self.read(ref.weight), self.read(ref.scale)
        w = (q.T if ref.transposed else q).astype(np.float32)  # [out, in]
        per_channel = scale.size > 1
        w = w * (scale.astype(np.float32).reshape(-1, 1) if per_channel else float(scale.astype(np.float32)))
        if ref.pre_quant_scale is not None:  # the stored weight is W / p per input channel: so is its delta
            delta = delta / self.read(ref.pre_quant_scale).astype(np.float32).reshape(1, -1)
        w = w + delta
        bound = BOUNDS[ref.qtype]
        amax = np.abs(w).max(axis=1) if per_channel else np.abs(w).max()
        new_scale = np.maximum(amax, 1e-12) / bound
        scaled = w / (new_scale.reshape(-1, 1) if per_channel else new_scale)
        if ref.qtype == "INT8":
            new_q = np.clip(np.rint(scaled), -bound, bound).astype(np.int8)
        else:
            new_q = np.clip(scaled, -bound, bound).astype(q.dtype)  # float8 e4m3 (ml_dtypes), round to nearest
        return {ref.weight: np.ascontiguousarray(new_q.T if ref.transposed else new_q),
                ref.scale: np.asarray(new_scale, dtype=scale.dtype).reshape(scale.shape)}

    @staticmethod
    def restored(ref: LinearRef) -> dict[str, None]:
        """{initializer: None}: back to the graph's own values."""
        return {ref.weight: None, **({ref.scale: None} if ref.quantized else {})}


# numpy dtypes numpy itself lacks (ml_dtypes) -> ONNX element types, for runtimes that take raw bytes + a type
ONNX_ELEMENT_TYPES = {"bfloat16": 16, "float8_e4m3fn": 17}


__all__ = ["GraphLinears", "LinearRef", "ONNX_ELEMENT_TYPES"]
