"""Qwen-Image-2.1 per denoising step, with and without the prefix KV cache, beside the 2509 model.

1. Predicted (models/flops21.py, models/flops.py): one transformer forward (one sample; true CFG doubles it) at
   1024^2 and 2048^2, text-to-image and editing with one condition image of the target's size, 128 text tokens:
   2.1 uncached (also the first step, `extract`), 2.1 cached (every later step), and 2509 (Qwen-Image / Edit) at the
   same resolution; H100 SXM bf16 floors; the cache's memory per sample.
2. Measured on this machine: the tiny 2.1 transformer (diffusers' own module, eager fp32, 1 thread), one forward
   at a 256x256 target with and without a 256x256 condition image, uncached vs cached, median of `--repeat`.

    python benchmarks/qwen21_cost.py [--repeat 20] [--out benchmarks/results]

Writes qwen21_cost.json and qwen21_cost.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TEXT_TOKENS = 128


def predicted_rows() -> list[dict]:
    from qwen_image_trt.core.gpus import PEAKS
    from qwen_image_trt.models.flops import forward_cost, image_tokens_for
    from qwen_image_trt.models.flops21 import REAL_21_CONFIG, forward_cost_21, image_tokens_21, kv_cache_bytes_21
    from qwen_image_trt.models.tiny import real_transformer_config

    h100 = PEAKS["H100 SXM"]
    rows = []
    for side in (1024, 2048):
        for edit in (False, True):
            tokens = image_tokens_21(side, side)
            cond = tokens if edit else 0
            costs = {"2.1 uncached": forward_cost_21(REAL_21_CONFIG, tokens, TEXT_TOKENS, cond),
                     "2.1 cached": forward_cost_21(REAL_21_CONFIG, tokens, TEXT_TOKENS, cond, mode="cached"),
                     # 2509: condition tokens join the image stream; the edit template adds vision tokens
                     "2509": forward_cost(real_transformer_config(60), image_tokens_for(side, side) * (2 if edit else 1),
                                          TEXT_TOKENS)}
            for model, c in costs.items():
                rows.append({"size": f"{side}x{side}", "task": "edit (1 condition image)" if edit else "text-to-image",
                             "model": model, "image_tokens": tokens, "condition_tokens": cond, "tflop": c.flops / 1e12,
                             "attention_share": c.attention_flops / c.flops,
                             "h100_floor_s": c.floor_seconds(h100.flops["bf16"], h100.bytes_per_s),
                             "kv_cache_mb": (kv_cache_bytes_21(REAL_21_CONFIG, TEXT_TOKENS + cond) / 2**20
                                             if model == "2.1 cached" else None)})
    return rows


def measured_rows(repeat: int, threads: int = 1) -> list[dict]:
    import torch
    from diffusers import QwenImage21Transformer2DModel
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    from qwen_image_trt.models.tiny21 import TRANSFORMER_CONFIG

    torch.set_num_threads(threads)  # 1: a shared 2-core machine makes 2-thread timings swing by 10x
    torch.manual_seed(0)
    tr = QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    rows = []
    for cond in (None, (16, 16)):
        target, text = (16, 16), 40
        slots = cond[0] * cond[1] // 4 if cond else 0
        vlm = text + slots
        img_mask = torch.zeros(1, vlm + target[0] * target[1] // 4, dtype=torch.bool)
        img_mask[:, 8:8 + slots] = True
        img_mask[:, vlm:] = True
        n_cond = cond[0] * cond[1] if cond else 0
        kw = dict(hidden_states=torch.randn(1, n_cond + 256, 64), timestep=torch.tensor([0.5]), img_mask=img_mask,
                  encoder_hidden_states=torch.randn(1, vlm, 64),
                  encoder_hidden_states_mask=None,  # an unpadded prompt, as the pipeline's batch of one
                  img_shapes=[[(1, *cond), (1, *target)] if cond else [(1, *target)]], return_dict=False)
        cache = QwenImage21KVCache(len(tr.transformer_blocks))
        with torch.no_grad():
            tr(**kw, kv_cache=cache, kv_cache_mode="extract")
        times = {}
        for mode, extra in (("uncached", {}), ("cached", dict(kv_cache=cache, kv_cache_mode="cached"))):
            samples = []
            with torch.no_grad():
                for _ in range(repeat + 2):
                    t0 = time.perf_counter()
                    tr(**kw, **extra)
                    samples.append(time.perf_counter() - t0)
            times[mode] = statistics.median(samples[2:])
            times[mode + "_min"] = min(samples[2:])
        rows.append({"task": "edit (256x256 condition)" if cond else "text-to-image", "target": "256x256",
                     "uncached_ms": times["uncached"] * 1e3, "cached_ms": times["cached"] * 1e3,
                     "uncached_min_ms": times["uncached_min"] * 1e3, "cached_min_ms": times["cached_min"] * 1e3,
                     "speedup": times["uncached"] / times["cached"]})
    return rows


def write(out: Path, predicted: list[dict], measured: list[dict], repeat: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen21_cost.json").write_text(json.dumps({"predicted": predicted, "measured": measured}, indent=2))
    lines = ["# Qwen-Image-2.1 per step: the prefix KV cache, and against the 2509 model", "",
             "Command: `python benchmarks/qwen21_cost.py`. Predicted: one transformer forward of one sample (true "
             f"CFG runs two), {TEXT_TOKENS} text tokens, bf16; 2.1 = 32 single-stream blocks of 4096 (7.1 B), "
             "2509 = 60 dual-stream blocks of 3072 (20 B). `2.1 uncached` is also the cost of the first step "
             "(`extract`); `2.1 cached` that of every later one. Floor: H100 SXM dense bf16 peak and bandwidth.", "",
             "| size | task | model | image tokens | condition tokens | TFLOP | attention share | H100 floor s | "
             "KV cache MB/sample |", "|---|---|---|---|---|---|---|---|---|"]
    for r in predicted:
        kv = f"{r['kv_cache_mb']:.0f}" if r["kv_cache_mb"] is not None else "-"
        lines.append(f"| {r['size']} | {r['task']} | {r['model']} | {r['image_tokens']} | {r['condition_tokens']} | "
                     f"{r['tflop']:.1f} | {r['attention_share']:.0%} | {r['h100_floor_s']:.3f} | {kv} |")
    lines += ["", f"Measured: the tiny 2.1 transformer (diffusers' module, 4 blocks of 64, eager fp32, 1 thread) on "
              f"this CPU, one forward, 1 thread, median (min) of {repeat}.", "",
              "| task | target | uncached ms | cached ms | speedup (medians) |", "|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['target']} | {r['uncached_ms']:.1f} ({r['uncached_min_ms']:.1f}) | "
              f"{r['cached_ms']:.1f} ({r['cached_min_ms']:.1f}) | {r['speedup']:.2f} |" for r in measured]
    (out / "qwen21_cost.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    write(Path(a.out), predicted_rows(), measured_rows(a.repeat), a.repeat)
    print(Path(a.out) / "qwen21_cost.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
