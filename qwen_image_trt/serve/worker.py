"""Worker process main: load the pipeline once on its device, then run batches sent over a pipe.

Messages to the parent: ("ready", pid), ("fatal", text), ("progress", batch_id, step, total),
("done", batch_id, {request_id: [png bytes, ...]}, compute_s), ("failed", batch_id, kind, text).
A batch is a list of dicts (request_id, prompt, negative_prompt, n, seed, true_cfg_scale) sharing one key.
This is the only place the server touches torch or CUDA (spawned process, so CUDA starts here, not in the parent).
"""

from __future__ import annotations

import io
import os
import time
import traceback

PROGRESS_INTERVAL_S = 0.05


class BatchCancelled(Exception):
    pass


def worker_main(conn, device: str, checkpoint: str, engines, backend: str, cpu_threads, cancel,
                dtype: str = "auto", trt_options: dict | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch

        if device == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)  # see ServerConfig.cpu_threads: CPU workers share the cores
        from qwen_image_trt.runtime.pipeline import load_pipeline

        if dtype == "auto":
            dtype = "bf16" if device.startswith("cuda") else "fp32"
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        threads = cpu_threads if device == "cpu" else None  # ONNX Runtime too: each session would take every core
        pipe = load_pipeline(checkpoint, engines=engines, backend=backend, device=device, dtype=torch_dtype,
                             threads=threads, trt_options=trt_options)
    except BaseException:  # noqa: BLE001 - reported to the parent, which decides whether to retry
        conn.send(("fatal", traceback.format_exc(limit=3)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        batch_id, key, items = msg
        try:
            images, compute_s = run_batch(pipe, batch_id, key, items, conn, cancel)
        except BatchCancelled:
            conn.send(("failed", batch_id, "cancelled", "every request of the batch was cancelled"))
            continue
        except Exception as e:  # noqa: BLE001 - one bad batch must not take the worker down
            conn.send(("failed", batch_id, type(e).__name__, f"{type(e).__name__}: {e}"))
            continue
        conn.send(("done", batch_id, images, compute_s))


def run_batch(pipe, batch_id: int, key: tuple, items: list[dict], conn, cancel) -> tuple[dict, float]:
    """One pipeline call for the whole batch; one generator per image so each equals its unbatched twin."""
    import torch

    width, height, steps, cfg = key
    prompts, negs, scales, gens, owners = [], [], [], [], []
    for it in items:
        for k in range(it["n"]):
            prompts.append(it["prompt"])
            negs.append(it["negative_prompt"])
            scales.append(it["true_cfg_scale"])
            gens.append(torch.Generator("cpu").manual_seed(it["seed"] + k))
            owners.append(it["request_id"])

    last_sent = [0.0]

    def on_step(_pipe, i, _t, _kwargs):
        # Throttled: each message wakes the server's reader thread and event loop, which compete with
        # the HTTP path for CPU; a person watching a job needs no more than ~20 updates a second.
        now = time.monotonic()
        if i + 1 == steps or now - last_sent[0] >= PROGRESS_INTERVAL_S:
            conn.send(("progress", batch_id, i + 1, steps))
            last_sent[0] = now
        if cancel.value == batch_id:
            raise BatchCancelled()
        return {}

    kwargs = dict(prompt=prompts, height=height, width=width, num_inference_steps=steps, generator=gens,
                  callback_on_step_end=on_step)
    if cfg:
        kwargs.update(negative_prompt=negs, true_cfg_scale=scales)
    else:
        kwargs.update(true_cfg_scale=1.0)
    t0 = time.perf_counter()
    out = pipe(**kwargs).images
    compute_s = time.perf_counter() - t0
    results: dict = {it["request_id"]: [] for it in items}
    for owner, image in zip(owners, out):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        results[owner].append(buf.getvalue())
    return results, compute_s
