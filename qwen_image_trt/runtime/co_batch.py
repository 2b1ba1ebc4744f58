"""Co-batching: the transformer forwards of several pipeline calls, each running in its own thread, merged into one
engine call per step.

The edit pipelines take one prompt and its own condition images per call, so requests with different images cannot
share a call. Rather than a denoising loop of our own, each request runs diffusers' own pipeline (its own scheduler,
generator, text encoding and VAE work) in a thread, and the drop-in transformer's forwards meet here: once every
running call has a forward waiting, they go as one batched call (text padded to the longest with its mask, each
sample's own grids, timestep and ControlNet residuals), and each thread gets its rows back. Forwards whose image token
counts differ run as separate engine calls of the same round. A call that ends or fails leaves, so the others never
wait for it. What stays per request is exactly what the pipeline computes; only the engine's batch grows.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Forward arguments the merge knows how to concatenate (attention_kwargs: the engine takes none, the drop-in ignores
# them); anything else set makes a forward run on its own, where the drop-in refuses it by name.
_BATCHED = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes",
            "controlnet_block_samples", "attention_kwargs")


class CoBatcher:
    """Collects forwards from `parties` threads; the thread whose forward completes a round runs it for everyone."""

    def __init__(self, forward, parties: int, run_round=None):
        self._forward = forward  # (**kwargs) -> noise prediction tensor, the drop-in's own forward
        self._run_round = run_round or run_merged  # (forward, {ticket: kwargs}) -> (results, forwards per call)
        self._cond = threading.Condition(threading.Lock())
        self._active = parties
        self._pending: dict[int, dict] = {}
        self._done: dict[int, object] = {}
        self._running = False
        self._tickets = 0
        self.rounds = 0  # rounds run, and the forwards they carried: forwards / rounds = co-batch size
        self.forwards = 0
        self.engine_calls: list[tuple[int, ...]] = []  # per round: forwards in each engine call, largest first

    def submit(self, kwargs: dict) -> torch.Tensor:
        with self._cond:
            ticket, self._tickets = self._tickets, self._tickets + 1
            self._pending[ticket] = kwargs
            while ticket not in self._done:
                if not self._running and self._pending and len(self._pending) >= self._active:
                    self._lead()
                else:
                    self._cond.wait()
            result = self._done.pop(ticket)
        if isinstance(result, BaseException):
            raise result
        return result

    def leave(self) -> None:
        """A pipeline call ended (or failed): later rounds no longer wait for it."""
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _lead(self) -> None:
        """Run the pending forwards (called with the lock held; released while the engine runs)."""
        batch, self._pending, self._running = self._pending, {}, True
        self._cond.release()
        try:
            results, calls = self._run_round(self._forward, batch)
        finally:
            self._cond.acquire()
            self._running = False
        self.rounds += 1
        self.forwards += len(batch)
        self.engine_calls.append(calls)
        self._done.update(results)
        self._cond.notify_all()


def run_merged(forward, calls: dict[int, dict]) -> tuple[dict[int, object], tuple[int, ...]]:
    """{ticket: kwargs} -> ({ticket: output or exception}, forwards per engine call): forwards with equal image token
    counts (and both with or without ControlNet residuals) in one call, the others on their own."""
    groups: dict[tuple, list[int]] = {}
    for ticket, kw in calls.items():
        alone = any(v is not None for k, v in kw.items() if k not in _BATCHED)
        key = ("alone", ticket) if alone else (kw["hidden_states"].shape[1], kw.get("controlnet_block_samples") is None)
        groups.setdefault(key, []).append(ticket)
    results: dict[int, object] = {}
    for tickets in groups.values():
        try:
            if len(tickets) == 1:
                results[tickets[0]] = forward(**calls[tickets[0]])
                continue
            merged, sizes = merge_forwards([calls[t] for t in tickets])
            out = forward(**merged)
            for ticket, part in zip(tickets, torch.split(out, sizes)):
                results[ticket] = part
        except Exception as e:  # noqa: BLE001 - handed to every thread whose forward it was
            for ticket in tickets:
                results[ticket] = e
    return results, tuple(sorted((len(t) for t in groups.values()), reverse=True))


def merge_forwards(calls: list[dict]) -> tuple[dict, list[int]]:
    """Concatenate forwards on the batch axis: text padded to the longest (the mask hides the padding), per-sample
    img_shapes and timesteps, residuals per block. Returns the merged kwargs and each forward's batch size."""
    sizes = [kw["hidden_states"].shape[0] for kw in calls]
    length = max(kw["encoder_hidden_states"].shape[1] for kw in calls)
    texts, masks, steps, shapes = [], [], [], []
    for kw, n in zip(calls, sizes):
        text = kw["encoder_hidden_states"]
        pad = length - text.shape[1]
        mask = kw.get("encoder_hidden_states_mask")
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if mask is None else mask.bool()
        texts.append(torch.nn.functional.pad(text, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
        t = torch.as_tensor(kw["timestep"], device=text.device).reshape(-1)
        steps.append(t.expand(n) if t.numel() == 1 else t)
        img_shapes = list(kw["img_shapes"])
        shapes += img_shapes * n if len(img_shapes) == 1 and n > 1 else img_shapes
    merged = dict(hidden_states=torch.cat([kw["hidden_states"] for kw in calls]), encoder_hidden_states=torch.cat(texts),
                  encoder_hidden_states_mask=torch.cat(masks), timestep=torch.cat(steps), img_shapes=shapes)
    if calls[0].get("controlnet_block_samples") is not None:
        blocks = zip(*[kw["controlnet_block_samples"] for kw in calls])
        merged["controlnet_block_samples"] = [torch.cat(per_block) for per_block in blocks]
    return merged, sizes


@contextlib.contextmanager
def co_batching(transformer, parties: int):
    """While open, `transformer`'s forwards from `parties` threads are merged (the drop-in reads `co_batcher`)."""
    if getattr(transformer, "co_batcher", None) is not None:
        raise RuntimeError("this transformer is already co-batching another set of pipeline calls")
    batcher = CoBatcher(transformer.forward_tensor, parties, getattr(transformer, "co_batch_round", None))
    transformer.co_batcher = batcher
    try:
        yield batcher
    finally:
        transformer.co_batcher = None
        if hasattr(transformer, "co_batch_done"):
            transformer.co_batch_done()


def pipeline_copy(pipe):
    """A second handle on `pipe` for a concurrent call: the same modules, its own scheduler (which keeps the step
    index and sigmas of one call) and its own call state (`_guidance_scale`, `_interrupt`, ... live on the object)."""
    twin = copy.copy(pipe)
    twin.__dict__["scheduler"] = copy.deepcopy(pipe.scheduler)
    return twin


def can_co_batch(pipe) -> bool:
    """A drop-in with a co-batching forward, in a pipeline whose copies keep their own call state (the 2.1-Turbo
    modular pipeline shares its scheduler component between copies: `co_batchable` False)."""
    return hasattr(pipe.transformer, "forward_tensor") and getattr(pipe, "co_batchable", True)


def call_together(pipe, calls: list[dict]) -> tuple[list, CoBatcher | None]:
    """Run `pipe(**kwargs)` for each of `calls` concurrently with their transformer forwards co-batched; returns the
    outputs in order (the first exception raised, once every call has ended) and the batcher (its counts)."""
    if len(calls) == 1 or not can_co_batch(pipe):
        return [pipe(**kw) for kw in calls], None
    handles = [pipe] + [pipeline_copy(pipe) for _ in calls[1:]]
    with co_batching(pipe.transformer, len(calls)) as batcher:
        def one(handle, kwargs):
            try:
                return handle(**kwargs)
            finally:
                batcher.leave()

        with ThreadPoolExecutor(len(calls), thread_name_prefix="qitrt-cobatch") as pool:
            futures = [pool.submit(one, h, kw) for h, kw in zip(handles, calls)]
            outs, error = [], None
            for f in futures:
                try:
                    outs.append(f.result())
                except BaseException as e:  # noqa: BLE001 - the first one is raised after all have ended
                    error = error or e
                    outs.append(None)
    if error is not None:
        raise error
    return outs, batcher
