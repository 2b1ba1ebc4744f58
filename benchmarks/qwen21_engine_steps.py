"""Qwen-Image-2.1 on engines, per denoising step, with and without the prefix KV cache (tiny checkpoint, ONNX Runtime
on this CPU).

Makes the tiny 2.1 checkpoint and its fp32 export (every transformer pass, the uncached one included), then times
QwenImage21Pipeline on the engines: the transformer's time per step (the engine calls, timed around each runner call)
for text-to-image and for an edit with one condition image, the cache on (`use_kv_cache=True`: one extract call, then
a cached call per step) and off (the uncached graph every step). ONNX Runtime and torch run one thread each (a shared
2-core machine makes two-thread timings swing). Median of `--repeat` requests.

    python benchmarks/qwen21_engine_steps.py                 # 256x256, 8 steps, 5 requests (~3 min)
Writes benchmarks/results/qwen21_engine_steps.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed_runners(transformer) -> dict:
    """Wrap each runner's infer to add its wall time to `spent[pass]`."""
    spent = {p: 0.0 for p in transformer.runners}
    for name, runner in transformer.runners.items():
        def infer(feeds, _name=name, _orig=runner.infer):
            t0 = time.perf_counter()
            out = _orig(feeds)
            spent[_name] += time.perf_counter() - t0
            return out

        runner.infer = infer
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    a = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.specs import ALL_COMPONENTS_21
    from qwen_image_trt.models.tiny21 import make_tiny_21_checkpoint
    from qwen_image_trt.runtime.pipeline import load_pipeline

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="qwen21-steps-"))
    root = make_tiny_21_checkpoint(work / "tiny21")
    export_onnx(root, work / "engines", precision="fp32", components=ALL_COMPONENTS_21, progress=False)
    pipe = load_pipeline(root, engines=work / "engines", backend="onnxruntime", threads=1)
    spent = timed_runners(pipe.transformer)
    image = Image.fromarray((np.random.RandomState(0).rand(a.size, a.size, 3) * 255).astype("uint8"))
    rows = []
    for task, extra in (("text-to-image", {}), ("edit (1 condition image)", {"image": image,
                                                                            "output_resolution": a.size})):
        for cache in (True, False):
            per_step, total = [], []
            for r in range(a.repeat + 1):  # the first request warms the sessions up, not counted
                for k in spent:
                    spent[k] = 0.0
                t0 = time.perf_counter()
                pipe(prompt="a red fox in the snow", height=a.size, width=a.size, num_inference_steps=a.steps,
                     generator=torch.Generator().manual_seed(r), use_kv_cache=cache, output_type="latent", **extra)
                if r:
                    total.append(time.perf_counter() - t0)
                    per_step.append(sum(spent.values()) / a.steps)
            rows.append({"task": task, "kv_cache": cache, "size": a.size, "steps": a.steps,
                         "transformer_ms_per_step": round(1e3 * statistics.median(per_step), 2),
                         "request_s": round(statistics.median(total), 3)})
            print(rows[-1], flush=True)
    by = {(r["task"], r["kv_cache"]): r for r in rows}
    for r in rows:
        if r["kv_cache"]:
            r["speedup_per_step"] = round(by[(r["task"], False)]["transformer_ms_per_step"]
                                          / r["transformer_ms_per_step"], 2)
    out = Path(a.out)
    command = f"python benchmarks/qwen21_engine_steps.py --size {a.size} --steps {a.steps} --repeat {a.repeat}"
    (out / "qwen21_engine_steps.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = ["# Qwen-Image-2.1 on engines: time per step with and without the prefix KV cache", "",
             f"`{command}`: the tiny 2.1 checkpoint's fp32 graphs in ONNX Runtime (CPU, 1 thread), diffusers' "
             "QwenImage21Pipeline loop; transformer engine time per denoising step (the cache's first step includes "
             "its extract call), median of the requests.", "",
             "| task | prefix KV cache | transformer ms/step | request s | speedup/step |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {'on' if r['kv_cache'] else 'off'} | {r['transformer_ms_per_step']} | "
                     f"{r['request_s']} | {r.get('speedup_per_step', '')} |")
    (out / "qwen21_engine_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
