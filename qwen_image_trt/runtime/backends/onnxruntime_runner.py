"""ONNX Runtime runner: CPU here, CUDA or TensorRT execution providers where installed.

On CPU, feeds and outputs cross as zero-copy numpy views. On CUDA, I/O binding points ONNX Runtime at
the torch tensors' memory, so nothing is copied through the host inside the denoising loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.ort_options import session_options
from qwen_image_trt.runtime.backends.base import Runner
from qwen_image_trt.runtime.graph_weights import ONNX_ELEMENT_TYPES

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}
_NP_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bool)": torch.bool,
                "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16}


def resolve_providers(providers, device) -> list[str]:
    import onnxruntime as ort

    if providers is None:
        providers = ["cuda", "cpu"] if torch.device(device).type == "cuda" else ["cpu"]
    names = [PROVIDER_ALIASES.get(p, p) for p in providers]
    available = ort.get_available_providers()
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError("providers", providers, f"execution providers installed here: {', '.join(available)}")
    return names


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, name: str, model_path: str | Path, device="cpu", providers=None, threads: int | None = None,
                 optimized_model_path: str | Path | None = None):
        super().__init__(name, device)
        self.model_path = Path(model_path)
        self.providers = resolve_providers(providers, device)
        self.threads = threads
        self.optimized_model_path = optimized_model_path
        self.session = None
        self._overrides: dict[str, object] = {}  # initializer name -> OrtValue (run-time LoRA)

    @property
    def weights_source(self) -> Path:
        return self.model_path

    def set_weights(self, values: dict) -> None:
        """Override initializers by name (None: back to the graph's value). The session is made again on the next
        run with the overrides in its options: ONNX Runtime never reads the replaced tensors, and nothing is
        re-exported."""
        import onnxruntime as ort

        for name, value in values.items():
            if value is None:
                self._overrides.pop(name, None)
                continue
            value = np.ascontiguousarray(value)
            onnx_type = ONNX_ELEMENT_TYPES.get(value.dtype.name)
            if onnx_type is None:
                self._overrides[name] = ort.OrtValue.ortvalue_from_numpy(value)
            else:  # bf16 / float8 (ml_dtypes arrays): the raw bytes with their ONNX type
                raw = value.view(np.uint16 if value.dtype.itemsize == 2 else np.uint8)
                self._overrides[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_type)
        self.deactivate()

    def _activate_impl(self):
        import onnxruntime as ort

        opts = session_options(overrides=bool(self._overrides))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        # ORT's idle threads spin-wait after each run by default; in a pipeline that alternates ORT with
        # torch (text encoder, scheduler) they steal the cores torch needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self.optimized_model_path:
            opts.optimized_model_filepath = str(self.optimized_model_path)
        for name, value in self._overrides.items():
            opts.add_initializer(name, value)  # the OrtValues outlive the session: this runner holds them
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=self.providers)
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._use_binding = self.device.type == "cuda"

    def _deactivate_impl(self):
        self.session = None

    def _input_metadata_impl(self):
        return {i.name: (i.type, list(i.shape)) for i in self.session.get_inputs()}

    def _infer_impl(self, feeds):
        if self._use_binding:
            return self._infer_bound(feeds)
        arrays = {n: feeds[n].detach().cpu().numpy() for n in self._inputs}
        outs = self.session.run(self._outputs, arrays)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in zip(self._outputs, outs)}

    def _infer_bound(self, feeds):
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        keep = []  # the bound tensors must outlive run_with_iobinding: ORT reads their raw pointers
        for name in self.input_names:
            t = feeds[name].to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", dev_id, _np_dtype(t.dtype), list(t.shape), t.data_ptr())
        for n in self._outputs:
            binding.bind_output(n, "cuda", dev_id)
        # ORT runs on its own stream: let torch's pending writes to the inputs land first.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        # ORT allocated the outputs on the device; hand them to torch via DLPack without a host copy.
        return {n: torch.from_dlpack(v) for n, v in zip(self._outputs, binding.get_outputs())}


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.bool: np.bool_, torch.int64: np.int64,
            torch.int32: np.int32}[dtype]
