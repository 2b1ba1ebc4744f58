"""Eager PyTorch runner over an export wrapper: the reference the other backends are compared with."""

from __future__ import annotations

from typing import Callable

import torch

from qwen_image_trt.runtime.backends.base import Runner


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, name: str, build_module: Callable[[], torch.nn.Module], input_names: list[str],
                 output_names: list[str], device="cpu"):
        super().__init__(name, device)
        self._build_module, self._input_names, self._output_names = build_module, input_names, output_names
        self.module = None

    def _activate_impl(self):
        self.module = self._build_module().to(self.device).eval()

    def _deactivate_impl(self):
        self.module = None

    def _input_metadata_impl(self):
        return {n: ("float32", []) for n in self._input_names}

    @torch.no_grad()
    def _infer_impl(self, feeds):
        out = self.module(*(feeds[n] for n in self._input_names))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self._output_names, outs))
