"""Peak rates of known GPUs, device detection, and the machine description every result carries.

Peaks are NVIDIA datasheet figures, dense (no 2:4 sparsity), tensor-core rates for bf16/fp16/fp8/int8
(fp8/int8 with the rate the datasheet gives without sparsity; int8 in TOP/s), fp32 without tensor cores, and
memory bandwidth in bytes/s. They are ceilings: well-tuned GEMMs reach ~70-80% of them. On a CPU there is
no table entry: figures say "n/a (CPU)" rather than invent one; `measure_matmul_peak` gives a measured
ceiling on any device when asked.
"""

from __future__ import annotations

import os
import platform
import re
import time
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

CPU_NOTE = "no peak known: CPU"


def lookup_peak(device_name: str | None) -> DevicePeak | None:
    if not device_name:
        return None
    for pattern, key in _NAME_RULES:
        if re.search(pattern, device_name, re.IGNORECASE):
            return PEAKS[key]
    return None


def device_name(device: str = "cpu") -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return platform.processor() or platform.machine() or "cpu"


def peak_for(device: str = "cpu") -> tuple[DevicePeak | None, str]:
    """(peak, note). On CPU or an unknown GPU the peak is None and the note says why."""
    import torch

    if torch.device(device).type != "cuda":
        return None, CPU_NOTE
    name = device_name(device)
    peak = lookup_peak(name)
    return peak, (f"{peak.name}: {peak.source}" if peak else f"no peak known for {name!r}; add it to "
                  "qwen_image_trt.bench.devices.PEAKS or pass --measure-peak")


def roofline_fraction(flops_per_s: float | None, peak: DevicePeak | None, precision: str, device: str = "cpu"):
    """Achieved / peak FLOP/s as a float, or a string saying why there is none."""
    if peak is None:
        return "n/a (CPU)" if not str(device).startswith("cuda") else "n/a (unknown GPU)"
    p = peak.peak_flops(precision)
    if not p or not flops_per_s:
        return f"n/a (no {precision} peak for {peak.name})"
    return flops_per_s / p


def measure_matmul_peak(device: str = "cpu", dtype: str = "fp32", n: int = 4096, repeat: int = 10) -> float:
    """Measured FLOP/s of a square matmul: an achievable ceiling where no datasheet figure applies."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)
    n = n if dev.type == "cuda" else min(n, 1024)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return 2.0 * n**3 * repeat / (time.perf_counter() - t0)


def machine_info(device: str = "cpu") -> dict:
    """Where a result was measured: host, CPU, GPU, memory, library versions."""
    import torch

    from qwen_image_trt.core.identity import tool_versions

    info = {"hostname": platform.node(), "platform": platform.platform(), "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "device": str(device), "versions": tool_versions()}
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
        info["cpu_affinity"] = len(psutil.Process().cpu_affinity()) if hasattr(psutil.Process(), "cpu_affinity") \
            else None
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device) if str(device).startswith("cuda") else 0)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory,
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    peak, note = peak_for(device)
    info["peak"] = {"name": peak.name, "flops": peak.flops, "bytes_per_s": peak.bytes_per_s,
                    "source": peak.source} if peak else None
    info["peak_note"] = note
    return info
