"""What switching a LoRA costs: measured per backend on the tiny model, and the bytes a switch moves for the real one.

1. Real Qwen-Image transformer (60 blocks, width 3072, MLP 12288), from its shapes: the Linear weights a LoRA
   touches for three usual target sets, in bf16 (what an ONNX Runtime initializer swap or a TensorRT refit writes),
   against the LoRA's own factors at rank 32 (what diffusers' PEFT path keeps), and the floor of one switch at the
   H100's HBM bandwidth and at PCIe Gen5 x16 (~55 GB/s host -> device, the path a refit's host weights take).
2. Measured here (tiny checkpoint, fp32, this machine's CPU), median of --repeat runs, per backend:
   - load: `load_lora_weights` of one adapter (read through diffusers, weights applied);
   - switch: `set_adapters` from one adapter to another, plus the first transformer forward after it, minus a
     steady forward (ONNX Runtime makes its session again with the new initializers at that first forward);
   - forward: a steady transformer forward (CFG batch 2, 64x64), for scale.

    python benchmarks/lora_switch.py [--repeat 5] [--out benchmarks/results]

Writes lora_switch.json and lora_switch.md.
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

PCIE_GEN5_BYTES_PER_S = 55e9  # effective host -> device copy rate of a PCIe Gen5 x16 link
RANK = 32


def real_rows() -> list[dict]:
    from qwen_image_trt.core.gpus import PEAKS
    from qwen_image_trt.models.tiny import real_transformer_config

    cfg = real_transformer_config(60)
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * d
    attention = [(d, d)] * 8  # to_q/k/v/out and add_q/k/v/to_add_out
    mlps = [(mlp, d), (d, mlp)] * 2  # img_mlp and txt_mlp
    modulation = [(6 * d, d)] * 2  # img_mod.1 and txt_mod.1
    hbm = PEAKS["H100 SXM"].bytes_per_s
    rows = []
    for label, shapes in (("attention (both streams)", attention), ("attention + MLPs", attention + mlps),
                          ("attention + MLPs + modulation", attention + mlps + modulation)):
        params = cfg["num_layers"] * sum(o * i for o, i in shapes)
        factors = cfg["num_layers"] * sum(RANK * (o + i) for o, i in shapes)
        merged = 2 * params  # bf16
        rows.append({"targets": label, "linears": cfg["num_layers"] * len(shapes), "merged_bytes": merged,
                     "factor_bytes_rank32": 2 * factors, "hbm_floor_s": merged / hbm,
                     "pcie_floor_s": merged / PCIE_GEN5_BYTES_PER_S})
    return rows


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measured_rows(repeat: int) -> list[dict]:
    import torch

    from qwen_image_trt import load_pipeline
    from qwen_image_trt.compile.export import export_onnx
    from qwen_image_trt.models.tiny import make_tiny_checkpoint, make_tiny_lora
    from qwen_image_trt.models.transformer_export import sample_inputs

    work = Path(tempfile.mkdtemp(prefix="qitrt-lora-bench-"))
    root = make_tiny_checkpoint(work / "ckpt")
    engines = work / "engines"
    print("exporting the tiny checkpoint (~40 s)...", file=sys.stderr)
    export_onnx(root, engines, precision="fp32", components=("transformer", "vae_decoder"), progress=False)
    files = [make_tiny_lora(root, work / f"lora{i}.safetensors", fmt="kohya", seed=i) for i in range(2)]
    config = json.loads((root / "transformer" / "config.json").read_text())
    hidden, text, mask, timestep = sample_inputs(config, batch=2, grid=(4, 4), text_len=16)[:4]
    img_shapes = [[(1, 4, 4)]] * 2

    rows = []
    for backend in ("onnxruntime", "torch"):
        pipe = load_pipeline(root, engines=engines if backend != "torch" else None, backend=backend)

        def forward():
            with torch.no_grad():
                pipe.transformer(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                                 timestep=timestep, img_shapes=img_shapes, return_dict=False)

        forward()
        steady = _median(forward, repeat)
        loads = []
        for i in range(repeat):
            names = [f"a{i}", f"b{i}"]
            t0 = time.perf_counter()
            pipe.load_lora_weights(str(files[0]), adapter_name=names[0])
            forward()
            loads.append(time.perf_counter() - t0 - steady)
            pipe.load_lora_weights(str(files[1]), adapter_name=names[1])
            forward()
            switches = []
            for k in range(4):
                t0 = time.perf_counter()
                pipe.set_adapters([names[k % 2]], [0.8])
                forward()
                switches.append(time.perf_counter() - t0 - steady)
            pipe.unload_lora_weights()
        rows.append({"backend": backend, "forward_s": steady, "load_s": statistics.median(loads),
                     "switch_s": statistics.median(switches)})
        print(rows[-1], file=sys.stderr)
    return rows


def write(out: Path, real: list[dict], measured: list[dict], repeat: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {platform.system()}, CPU only"
    (out / "lora_switch.json").write_text(json.dumps({"machine": machine, "repeat": repeat, "real_model": real,
                                                      "tiny_measured": measured}, indent=2) + "\n")
    lines = ["# LoRA switch cost", "", "`python benchmarks/lora_switch.py` on " + machine + f", median of {repeat}.",
             "", "## Real Qwen-Image transformer (from shapes): what one adapter switch writes", "",
             f"| LoRA targets | Linears | merged weights (bf16) | factors, rank {RANK} | H100 HBM floor | "
             "PCIe Gen5 floor |", "|---|---|---|---|---|---|"]
    for r in real:
        lines.append(f"| {r['targets']} | {r['linears']} | {r['merged_bytes'] / 1e9:.1f} GB | "
                     f"{r['factor_bytes_rank32'] / 1e6:.0f} MB | {r['hbm_floor_s'] * 1e3:.1f} ms | "
                     f"{r['pcie_floor_s']:.2f} s |")
    lines += ["", "An engine switch writes merged weights (an ONNX Runtime initializer swap, a TensorRT refit); "
              "PEFT's eager path keeps the factors and pays for them at every forward instead.", "",
              "## Tiny model (fp32, this CPU)", "", "| backend | steady forward | load one adapter | switch adapters |",
              "|---|---|---|---|"]
    for r in measured:
        lines.append(f"| {r['backend']} | {r['forward_s'] * 1e3:.1f} ms | {r['load_s'] * 1e3:.1f} ms | "
                     f"{r['switch_s'] * 1e3:.1f} ms |")
    lines += ["", "load and switch exclude one steady forward: they are what the adapter change adds to the next call "
              "(ONNX Runtime: merged weights computed, session made again; torch: PEFT layers injected or "
              "re-scaled)."]
    (out / "lora_switch.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    write(Path(a.out), real_rows(), measured_rows(a.repeat), a.repeat)
    print(Path(a.out) / "lora_switch.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
