"""Worker process main: load the pipeline once on its device, then run batches sent over a pipe.

Messages to the parent: ("ready", pid), ("fatal", text), ("progress", batch_id, step, total),
("done", batch_id, {request_id: [png bytes, ...]}, compute_s), ("failed", batch_id, kind, text), and ("heartbeat",)
every `heartbeat_s` from a thread of its own, so a stopped or wedged process is told from a busy one.
A batch is a list of dicts (request_id, prompt, negative_prompt, n, seed, true_cfg_scale) sharing one key.
This is the only place the server touches torch or CUDA (spawned process, so CUDA starts here, not in the parent).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import traceback

PROGRESS_INTERVAL_S = 0.05
# Fault injection for the chaos benchmark and the isolation tests: a batch holding a prompt that contains this
# text fails inside the worker as a pipeline error would. Unset (the default), nothing is injected.
FAULT_PROMPT_ENV = "QITRT_INJECT_FAULT_PROMPT"
# ... and one holding this text hangs at its first step while the process stays alive (a wedged GPU).
HANG_PROMPT_ENV = "QITRT_INJECT_HANG_PROMPT"


class InjectedFault(RuntimeError):
    pass


class _Conn:
    """The pipe end, shared by the batch loop and the heartbeat thread: one send at a time."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg) -> None:
        with self.lock:
            self.conn.send(msg)

    def recv(self):
        return self.conn.recv()


def _heartbeat(conn: _Conn, every_s: float) -> None:
    while True:
        time.sleep(every_s)
        try:
            conn.send(("heartbeat",))
        except (OSError, ValueError):  # the parent is gone
            return


class BatchCancelled(Exception):
    pass


def worker_main(conn, device: str, checkpoint: str, engines, backend: str, cpu_threads, cancel,
                dtype: str = "auto", trt_options: dict | None = None, heartbeat_s: float = 1.0) -> None:
    # Ctrl-C reaches the whole process group: the server decides when its workers stop (after the drain), so
    # the worker must not die mid-batch on the terminal's SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = _Conn(conn)
    threading.Thread(target=_heartbeat, args=(conn, heartbeat_s), daemon=True, name="qitrt-heartbeat").start()
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
    fault = os.environ.get(FAULT_PROMPT_ENV)
    if fault and any(fault in it["prompt"] for it in items):
        raise InjectedFault(f"injected fault: a prompt contains {fault!r} (${FAULT_PROMPT_ENV})")
    prompts, negs, scales, gens, owners = [], [], [], [], []
    for it in items:
        for k in range(it["n"]):
            prompts.append(it["prompt"])
            negs.append(it["negative_prompt"])
            scales.append(it["true_cfg_scale"])
            gens.append(torch.Generator("cpu").manual_seed(it["seed"] + k))
            owners.append(it["request_id"])

    last_sent = [0.0]
    hang = os.environ.get(HANG_PROMPT_ENV)
    hang = bool(hang) and any(hang in it["prompt"] for it in items)

    def on_step(_pipe, i, _t, _kwargs):
        # Throttled: each message wakes the server's reader thread and event loop, which compete with
        # the HTTP path for CPU; a person watching a job needs no more than ~20 updates a second.
        while hang:  # the heartbeat thread goes on: only the stall watchdog can tell
            time.sleep(1)
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
