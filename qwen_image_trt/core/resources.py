"""What this machine has (host memory, disk, GPU memory) and how much a piece of work used (peak RSS)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to psutil)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().memory_info().rss


def available_memory_bytes() -> int:
    """Host memory a new allocation can get without swapping (MemAvailable), or total memory elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_disk_bytes(path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def gpu_memory_bytes(device: str = "cuda") -> int | None:
    """Total memory of a CUDA device, or None when there is none."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    except Exception:  # noqa: BLE001 - no CUDA, or a CUDA error: no GPU memory to speak of
        return None


class PeakRSS:
    """Samples this process's RSS in a thread while a block runs; `.peak` is the highest seen (bytes).

    ru_maxrss would only give the process's lifetime peak; this gives one stage's own peak.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.seconds = time.perf_counter() - self.started





def default_device() -> str:
    """cuda when torch sees a GPU, else cpu: the real transformer does not fit a CPU build in fp32."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
__all__ = ["rss_bytes", "available_memory_bytes", "free_disk_bytes", "gpu_memory_bytes", "PeakRSS", "default_device"]
