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
import time

from qwen_image_trt.core.gpus import PEAKS, DevicePeak, lookup_peak  # noqa: F401 - bench's view of the table
from qwen_image_trt.core.identity import tool_versions

CPU_NOTE = "no peak known: CPU"


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
