"""Own overhead of the EngineTransformer drop-in vs the bare ONNX Runtime session run it wraps.

Target (foundation issue): the drop-in's own time <= 5% of the bare `runner.infer(feeds)` time, on the tiny
model at 1024 image tokens (512x512), batch 2 (both CFG branches in one call).

Two measurements, interleaved so both see the same machine load:
- forward: `EngineTransformer.forward(...)` (text padding, mask, RoPE lookup, the runner call, the output cast);
- bare:    `runner.infer(feeds)` with exactly the feeds the drop-in built;
and a direct one of the drop-in's own work: forward with `runner.infer` replaced by a stub returning the
same output, so it is not a difference of two noisy medians.

    python benchmarks/dropin_overhead.py [--checkpoint DIR --engines DIR] [--iters 50] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGET = 0.05


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="default: a fresh tiny checkpoint in a temp folder")
    p.add_argument("--engines", default=None, help="default: an fp32 ONNX export of the checkpoint")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--text-tokens", type=int, default=29, help="prompt length before bucket padding")
    p.add_argument("--batch", type=int, default=2, help="forward batch (2 = one image with CFG)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)

    from qwen_image_trt.core.identity import tool_versions
    from qwen_image_trt.models import checkpoint as ckpt
    from qwen_image_trt.runtime.backends import make_runner
    from qwen_image_trt.runtime.transformer import EngineTransformer

    tmp = Path(tempfile.mkdtemp(prefix="dropin-"))
    checkpoint = a.checkpoint
    if checkpoint is None:
        from qwen_image_trt.models.tiny import make_tiny_checkpoint

        checkpoint = make_tiny_checkpoint(tmp / "tiny")
    engines = a.engines
    if engines is None:
        from qwen_image_trt.compile.export import export_onnx

        engines = tmp / "fp32"
        export_onnx(checkpoint, engines, precision="fp32", components=["transformer"], progress=False)

    config = ckpt.read_config(checkpoint, "transformer")
    runner = make_runner("onnxruntime", "transformer", engines_dir=engines).activate()
    drop_in = EngineTransformer(runner, config)
    grid = (1, a.height // 16, a.width // 16)
    tokens = grid[1] * grid[2]
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(a.batch, tokens, config["in_channels"], generator=g),
                  encoder_hidden_states=torch.randn(a.batch, a.text_tokens, config["joint_attention_dim"], generator=g),
                  encoder_hidden_states_mask=torch.ones(a.batch, a.text_tokens, dtype=torch.long),
                  timestep=torch.full((a.batch,), 0.5), img_shapes=[[grid]] * a.batch, return_dict=False)

    captured = {}
    real_infer = runner.infer

    def capture(feeds):
        captured.update({k: v.clone() for k, v in feeds.items()})
        return real_infer(feeds)

    runner.infer = capture
    with torch.no_grad():
        out = drop_in(**kwargs)[0]
    runner.infer = real_infer
    cached = {"noise_pred": out.clone()}

    def stub(feeds):
        return cached

    fwd, bare, own = [], [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up: session, RoPE tables and text buffers
            drop_in(**kwargs)
            runner.infer(captured)
        for _ in range(a.iters):
            t0 = time.perf_counter()
            drop_in(**kwargs)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runner.infer(captured)
            bare.append(time.perf_counter() - t0)
            runner.infer = stub
            t0 = time.perf_counter()
            drop_in(**kwargs)
            own.append(time.perf_counter() - t0)
            runner.infer = real_infer

    med = statistics.median
    result = {
        "what": "EngineTransformer.forward vs bare OnnxRuntimeRunner.infer, same feeds, interleaved",
        "command": "python benchmarks/dropin_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": "tiny random-weight (qwen_image_trt.models.tiny)" if a.checkpoint is None else str(checkpoint),
        "shape": {"batch": a.batch, "image_tokens": tokens, "size": f"{a.width}x{a.height}",
                  "text_tokens": a.text_tokens, "text_tokens_padded": drop_in.padded_text_len(a.text_tokens)},
        "iters": a.iters, "cpu_count": os.cpu_count(), "threads_torch": torch.get_num_threads(),
        "versions": tool_versions(),
        "median_ms": {"forward": med(fwd) * 1e3, "bare_infer": med(bare) * 1e3, "own": med(own) * 1e3},
        "min_ms": {"forward": min(fwd) * 1e3, "bare_infer": min(bare) * 1e3, "own": min(own) * 1e3},
    }
    result["own_fraction"] = med(own) / med(bare)
    result["difference_fraction"] = (med(fwd) - med(bare)) / med(bare)
    result["target"] = TARGET
    result["meets_target"] = result["own_fraction"] <= TARGET

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dropin_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["median_ms"]
    md = [
        "# Drop-in overhead: EngineTransformer vs bare ONNX Runtime run", "",
        f"- command: `{result['command']}`",
        f"- tiny model, {result['shape']['size']} ({tokens} image tokens), forward batch {a.batch}, text "
        f"{a.text_tokens} -> {result['shape']['text_tokens_padded']} tokens, {a.iters} interleaved iterations, "
        f"CPU ({os.cpu_count()} cores, shared)",
        "",
        "| measurement | median ms | min ms |", "|---|---:|---:|",
        f"| EngineTransformer.forward | {m['forward']:.3f} | {result['min_ms']['forward']:.3f} |",
        f"| bare runner.infer(feeds) | {m['bare_infer']:.3f} | {result['min_ms']['bare_infer']:.3f} |",
        f"| drop-in's own work (runner stubbed) | {m['own']:.3f} | {result['min_ms']['own']:.3f} |",
        "",
        f"Own work / bare run: **{result['own_fraction']:.2%}** (target <= {TARGET:.0%}: "
        f"{'met' if result['meets_target'] else 'NOT met'}); (forward - bare) / bare: "
        f"{result['difference_fraction']:+.2%} (a difference of two noisy medians).",
    ]
    (out_dir / "dropin_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
