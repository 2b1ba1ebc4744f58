"""Qwen-Image-2.1 on engines, per denoising step, with and without the prefix KV cache (tiny checkpoint, ONNX Runtime
on this CPU).

Makes the tiny 2.1 checkpoint and its fp32 export (every transformer pass, the uncached one included), then times
QwenImage21Pipeline on the engines: the transformer's time per step (the engine calls, timed around each runner call)
for text-to-image and for an edit with one condition image, the cache on (`use_kv_cache=True`: one extract call, then
a cached call per step) and off (the uncached graph every step); then with true CFG (a negative prompt of another
length, cache on), diffusers' two calls per step against both branches in one cached call (`batch_cfg`,
runtime.cfg21); then three CFG requests with prompts of different lengths, one of them an edit, one after another
against co-batched (runtime.co_batch21: concurrent pipeline calls, one cached engine call per step for all).
ONNX Runtime and torch run one thread each (a shared 2-core machine makes two-thread timings swing).
Median of `--repeat` requests.

    python benchmarks/qwen21_engine_steps.py                 # 256x256, 8 steps, 5 requests (~5 min)
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
    cfg = {"negative_prompt": "blurry, low quality, distorted, watermark, text", "true_cfg_scale": 4.0}
    runs = [(cache, "none", {}) for cache in (True, False)] + [(True, "two calls", {**cfg, "batch_cfg": False}),
                                                               (True, "one call", {**cfg, "batch_cfg": True})]
    for task, extra in (("text-to-image", {}), ("edit (1 condition image)", {"image": image,
                                                                            "output_resolution": a.size})):
        for cache, cfg_mode, more in runs:
            per_step, total = [], []
            for r in range(a.repeat + 1):  # the first request warms the sessions up, not counted
                for k in spent:
                    spent[k] = 0.0
                calls = dict(pipe.transformer.calls)
                t0 = time.perf_counter()
                pipe(prompt="a red fox in the snow", height=a.size, width=a.size, num_inference_steps=a.steps,
                     generator=torch.Generator().manual_seed(r), use_kv_cache=cache, output_type="latent", **extra,
                     **more)
                if r:
                    total.append(time.perf_counter() - t0)
                    per_step.append(sum(spent.values()) / a.steps)
            rows.append({"task": task, "kv_cache": cache, "cfg": cfg_mode, "size": a.size, "steps": a.steps,
                         "transformer_ms_per_step": round(1e3 * statistics.median(per_step), 2),
                         "request_s": round(statistics.median(total), 3),
                         "engine_calls": sum(pipe.transformer.calls.values()) - sum(calls.values())})
            print(rows[-1], flush=True)
    co_rows = co_batched(pipe, spent, image, a)
    by = {(r["task"], r["kv_cache"], r["cfg"]): r for r in rows}
    for r in rows:  # cache on vs off; one CFG call vs two
        base = by[(r["task"], False, "none")] if r["cfg"] == "none" else by[(r["task"], True, "two calls")]
        if r is not base:
            r["speedup_per_step"] = round(base["transformer_ms_per_step"] / r["transformer_ms_per_step"], 2)
    out = Path(a.out)
    command = f"python benchmarks/qwen21_engine_steps.py --size {a.size} --steps {a.steps} --repeat {a.repeat}"
    (out / "qwen21_engine_steps.json").write_text(json.dumps({"command": command, "rows": rows,
                                                               "co_batched": co_rows}, indent=2) + "\n")
    lines = ["# Qwen-Image-2.1 on engines: time per step with and without the prefix KV cache", "",
             f"`{command}`: the tiny 2.1 checkpoint's fp32 graphs in ONNX Runtime (CPU, 1 thread), diffusers' "
             "QwenImage21Pipeline loop; transformer engine time per denoising step (the cache's first step includes "
             "its extract call), median of the requests. Speedup: cache on against off; with CFG, both branches in "
             "one cached call (batch_cfg) against diffusers' two calls per step.", "",
             "| task | prefix KV cache | true CFG | engine calls/request | transformer ms/step | request s | "
             "speedup/step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {'on' if r['kv_cache'] else 'off'} | {r['cfg']} | {r['engine_calls']} | "
                     f"{r['transformer_ms_per_step']} | {r['request_s']} | {r.get('speedup_per_step', '')} |")
    lines += ["", "Three requests with true CFG (prompts of 3, 9 and 4 words, the last an edit with one condition image), "
              "one after another against co-batched; transformer engine time per step summed over the requests.", "",
              "| requests | engine calls | transformer ms/step | wall s | speedup/step |", "|---|---|---|---|---|"]
    for r in co_rows:
        lines.append(f"| {r['mode']} | {r['engine_calls']} | {r['transformer_ms_per_step']} | {r['wall_s']} | "
                     f"{r.get('speedup_per_step', '')} |")
    (out / "qwen21_engine_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def co_batched(pipe, spent, image, a) -> list[dict]:
    import torch

    from qwen_image_trt.runtime.co_batch import call_together

    requests = [{"prompt": "a red fox", "negative_prompt": "blurry"},
                {"prompt": "two dogs on a long green sofa in the afternoon sun",
                 "negative_prompt": "low quality, distorted"},
                {"prompt": "make the sky purple", "image": image, "output_resolution": a.size,
                 "negative_prompt": "blurry, dark"}]

    def calls(seed):
        return [{**r, "height": a.size, "width": a.size, "num_inference_steps": a.steps, "true_cfg_scale": 4.0,
                 "output_type": "latent", "generator": torch.Generator().manual_seed(seed + i)}
                for i, r in enumerate(requests)]

    rows = []
    for mode in ("one after another", "co-batched"):
        per_step, wall, n_calls = [], [], 0
        for rep in range(a.repeat + 1):
            for k in spent:
                spent[k] = 0.0
            before = sum(pipe.transformer.calls.values())
            t0 = time.perf_counter()
            if mode == "co-batched":
                call_together(pipe, calls(rep))
            else:
                for kw in calls(rep):
                    pipe(**kw)
            if rep:
                wall.append(time.perf_counter() - t0)
                per_step.append(sum(spent.values()) / a.steps)
                n_calls = sum(pipe.transformer.calls.values()) - before
        rows.append({"mode": mode, "requests": len(requests), "steps": a.steps, "engine_calls": n_calls,
                     "transformer_ms_per_step": round(1e3 * statistics.median(per_step), 2),
                     "wall_s": round(statistics.median(wall), 3)})
        print(rows[-1], flush=True)
    rows[1]["speedup_per_step"] = round(rows[0]["transformer_ms_per_step"] / rows[1]["transformer_ms_per_step"], 2)
    return rows


if __name__ == "__main__":
    main()
