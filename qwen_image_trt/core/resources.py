"""What this machine has (host memory, disk, GPU memory) and how much a piece of work used (peak RSS)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process now (this one by default; Linux /proc, else psutil); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        try:
            import psutil

            return psutil.Process(None if pid == "self" else int(pid)).memory_info().rss
        except Exception:  # noqa: BLE001 - psutil missing, or the process ended
            return 0


def _proc_kb(path: str, key: str) -> int | None:
    """Bytes of a `Key:  N kB` line of a /proc file, or None where there is no such file or line."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_anon_bytes() -> int:
    """Anonymous resident memory (RssAnon): RSS without file-backed pages such as a memory-mapped checkpoint,
    which the kernel can drop and re-read under pressure; 0 where /proc does not say."""
    return _proc_kb("/proc/self/status", "RssAnon") or 0


def available_memory_bytes() -> int:
    """Host memory a new allocation can get without swapping (MemAvailable), or total memory elsewhere."""
    available = _proc_kb("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
    """Samples this process's RSS (or another `sample()`, e.g. rss_anon_bytes) in a thread while a block runs;
    `.peak` is the highest seen (bytes).

    ru_maxrss would only give the process's lifetime peak; this gives one stage's own peak.
    """

    def __init__(self, interval_s: float = 0.05, sample=rss_bytes):
        self.interval_s, self.sample = interval_s, sample
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self.sample()
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        self.seconds = time.perf_counter() - self.started





def default_device() -> str:
    """cuda when torch sees a GPU, else cpu: the real transformer does not fit a CPU build in fp32."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
__all__ = ["PeakRSS", "available_memory_bytes", "default_device", "free_disk_bytes", "gpu_memory_bytes", "rss_bytes"]
