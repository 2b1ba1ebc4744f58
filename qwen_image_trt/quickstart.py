"""`qitrt quickstart`: the main job end to end on the built-in tiny model, in under a minute on a laptop CPU.

tiny checkpoint -> ONNX export -> an image generated with the exported graphs in ONNX Runtime ->
parity report against eager torch. Prints where everything went.
"""

from __future__ import annotations

import time
from pathlib import Path

from qwen_image_trt.compile.export import export_onnx
from qwen_image_trt.models.tiny import make_tiny_checkpoint
from qwen_image_trt.parity.run import ParityConfig, run_parity
from qwen_image_trt.runtime.generate import generate_image


def quickstart(workdir: str | Path = "runs/quickstart") -> int:
    work = Path(workdir)
    checkpoint, engines = work / "qwen-image-tiny", work / "engines-fp32"
    timings = {}

    def stage(name):
        print(f"[quickstart] {name} ...", flush=True)
        timings[name] = time.perf_counter()

    stage("tiny checkpoint")
    make_tiny_checkpoint(checkpoint, overwrite=True)
    stage("export to ONNX")
    manifest = export_onnx(checkpoint, engines, precision="fp32")
    stage("generate with ONNX Runtime")
    image = generate_image(checkpoint, work / "tiny_onnxruntime.png", prompt="a red fox in the snow, watercolor",
                           negative_prompt=" ", seed=0, steps=8, height=256, width=256, engines=engines,
                           backend="onnxruntime")
    stage("parity vs eager torch")
    report = run_parity(ParityConfig(checkpoint=checkpoint, engines=engines, out=work / "parity"))
    timings["done"] = time.perf_counter()

    names = list(timings)
    print()
    for a, b in zip(names, names[1:]):
        print(f"  {a:28s} {timings[b] - timings[a]:6.1f} s")
    print(f"\n  checkpoint     {checkpoint}\n  engines        {engines} "
          f"({', '.join(manifest.components)}; manifest.json)\n  image          {image}\n"
          f"  parity report  {report.html_path} (+ report.json)\n")
    print(report.summary())
    return 0 if report.passed else 1
