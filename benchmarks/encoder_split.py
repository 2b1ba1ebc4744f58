"""The text encoder in process, as a service, and behind a warm embedding cache: measured on the tiny model, predicted
for the real one.

1. Real Qwen-Image (text encoder Qwen2.5-VL-7B's language tower, transformer 60 blocks), from shapes: the encoder's
   FLOPs and weight bytes for one request (prompt + negative, ~100 tokens each with the template), its floor on an
   H100 SXM beside the transformer's per-step floor at 1024^2 with CFG, and so its share of a 4-, 8- and 50-step
   image; and the bytes one request moves from encoder to denoiser (bf16 embeddings, as safetensors).
2. Measured here (tiny checkpoint, 2-core CPU): images/s of a closed loop (concurrency 2, 64x64, 2 steps, CFG) for
   three set-ups, `qitrt serve` with one CPU worker each:
   - in process, no cache (`--embedding-cache-bytes 0`): the text encoder runs for every prompt;
   - in process with the cache (the default);
   - split: `--role encoder` + `--role denoiser --encoder-url` (the denoiser keeps its own cache, as deployed);
   at 0%, 50% and 90% of requests repeating an earlier prompt; plus the bytes of one /v1/encode answer.

    python benchmarks/encoder_split.py [--requests 24] [--out benchmarks/results]

Writes encoder_split.json and encoder_split.md. The tiny text encoder is tiny: locally the split costs an HTTP hop
and saves little; the real-model table is where the encoder's share shows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

PROMPT_TOKENS = 100  # template (34, dropped after encoding) + a typical prompt; the embedding keeps ~66


def real_rows() -> dict:
    from qwen_image_trt.core.gpus import PEAKS
    from qwen_image_trt.models import flops
    from qwen_image_trt.models.tiny import REAL_TEXT_ENCODER, real_transformer_config

    t = REAL_TEXT_ENCODER["text"]
    d, inter, layers, kv = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["num_key_value_heads"]
    head = d // t["num_attention_heads"]
    per_layer = d * d * 2 + 2 * d * kv * head + 3 * d * inter  # q, o; k, v (GQA); gate, up, down
    params = layers * per_layer + t["vocab_size"] * d  # embeddings read once per token (a gather), counted as bytes
    tokens = 2 * PROMPT_TOKENS  # prompt and negative, one batched call
    enc_flops = 2.0 * layers * per_layer * tokens + 4.0 * layers * PROMPT_TOKENS ** 2 * d * 2
    enc_bytes = 2.0 * layers * per_layer  # bf16 weights, read once for the batch of two
    gpu = PEAKS["H100 SXM"]
    enc_floor = max(enc_flops / gpu.peak_flops("bf16"), enc_bytes / gpu.bytes_per_s)
    step = flops.per_step(real_transformer_config(60), 1024, 1024, PROMPT_TOKENS - 34)
    step_floor = step.floor_seconds(gpu.peak_flops("bf16"), gpu.bytes_per_s)
    embed_bytes = 2 * (PROMPT_TOKENS - 34) * d * 2 + 2 * (PROMPT_TOKENS - 34) * 8  # bf16 embeds + int64 mask
    return {"gpu": gpu.name, "encoder_params": params, "encoder_tflop": enc_flops / 1e12, "encoder_gb": enc_bytes / 1e9,
            "encoder_floor_s": enc_floor, "step_floor_s": step_floor, "embedding_bytes_per_request": embed_bytes,
            "share": {steps: enc_floor / (enc_floor + steps * step_floor) for steps in (4, 8, 50)},
            "sglang_h100_anchor": "text encoder 0.23 s, 248 ms per CFG step (SGLang's H100 profile, 50 steps 12.8 s)",
            "share_at_anchor": {steps: 0.23 / (0.23 + steps * 0.248) for steps in (4, 8, 50)}}


def prompts_for(n: int, repeat: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    seen, out = [], []
    for i in range(n):
        if seen and rng.random() < repeat:
            out.append(rng.choice(seen))
        else:
            p = f"prompt {seed}-{i}: a {rng.choice(['red', 'blue', 'green'])} fox in {rng.choice(['snow', 'rain'])}"
            seen.append(p)
            out.append(p)
    return out


async def closed_loop(url: str, prompts: list[str], concurrency: int = 2) -> float:
    import httpx

    queue = list(enumerate(prompts))

    async def worker(client):
        while queue:
            i, p = queue.pop(0)
            r = await client.post(url + "/v1/images/generations", json={
                "prompt": p, "negative_prompt": "blurry", "seed": i, "size": "64x64", "num_inference_steps": 2})
            r.raise_for_status()

    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        return len(prompts) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)

    import httpx

    from qwen_image_trt.bench.serve_load import ServerProcess
    from qwen_image_trt.models.tiny import make_tiny_checkpoint

    rows, encode_bytes = [], None
    common = ["--devices", "cpu", "--default-size", "64x64", "--max-queue-delay-ms", "5"]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(Path(tmp) / "tiny"))
        setups = [("in process, no cache", [["--embedding-cache-bytes", "0"]]),
                  ("in process, cache", [[]]),
                  ("split: encoder service + denoiser", [["--role", "encoder"], ["--role", "denoiser"]])]
        for name, roles in setups:
            servers = []
            for args in roles:
                if args[:2] == ["--role", "denoiser"]:
                    args = args + ["--encoder-url", servers[0].url]
                servers.append(ServerProcess(ckpt, common + args, log_path=Path(tmp) / f"{len(rows)}.log").start())
            front = servers[-1]
            try:
                if roles[0][:2] == ["--role", "encoder"]:
                    r = httpx.post(servers[0].url + "/v1/encode", json={"prompts": ["a red fox in snow", "blurry"]})
                    encode_bytes = len(r.content)
                closed_loop_warm = asyncio.run(closed_loop(front.url, [f"warm-up {i}" for i in range(8)]))
                del closed_loop_warm
                for k, repeat in enumerate((0.0, 0.5, 0.9)):
                    ips = asyncio.run(closed_loop(front.url, prompts_for(a.requests, repeat, seed=100 * len(rows) + k)))
                    rows.append({"setup": name, "repeated": repeat, "images_per_s": round(ips, 2)})
                    print(f"{name:36s} repeated {repeat:.0%}: {ips:.2f} images/s", flush=True)
            finally:
                for s in reversed(servers):
                    s.stop()
    result = {"command": "python benchmarks/encoder_split.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "encode_bytes_tiny_request": encode_bytes,
              "real_model": real_rows()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoder_split.json").write_text(json.dumps(result, indent=2) + "\n")
    real = result["real_model"]
    lines = ["# Text encoder in process, as a service, behind a cache", "",
             f"`{result['command']}` on {result['machine']['processor']} (2 cores), {result['date']}. Closed loop, "
             f"concurrency 2, {a.requests} requests per row, 64x64, 2 steps, CFG, one CPU worker per server.", "",
             "| set-up | repeated prompts | images/s |", "|---|---|---|"]
    lines += [f"| {r['setup']} | {r['repeated']:.0%} | {r['images_per_s']} |" for r in rows]
    lines += ["", f"One /v1/encode answer for a tiny request (prompt + negative): {encode_bytes} bytes of safetensors.",
              "", f"## Real model, from shapes ({real['gpu']} datasheet floors)", "",
              f"- text encoder: {real['encoder_params'] / 1e9:.2f} B params, {real['encoder_tflop']:.2f} TFLOP and "
              f"{real['encoder_gb']:.1f} GB of weights per request (prompt + negative, {PROMPT_TOKENS} tokens each): "
              f"floor {real['encoder_floor_s'] * 1e3:.1f} ms",
              f"- transformer step at 1024^2 with CFG: floor {real['step_floor_s'] * 1e3:.0f} ms",
              "- encoder share of an image at the floors: " + ", ".join(
                  f"{s} steps {v:.2%}" for s, v in real["share"].items()),
              f"- bytes per request between roles: {real['embedding_bytes_per_request'] / 1e6:.2f} MB (bf16 embeddings "
              "+ mask)", f"- measured anchor: {real['sglang_h100_anchor']}; the encoder runs ~60x its floor there "
              "(small batches of ~100 tokens are latency-bound), so its share of an image is: " + ", ".join(
                  f"{s} steps {v:.1%}" for s, v in real["share_at_anchor"].items())
              + ". That share is what the split role takes off the transformer GPUs and the cache removes for "
              "repeated prompts."]
    (out / "encoder_split.md").write_text("\n".join(lines) + "\n")
    print(out / "encoder_split.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
