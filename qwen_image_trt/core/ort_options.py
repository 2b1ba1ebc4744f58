"""ONNX Runtime session options every session of this project starts from."""

from __future__ import annotations

import os

# x86 CPUs without VNNI (AVX2, AVX-512F: e.g. AMD Zen 3, older Xeons) multiply int8 activations by int8 weights with
# a saturating 16-bit intermediate (u8s8 vpmaddubsw): a Q/DQ graph then runs far from its own numbers (measured here:
# 3-8x the quantization error on a Zen 3, none on a VNNI Xeon). This entry makes ONNX Runtime use u8u8 there instead;
# CPUs with VNNI and GPUs are unaffected.
#
# Not with initializer overrides (run-time LoRA on a Q/DQ graph, runtime.lora): in that mode ONNX Runtime 1.32 turns
# the graph's int8 weights to uint8 while optimizing, and weights given with `add_initializer` then run wrong
# (measured: an error of 93% of the adapter's effect instead of 12%); such sessions keep the default kernels
# and, on a CPU without VNNI, their saturation (0.5% of the latents here, under the runtime-LoRA gate).
AVX2_PRECISION = "session.x64quantprecision"


def session_options(overrides: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not overrides and os.environ.get("QITRT_ORT_U8S8") != "1":  # the env var: to measure the default kernels
        opts.add_session_config_entry(AVX2_PRECISION, "1")
    return opts


__all__ = ["session_options", "AVX2_PRECISION"]
