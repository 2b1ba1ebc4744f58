"""Datasheet peak rates of known GPUs: what benchmarks set their figures beside, and what the build plan
divides FLOPs by. Dense (no 2:4 sparsity) tensor-core rates for bf16/fp16/fp8/int8, fp32 without tensor
cores, memory bandwidth in bytes/s. Ceilings: well-tuned GEMMs reach ~70-80% of them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

T = 1e12


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: dict = field(default_factory=dict)  # precision -> FLOP/s
    bytes_per_s: float | None = None
    source: str = "NVIDIA datasheet, dense"

    def peak_flops(self, precision: str) -> float | None:
        return self.flops.get(PRECISION_PEAK_KEY.get(precision, precision))


# graph precision -> which peak bounds it (fp16 runs at the bf16 tensor rate on every GPU here)
PRECISION_PEAK_KEY = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "bf16", "fp8": "fp8", "int8": "int8"}

PEAKS = {
    "H100 SXM": DevicePeak("H100 SXM", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp8": 1978.9 * T,
                                        "int8": 1978.9 * T}, 3.35e12),
    "H100 PCIe": DevicePeak("H100 PCIe", {"fp32": 51.2 * T, "tf32": 378.0 * T, "bf16": 756.0 * T, "fp8": 1513.0 * T,
                                          "int8": 1513.0 * T}, 2.0e12),
    "H100 NVL": DevicePeak("H100 NVL", {"fp32": 60.0 * T, "tf32": 417.5 * T, "bf16": 835.5 * T, "fp8": 1670.5 * T,
                                        "int8": 1670.5 * T}, 3.9e12),
    "H200": DevicePeak("H200", {"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp8": 1978.9 * T,
                                "int8": 1978.9 * T}, 4.8e12),
    "A100 SXM 80GB": DevicePeak("A100 SXM 80GB", {"fp32": 19.5 * T, "tf32": 156.0 * T, "bf16": 312.0 * T,
                                                  "int8": 624.0 * T}, 2.039e12),
    "A100 PCIe 80GB": DevicePeak("A100 PCIe 80GB", {"fp32": 19.5 * T, "tf32": 156.0 * T, "bf16": 312.0 * T,
                                                    "int8": 624.0 * T}, 1.935e12),
    "A100 40GB": DevicePeak("A100 40GB", {"fp32": 19.5 * T, "tf32": 156.0 * T, "bf16": 312.0 * T,
                                          "int8": 624.0 * T}, 1.555e12),
    "L40S": DevicePeak("L40S", {"fp32": 91.6 * T, "tf32": 183.0 * T, "bf16": 362.05 * T, "fp8": 733.0 * T,
                                "int8": 733.0 * T}, 0.864e12),
    # GeForce: tensor rates with fp32 accumulation (what bf16 GEMMs use), from the Ada whitepaper
    "RTX 4090": DevicePeak("RTX 4090", {"fp32": 82.6 * T, "tf32": 82.6 * T, "bf16": 165.2 * T, "fp8": 330.3 * T,
                                        "int8": 660.6 * T}, 1.008e12, "NVIDIA Ada whitepaper, dense, fp32 accumulate"),
}

# torch.cuda.get_device_name() -> table key; first match wins (more specific patterns first)
_NAME_RULES = [
    (r"H200", "H200"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H100.*PCIe", "H100 PCIe"),
    (r"H100", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"A100.*SXM.*80", "A100 SXM 80GB"),
    (r"A100.*80GB.*PCIe|A100.*PCIe.*80", "A100 PCIe 80GB"),
    (r"A100", "A100 40GB"),
    (r"L40S", "L40S"),
    (r"RTX 4090", "RTX 4090"),
]

def lookup_peak(device_name: str | None) -> DevicePeak | None:
    if not device_name:
        return None
    for pattern, key in _NAME_RULES:
        if re.search(pattern, device_name, re.IGNORECASE):
            return PEAKS[key]
    return None


__all__ = ["DevicePeak", "PEAKS", "PRECISION_PEAK_KEY", "lookup_peak"]
