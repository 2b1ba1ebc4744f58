"""What condition images cost: Edit-Plus at 1024^2 with 0-3 condition images, predicted for the real model and
measured on the tiny one.

1. FLOP model (models/flops.py) of the REAL Qwen-Image transformer (60 blocks, width 3072) per denoising step with
   true CFG at a 1024x1024 target: text-to-image, then 1, 2, 3 condition images (each resized by the pipeline to
   ~1024^2, 4096 more image tokens; ~188 more text tokens for its 384^2 vision-tower view). Floor on an H100 SXM
   (bf16 dense peak and bandwidth) beside the public Edit-2511 anchor: 40 steps in 46.8 s stock diffusers
   (1.17 s/step) and 31.9 s with LightX2V (0.80 s/step) on H100.
2. Measured on this machine: the tiny Edit-2511 checkpoint through its fp32 ONNX Runtime engines, 64x64 target,
   per transformer forward (CFG batch 2) and per VAE encode of one condition image, 0-3 condition images.

    python benchmarks/edit_plus.py [--repeat 3] [--out benchmarks/results]

Writes edit_plus.json and edit_plus.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ANCHOR_STEPS, ANCHOR_STOCK_S, ANCHOR_LIGHTX2V_S = 40, 46.8, 31.9
PROMPT_TOKENS, VISION_TOKENS_PER_IMAGE = 128, 188  # (384 / 28)^2 merged patches per 384^2 condition view


def predicted_rows() -> list[dict]:
    from qwen_image_trt.core.gpus import PEAKS
    from qwen_image_trt.models.flops import forward_cost, image_tokens_for
    from qwen_image_trt.models.tiny import real_transformer_config

    config, h100 = real_transformer_config(60), PEAKS["H100 SXM"]
    target = image_tokens_for(1024, 1024)
    rows = []
    for n in range(4):
        cost = forward_cost(config, target + n * target, PROMPT_TOKENS + n * VISION_TOKENS_PER_IMAGE, batch=2)
        floor = cost.floor_seconds(h100.peak_flops("bf16"), h100.bytes_per_s)
        rows.append({"condition_images": n, "image_tokens": target * (n + 1),
                     "text_tokens": PROMPT_TOKENS + n * VISION_TOKENS_PER_IMAGE, "tflop_per_step": cost.flops / 1e12,
                     "attention_share": cost.attention_flops / cost.flops, "h100_floor_s_per_step": floor})
    base = rows[0]["tflop_per_step"]
    for r in rows:
        r["x_text_to_image"] = r["tflop_per_step"] / base
    return rows


def measured_rows(repeat: int) -> tuple[list[dict], dict]:
    import torch

    from qwen_image_trt import load_pipeline
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.condition_images import condition_image
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qitrt-edit-bench-"))
    root = make_tiny_checkpoint(work / "ckpt", pipeline="edit-2511")
    export_onnx(root, work / "engines", precision="fp32", progress=False)
    pipe = load_pipeline(root, engines=work / "engines", backend="onnxruntime")
    forwards, encodes = [], []
    forward, encode = pipe.transformer.runner.infer, pipe.vae.encoder_runner.infer

    def timed(fn, sink):
        def run(feeds):
            t0 = time.perf_counter()
            out = fn(feeds)
            sink.append(time.perf_counter() - t0)
            return out
        return run

    pipe.transformer.runner.infer = timed(forward, forwards)
    pipe.vae.encoder_runner.infer = timed(encode, encodes)
    rows = []
    images = [condition_image(i) for i in range(3)]
    for n in range(1, 4):
        call_times, per_forward, per_encode = [], [], []
        for _ in range(repeat):
            forwards.clear()
            encodes.clear()
            t0 = time.perf_counter()
            pipe(prompt="the cat wears a hat", image=images[:n], negative_prompt=" ", true_cfg_scale=4.0,
                 height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
            call_times.append(time.perf_counter() - t0)
            per_forward.append(statistics.median(forwards))
            per_encode.append(statistics.median(encodes))
        rows.append({"condition_images": n, "image_tokens": 16 + 4096 * n,
                     "forward_s_median": statistics.median(per_forward), "vae_encode_s_median": statistics.median(
                         per_encode), "pipeline_call_s_median": statistics.median(call_times), "repeat": repeat})
    machine = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0]}
    return rows, machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    predicted = predicted_rows()
    measured, machine = measured_rows(a.repeat)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"predicted_real_model": predicted, "measured_tiny_cpu": measured, "machine": machine,
            "anchor": {"steps": ANCHOR_STEPS, "stock_diffusers_s": ANCHOR_STOCK_S, "lightx2v_s": ANCHOR_LIGHTX2V_S,
                       "device": "H100", "model": "Qwen-Image-Edit-2511"},
            "command": "python benchmarks/edit_plus.py"}
    (out / "edit_plus.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Edit-Plus: what condition images cost", "",
             "Command: `python benchmarks/edit_plus.py`. Predicted rows: the FLOP model of the real transformer "
             "(60 blocks), one denoising step with true CFG (batch 2) at a 1024x1024 target. Anchor: Edit-2511, "
             f"{ANCHOR_STEPS} steps on H100: {ANCHOR_STOCK_S} s stock diffusers "
             f"({ANCHOR_STOCK_S / ANCHOR_STEPS:.2f} s/step), {ANCHOR_LIGHTX2V_S} s LightX2V "
             f"({ANCHOR_LIGHTX2V_S / ANCHOR_STEPS:.2f} s/step).", "",
             "| condition images | image tokens | text tokens | TFLOP/step | x text-to-image | attention share | "
             "H100 SXM floor s/step |", "|---|---|---|---|---|---|---|"]
    for r in predicted:
        lines.append(f"| {r['condition_images']} | {r['image_tokens']} | {r['text_tokens']} | "
                     f"{r['tflop_per_step']:.1f} | {r['x_text_to_image']:.2f} | {r['attention_share']:.0%} | "
                     f"{r['h100_floor_s_per_step']:.3f} |")
    lines += ["", f"Measured: tiny Edit-2511 checkpoint, fp32 ONNX Runtime engines on this CPU "
              f"({machine['cpu_threads']} torch threads), 64x64 target, 2 steps, median of {a.repeat} calls.", "",
              "| condition images | image tokens | transformer forward s (CFG batch 2) | VAE encode s per image | "
              "pipeline call s |", "|---|---|---|---|---|"]
    for r in measured:
        lines.append(f"| {r['condition_images']} | {r['image_tokens']} | {r['forward_s_median']:.3f} | "
                     f"{r['vae_encode_s_median']:.2f} | {r['pipeline_call_s_median']:.2f} |")
    (out / "edit_plus.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
