"""Worker process main: load the pipeline once on its device, then run batches sent over a pipe.

Messages to the parent: ("ready", pid), ("fatal", text), ("progress", batch_id, step, total),
("done", batch_id, {request_id: [png bytes, ...]}, compute_s), ("failed", batch_id, kind, text), and ("heartbeat",)
every `heartbeat_s` from a thread of its own, so a stopped or wedged process is told from a busy one.
A batch is a list of dicts (request_id, prompt, negative_prompt, n, seed, true_cfg_scale, images, mask) sharing one
key (width, height, steps, cfg, member, strength, group): text-to-image, img2img and inpaint batch across requests
(one prompt and one input image per output image); the edit members take one prompt per call, so an edit batch is
one request, its n images through num_images_per_prompt.
This is the only place the server touches torch or CUDA (spawned process, so CUDA starts here, not in the parent).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import traceback

from qwen_image_trt.serve.adapters import WorkerAdapters

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
                dtype: str = "auto", trt_options: dict | None = None, heartbeat_s: float = 1.0, lora_dir=None,
                lora_cache_bytes: int = 4 << 30, torch_options=None, embedding_cache_bytes: int = 0,
                remote_encoder: tuple | None = None) -> None:
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
                             threads=threads, trt_options=trt_options, torch_options=torch_options,
                             text_encoder=remote_encoder is None)  # --role denoiser: no local text encoder
        pipe, prepare = prompt_source(pipe, remote_encoder, embedding_cache_bytes)
        pipes = Pipelines(pipe, WorkerAdapters(lora_dir, lora_cache_bytes), prepare)
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
            before = pipes.cache_counts()
            images, compute_s = run_batch(pipes, batch_id, key, items, conn, cancel)
        except BatchCancelled:
            conn.send(("failed", batch_id, "cancelled", "every request of the batch was cancelled"))
            continue
        except Exception as e:  # noqa: BLE001 - one bad batch must not take the worker down
            conn.send(("failed", batch_id, type(e).__name__, f"{type(e).__name__}: {e}"))
            continue
        after = pipes.cache_counts()
        conn.send(("done", batch_id, images, compute_s, {k: after[k] - before[k] for k in after}))


def prompt_source(pipe, remote, cache_bytes: int):
    """Where `pipe`'s prompt embeddings come from: the encoder service (`remote` = (url, api key)) or its own text
    encoder, behind this worker's embedding cache either way (a repeated prompt never leaves the process).
    Returns the Pipelines of this worker, whose other members get the same source."""
    from qwen_image_trt.runtime.embed_cache import EmbeddingCache, cache_prompt_embeddings
    from qwen_image_trt.serve.remote_encoder import remote_prompt_embeddings

    cache = EmbeddingCache(cache_bytes) if cache_bytes else None

    def prepare(p):
        if remote:
            remote_prompt_embeddings(p, *remote)
        if cache is not None:  # one cache for every member
            cache_prompt_embeddings(p, cache)

    prepare(pipe)
    return pipe, prepare


class Pipelines:
    """The checkpoint's own pipeline and, made on first use from the same modules (no second copy of any weight),
    the other members it runs: img2img and inpaint for a text-to-image checkpoint, edit-inpaint for Edit."""

    def __init__(self, pipe, adapters: WorkerAdapters | None = None, prepare=None):
        self.own = pipe
        self.by_kind = {pipe.pipeline_kind: pipe}
        self.adapters = adapters or WorkerAdapters(None, 0)  # shared by the members: they share the transformer
        self.prepare = prepare  # where a member's prompts come from (prompt_source), applied to each one made

    def cache_counts(self) -> dict:
        cache = getattr(self.own, "embedding_cache", None)
        return cache.stats.as_dict() if cache is not None else {}

    def get(self, kind: str):
        if kind not in self.by_kind:
            from qwen_image_trt.runtime.pipeline import engine_pipeline_class

            cls = engine_pipeline_class(kind)
            accepted = set(cls._get_signature_keys(cls)[0])
            made = cls(**{k: v for k, v in self.own.components.items() if k in accepted})
            made.set_progress_bar_config(disable=True)
            made.backend, made.engines, made.pipeline_kind = self.own.backend, self.own.engines, kind
            made.encoder_identity = self.own.encoder_identity
            if self.prepare is not None:
                self.prepare(made)
            self.by_kind[kind] = made
        return self.by_kind[kind]


def _decode(b64: str, mode: str = "RGB"):
    import base64

    from qwen_image_trt.runtime.images import decode_image

    return decode_image(base64.b64decode(b64), "image", mode=mode)  # checked by the server; decoded again here


def run_batch(pipes: Pipelines, batch_id: int, key: tuple, items: list[dict], conn, cancel) -> tuple[dict, float]:
    """One pipeline call for the whole batch; one generator per image so each equals its unbatched twin."""
    import torch

    width, height, steps, cfg, kind, strength, _group, loras, step_cache = key
    pipe = pipes.get(kind)
    pipes.adapters.activate(pipe, loras)  # before the fault check: a broken adapter fails its batch alone
    fault = os.environ.get(FAULT_PROMPT_ENV)
    if fault and any(fault in it["prompt"] for it in items):
        raise InjectedFault(f"injected fault: a prompt contains {fault!r} (${FAULT_PROMPT_ENV})")
    prompts, negs, scales, gens, owners, images, masks = [], [], [], [], [], [], []
    for it in items:
        decoded = [_decode(b) for b in it.get("images") or []]
        mask = _decode(it["mask"], "L") if it.get("mask") else None
        for k in range(it["n"]):
            prompts.append(it["prompt"])
            negs.append(it["negative_prompt"])
            scales.append(it["true_cfg_scale"])
            gens.append(torch.Generator("cpu").manual_seed(it["seed"] + k))
            owners.append(it["request_id"])
            images.append(decoded)
            masks.append(mask)

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
                  callback_on_step_end=on_step, step_cache=step_cache)
    if cfg:
        kwargs.update(negative_prompt=negs, true_cfg_scale=scales)
    else:
        kwargs.update(true_cfg_scale=1.0)
    if kind in ("img2img", "inpaint"):  # one input image (and mask) per output image
        kwargs["image"] = [im[0] for im in images]
        if kind == "inpaint":
            kwargs["mask_image"] = masks
    elif kind == "controlnet":  # requests batch only with the same control image (the batch key's group)
        kwargs["control_image"] = images[0][0]
    elif kind != "text-to-image":  # edit members: one request per call, its images shared by its n outputs
        if len(items) != 1:
            raise ValueError(f"{kind} takes one request per pipeline call, got {len(items)}")
        kwargs.update(prompt=prompts[0], num_images_per_prompt=len(prompts),
                      image=images[0] if kind == "edit-plus" else images[0][0])
        if cfg:
            kwargs.update(negative_prompt=negs[0], true_cfg_scale=scales[0])
        if kind == "edit-inpaint":
            kwargs["mask_image"] = masks[0]
    if strength is not None:
        kwargs["strength"] = strength
    t0 = time.perf_counter()
    out = pipe(**kwargs).images
    compute_s = time.perf_counter() - t0
    results: dict = {it["request_id"]: [] for it in items}
    for owner, image in zip(owners, out):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        results[owner].append(buf.getvalue())
    return results, compute_s
