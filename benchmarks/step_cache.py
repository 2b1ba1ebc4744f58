"""Step cache: steps skipped, speedup and image quality against the threshold, on the tiny model.

For each backend (eager torch, ONNX Runtime fp32 graphs) and each threshold, the same prompts and seeds are
generated with `pipe(..., step_cache=T)` and compared with the uncached images of the same backend: PSNR and
SSIM of the 8-bit images, the fraction of row-steps skipped, and the median whole-call time against the uncached
call (after one warm-up). Beside them, what the skipped fraction would save on the real model: the transformer is
~all of a 50-step 1024^2 image's time (bench/flops: ~6.9e13 FLOP per forward, the text encoder and VAE a few %),
so a skip ratio r bounds the speedup at 1 / (1 - r) there.

Random-weight tiny models are not trained: their trajectories are not straight, so the PSNR here is a worst
case for a given skip ratio, not Qwen-Image's quality; the figure to trust for quality is `qitrt parity
--step-cache` on the real checkpoint. What this run shows is that the mechanism skips what it says and the time
follows.

    python benchmarks/step_cache.py [--steps 20] [--size 128] [--repeat 3] [--out benchmarks/results]

Writes step_cache.json and step_cache.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
PROMPTS = [("a red fox sitting in the snow, watercolor", "blurry"),
           ("一只猫坐在窗台上, neon sign that reads OPEN", "low quality"),
           ("a lighthouse at dusk, oil painting", " ")]


def measure(pipe, size: int, steps: int, repeat: int, threshold) -> tuple[list, float, dict]:
    import numpy as np
    import torch

    images, times, skipped, computed = [], [], 0, 0
    for k, (prompt, negative) in enumerate(PROMPTS):
        def call():
            return pipe(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, height=size, width=size,
                        num_inference_steps=steps, generator=torch.Generator().manual_seed(k), output_type="np",
                        step_cache=threshold).images[0]

        call()  # warm-up (ONNX Runtime sessions, shape caches)
        run = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            img = call()
            run.append(time.perf_counter() - t0)
        times.append(statistics.median(run))
        images.append((img * 255).round().clip(0, 255).astype(np.uint8))
        if pipe.step_cache_stats is not None:
            skipped += pipe.step_cache_stats.skipped
            computed += pipe.step_cache_stats.computed
    total = skipped + computed
    return images, sum(times), {"skip_ratio": skipped / total if total else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)

    import torch

    from qwen_image_trt import load_pipeline
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.tiny import make_tiny_checkpoint
    from qwen_image_trt.parity import metrics

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny")
        engines = Path(tmp) / "fp32"
        export_onnx(ckpt, engines, precision="fp32", progress=False)
        for backend, folder in (("torch", None), ("onnxruntime", engines)):
            pipe = load_pipeline(ckpt, folder, backend=backend)
            base, base_s, _ = measure(pipe, a.size, a.steps, a.repeat, None)
            rows.append({"backend": backend, "threshold": 0.0, "skip_ratio": 0.0, "seconds": round(base_s, 4),
                         "speedup": 1.0, "psnr_db": metrics.PSNR_CAP_DB, "ssim": 1.0,
                         "real_model_bound": 1.0})
            for threshold in THRESHOLDS:
                images, seconds, extra = measure(pipe, a.size, a.steps, a.repeat, threshold)
                r = extra["skip_ratio"]
                rows.append({"backend": backend, "threshold": threshold, "skip_ratio": round(r, 4),
                             "seconds": round(seconds, 4), "speedup": round(base_s / seconds, 3),
                             "psnr_db": round(min(metrics.psnr(b, i) for b, i in zip(base, images)), 2),
                             "ssim": round(min(metrics.ssim(b, i) for b, i in zip(base, images)), 4),
                             "real_model_bound": round(1 / max(1e-9, 1 - r), 2)})
                print(f"{backend:12s} T={threshold:<5} skipped {r:.0%}  {base_s / seconds:.2f}x  "
                      f"PSNR {rows[-1]['psnr_db']:.1f} dB", flush=True)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
              "command": "python benchmarks/step_cache.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "steps": a.steps, "size": a.size, "prompts": len(PROMPTS), "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Step cache on the tiny model ({a.size}x{a.size}, {a.steps} steps, true CFG, {len(PROMPTS)} prompts)",
             "", f"`{result['command']}` on {result['machine']['processor']}, {result['date']}. PSNR/SSIM: the worst "
             "prompt, against the same backend uncached. Speedup: median whole-call time (text encoder and VAE "
             "included) against uncached. Real-model bound: 1 / (1 - skip ratio), the transformer being ~all of a "
             "50-step 1024^2 image.", "",
             "| backend | threshold | steps skipped | speedup | PSNR dB | SSIM | real-model bound |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "identical" if r["psnr_db"] >= metrics.PSNR_CAP_DB else f"{r['psnr_db']:.1f}"
        lines.append(f"| {r['backend']} | {r['threshold'] or 'off'} | {r['skip_ratio']:.0%} | {r['speedup']:.2f}x | "
                     f"{psnr} | {r['ssim']:.4f} | {r['real_model_bound']:.2f}x |")
    (out / "step_cache.md").write_text("\n".join(lines) + "\n")
    print(out / "step_cache.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
