"""What a build will need (disk, host memory, GPU memory, time) and whether this machine has it.

Figures come from the transformer's safetensors headers (parameters, dtype) and per-stage memory factors;
`check()` refuses before any work, naming the figure that does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from qwen_image_trt.core.errors import QitrtError
from qwen_image_trt.core.resources import available_memory_bytes, free_disk_bytes

BASE_RSS = 2 * 1024**3  # Python, torch, diffusers, ONNX Runtime, the text encoder of a tiny model


@dataclass
class BuildPlan:
    needs: dict[str, int] = field(default_factory=dict)
    has: dict[str, int] = field(default_factory=dict)

    def problems(self) -> list[str]:
        return [f"{k} needs {self.needs[k] / 1e9:.1f} GB, this machine has {self.has[k] / 1e9:.1f} GB"
                for k in self.needs if k in self.has and self.needs[k] > self.has[k]]

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise QitrtError("this machine cannot hold the build: " + "; ".join(problems))


def plan_build(root: Path, out: Path, options) -> BuildPlan:
    from qwen_image_trt.compile.export import export_bytes, resolve_precision

    precision = resolve_precision(root, "auto" if options.precision in ("int8", "fp8") else options.precision)
    disk = export_bytes(root, precision, options.components)
    weights = export_bytes(root, precision, ("transformer",))
    return BuildPlan(needs={"disk": disk, "host_memory": int(1.5 * weights) + BASE_RSS},
                     has={"disk": free_disk_bytes(out), "host_memory": available_memory_bytes()})
