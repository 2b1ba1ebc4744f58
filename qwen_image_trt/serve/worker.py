"""Worker process main: load the pipeline once on its device, then run batches sent over a pipe.

Messages to the parent: ("ready", pid), ("fatal", text), ("progress", batch_id, step, total),
("done", batch_id, {request_id: [png bytes, ...]}, compute_s), ("failed", batch_id, kind, text), and ("heartbeat",)
every `heartbeat_s` from a thread of its own, so a stopped or wedged process is told from a busy one.
A batch is a list of dicts (request_id, prompt, negative_prompt, n, seed, true_cfg_scale, images, mask) sharing one
key (width, height, steps, cfg, member, strength, group, ...): text-to-image, img2img, inpaint and ControlNet batch
across requests in one pipeline call (one prompt, input image and control image per output image); the edit members
take one prompt and its condition images per call, so each request of an edit batch runs its own call, its n images
through num_images_per_prompt, and those calls share one engine call per step (runtime.co_batch); `group` (the
condition images' resized sizes) makes them agree on image tokens.
This is the only place the server touches torch or CUDA (spawned process, so CUDA starts here, not in the parent).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import traceback

from qwen_image_trt.models.pipelines import QWEN21_MEMBERS
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
    """One pipeline call for the whole batch (the edit members: one call per request, their transformer forwards
    co-batched into one engine call per step); one generator per image so each equals its unbatched twin."""
    from qwen_image_trt.runtime.co_batch import call_together

    width, height, steps, cfg, kind, strength, _group, loras, step_cache, control_scale = key
    pipe = pipes.get(kind)
    pipes.adapters.activate(pipe, loras)  # before the fault check: a broken adapter fails its batch alone
    fault = os.environ.get(FAULT_PROMPT_ENV)
    if fault and any(fault in it["prompt"] for it in items):
        raise InjectedFault(f"injected fault: a prompt contains {fault!r} (${FAULT_PROMPT_ENV})")
    progress, lock = [0, 0.0], threading.Lock()
    hang = os.environ.get(HANG_PROMPT_ENV)
    hang = bool(hang) and any(hang in it["prompt"] for it in items)

    def on_step(_pipe, i, _t, _kwargs):
        # Throttled: each message wakes the server's reader thread and event loop, which compete with
        # the HTTP path for CPU; a person watching a job needs no more than ~20 updates a second. Co-batched
        # calls reach each step together: the first to get there reports it.
        while hang:  # the heartbeat thread goes on: only the stall watchdog can tell
            time.sleep(1)
        with lock:
            now = time.monotonic()
            if i + 1 > progress[0] and (i + 1 == steps or now - progress[1] >= PROGRESS_INTERVAL_S):
                conn.send(("progress", batch_id, i + 1, steps))
                progress[:] = [i + 1, now]
        if cancel.value == batch_id:
            raise BatchCancelled()
        return {}

    common = dict(height=height, width=width, num_inference_steps=steps, callback_on_step_end=on_step,
                  step_cache=step_cache)
    if strength is not None:
        common["strength"] = strength
    if control_scale is not None:
        common["controlnet_conditioning_scale"] = control_scale
    if kind in QWEN21_MEMBERS:
        calls, owners = _calls_21(pipe, kind, items, cfg, common)
    elif kind in ("text-to-image", "img2img", "inpaint", "controlnet"):
        calls, owners = [_one_call(kind, items, cfg, common)], [it["request_id"] for it in items for _ in range(it["n"])]
    else:  # edit members: one prompt and its own condition images per call, so a call per request
        calls = [_edit_call(kind, it, cfg, common) for it in items]
        owners = [it["request_id"] for it in items for _ in range(it["n"])]
    t0 = time.perf_counter()
    if step_cache is None:
        outs, _ = call_together(pipe, calls)
    else:  # the step cache keeps per-call state on the shared transformer: those calls run one after another
        outs = [pipe(**kw) for kw in calls]
    compute_s = time.perf_counter() - t0
    results: dict = {it["request_id"]: [] for it in items}
    for owner, image in zip(owners, [im for out in outs for im in out.images]):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        results[owner].append(buf.getvalue())
    return results, compute_s


def _generators(it: dict) -> list:
    import torch

    return [torch.Generator("cpu").manual_seed(it["seed"] + k) for k in range(it["n"])]


def _one_call(kind: str, items: list[dict], cfg: bool, common: dict) -> dict:
    """The kwargs of one pipeline call for every image of `items`: one prompt (and input image, mask, control image)
    per output image."""
    per_image = [(it, k) for it in items for k in range(it["n"])]
    call = dict(common, prompt=[it["prompt"] for it, _ in per_image],
                generator=[g for it in items for g in _generators(it)])
    if cfg:
        call.update(negative_prompt=[it["negative_prompt"] for it, _ in per_image],
                    true_cfg_scale=[it["true_cfg_scale"] for it, _ in per_image])
    else:
        call["true_cfg_scale"] = 1.0
    if kind != "text-to-image":
        decoded = {it["request_id"]: _decode(it["images"][0]) for it in items}
        images = [decoded[it["request_id"]] for it, _ in per_image]
        if kind == "controlnet":  # one control image per output image (diffusers' ControlNet pipelines take a batch)
            call["control_image"] = images
        else:
            call["image"] = images
        if kind == "inpaint":
            masks = {it["request_id"]: _decode(it["mask"], "L") for it in items}
            call["mask_image"] = [masks[it["request_id"]] for it, _ in per_image]
    return call


def _calls_21(pipe, kind: str, items: list[dict], cfg: bool, common: dict) -> tuple[list[dict], list]:
    """Qwen-Image-2.1's calls for a batch, and the request each output image belongs to.

    Its pipeline takes a list of prompts but one set of condition images for all of them, and pads the prompts of
    a call to the longest, which in 2.1 moves every later token's RoPE position (the image's too): so requests share
    a pipeline call only when they have no condition images and their prompts (and negative prompts) have equal token
    counts; each image is one prompt of the call with its own generator, so each equals its request run alone. A
    request with condition images is a call of its own (its n images share them). The calls then run concurrently
    with their engine calls co-batched (runtime.co_batch21: after the first step, one cached call per step for all of
    them, CFG branches included). Turbo runs without guidance and reports no steps (the modular pipeline has no step
    callback); its calls run one after another."""
    common = {k: v for k, v in common.items() if k != "step_cache"}
    if kind.endswith("turbo"):
        common = {k: v for k, v in common.items() if k not in ("callback_on_step_end", "num_inference_steps")}
    if any(it["images"] for it in items):
        from qwen_image_trt.core.shapes import condition_resolution

        common["output_resolution"] = condition_resolution(common["height"], common["width"])
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        key = ("request", it["request_id"]) if it["images"] else (
            prompt_tokens_21(pipe, it["prompt"]), prompt_tokens_21(pipe, it["negative_prompt"]) if cfg else None)
        groups.setdefault(key, []).append(it)
    calls, owners = [], []
    for group in groups.values():
        per_image = [it for it in group for _ in range(it["n"])]
        call = dict(common, prompt=[it["prompt"] for it in per_image],
                    generator=[g for it in group for g in _generators(it)])
        if group[0]["images"]:
            call["image"] = [_decode(b) for b in group[0]["images"]]
        if cfg:
            call.update(negative_prompt=[it["negative_prompt"] for it in per_image],
                        true_cfg_scale=group[0]["true_cfg_scale"])
        elif not kind.endswith("turbo"):
            call["true_cfg_scale"] = 1.0
        calls.append(call)
        owners += [it["request_id"] for it in per_image]
    return calls, owners


def prompt_tokens_21(pipe, prompt: str) -> int:
    """Tokens of `prompt` in the 2.1 text-to-image chat template (what the text encoder sees; Turbo's modular
    pipeline has no template attribute: the prompt alone, between the template's special tokens): prompts with equal
    counts share a call unpadded."""
    text = prompt or " "
    template = getattr(pipe, "prompt_template_t2i", None)
    return len(pipe.processor.tokenizer(template.format(text) if template else text).input_ids)


def _edit_call(kind: str, it: dict, cfg: bool, common: dict) -> dict:
    """The kwargs of one edit request's pipeline call: its prompt and condition images, its n images through
    num_images_per_prompt."""
    decoded = [_decode(b) for b in it["images"]]
    call = dict(common, prompt=it["prompt"], num_images_per_prompt=it["n"], generator=_generators(it),
                image=decoded if kind == "edit-plus" else decoded[0])
    if cfg:
        call.update(negative_prompt=it["negative_prompt"], true_cfg_scale=it["true_cfg_scale"])
    else:
        call["true_cfg_scale"] = 1.0
    if kind == "edit-inpaint":
        call["mask_image"] = _decode(it["mask"], "L")
    return call
