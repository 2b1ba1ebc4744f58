"""A transformer graph's Linear weights by module name, and their values with a LoRA delta added.

High-precision graphs (export): each Linear's weight is one initializer, `transformer.<module>.weight` ([out, in])
or `.weight.T` ([in, out]), fp32 or fp16: the merged value is W + delta in fp32, rounded once.

INT8 Q/DQ graphs (`qitrt quantize`, compile/qdq.py): the weight is stored quantized as `<module>.weight.quantized`
with a per-output-channel scale `<module>.weight_quantizer.scale` (DequantizeLinear's `axis` says which dimension
is the output), and SmoothQuant has moved a per-input-channel factor into it: the activation is multiplied by
`<module>.input_quantizer.pre_quant_scale` p before it is quantized, so the stored weight is W / p (column j
divided by p[j]). The merged value is therefore dequant(W_q) + delta / p, quantized again with a scale recomputed
from it (max |w| / 127 per output channel, as the writer did); the activation's scale and p are kept. FP8 graphs
are refused (their per-tensor scale would move every channel of the layer; merge at build for those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwen_image_trt.core.errors import QitrtError

INT8_BOUND = 127.0  # symmetric, narrow range: what compile/qdq.py writes


@dataclass(frozen=True)
class LinearRef:
    module: str
    weight: str  # initializer holding the weight (float) or its quantized values (int8)
    transposed: bool  # stored [in, out]
    scale: str | None = None  # int8: per-output-channel scale
    pre_quant_scale: str | None = None  # int8 with SmoothQuant: per-input-channel activation factor

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
                if dtype is None or dtype.name not in ("FLOAT", "FLOAT16"):
                    raise QitrtError(f"{self.path.name}: {module}'s weight is {dtype}; run-time LoRA takes fp32, fp16 "
                                     "and INT8 graphs (merge the LoRA at build with --lora for the others)")
                return LinearRef(module, name, transposed)
        quantized = f"{module}.weight.quantized"
        if quantized in self._inits:
            return self._locate_quantized(module, quantized)
        raise QitrtError(f"{self.path.name} has no weight for {module} (looked for {self.PREFIX}{module}.weight[.T] "
                         f"and {quantized}); was it exported by this version of qitrt?")

    def _locate_quantized(self, module: str, name: str) -> LinearRef:
        value = self._inits[name]
        if value.dtype is None or value.dtype.name != "INT8":
            raise QitrtError(f"{self.path.name}: {module}'s weight is {value.dtype}: run-time LoRA on FP8 graphs would "
                             "rescale the whole layer; merge the LoRA at build with --lora")
        dq = next((node for node, _ in value.uses() if node.op_type == "DequantizeLinear"), None)
        if dq is None or len(dq.inputs) < 2 or not dq.inputs[1].is_initializer():
            raise QitrtError(f"{self.path.name}: {name} is not dequantized by a DequantizeLinear with a stored scale")
        axis = dq.attributes.get("axis")
        axis = 1 if axis is None else int(axis.value)
        pqs = f"{module}.input_quantizer.pre_quant_scale"
        return LinearRef(module, name, transposed=axis == 1, scale=dq.inputs[1].name,
                         pre_quant_scale=pqs if pqs in self._inits else None)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._inits[name].const_value.numpy())

    def merged(self, ref: LinearRef, delta: np.ndarray) -> dict[str, np.ndarray]:
        """{initializer: new value} for `ref`'s weight with `delta` ([out, in], fp32) added."""
        if not ref.quantized:
            base = self.read(ref.weight)
            merged = base.astype(np.float32) + (delta.T if ref.transposed else delta)
            return {ref.weight: np.ascontiguousarray(merged.astype(base.dtype))}
        q, scale = self.read(ref.weight), self.read(ref.scale)
        w = q.T if ref.transposed else q  # [out, in]
        w = w.astype(np.float32) * scale.astype(np.float32).reshape(-1, 1)
        if ref.pre_quant_scale is not None:  # the stored weight is W / p per input channel: so is its delta
            delta = delta / self.read(ref.pre_quant_scale).astype(np.float32).reshape(1, -1)
        w = w + delta
        new_scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / INT8_BOUND
        new_q = np.clip(np.rint(w / new_scale.reshape(-1, 1)), -INT8_BOUND, INT8_BOUND).astype(np.int8)
        return {ref.weight: np.ascontiguousarray(new_q.T if ref.transposed else new_q),
                ref.scale: new_scale.astype(scale.dtype).reshape(scale.shape)}

    @staticmethod
    def restored(ref: LinearRef) -> dict[str, None]:
        """{initializer: None}: back to the graph's own values."""
        return {ref.weight: None, **({ref.scale: None} if ref.quantized else {})}


__all__ = ["GraphLinears", "LinearRef"]
