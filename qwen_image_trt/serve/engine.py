"""Engine: owns the batcher and the executor; one future per request, timeouts, cancellation, re-queueing.

The HTTP layer only calls `accept`, `result`, `cancel`, `job`, `health` (vLLM's EngineClient split). Every
accepted request ends exactly once in `_finish`: an image, or a ServeError with an HTTP status and a message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from qwen_image_trt.serve.batcher import Batcher, Item, QueueFull
from qwen_image_trt.serve.config import DEFAULT_MAX_BATCH, ServerConfig
from qwen_image_trt.serve.executor import Executor, WorkerHandle
from qwen_image_trt.serve.metrics import ServeMetrics
from qwen_image_trt.serve.protocol import GenParams

log = logging.getLogger(__name__)
MAX_FINISHED_JOBS = 1000


class ServeError(Exception):
    def __init__(self, status: int, type_: str, message: str, retry_after: int | None = None):
        self.status, self.type, self.message, self.retry_after = status, type_, message, retry_after
        super().__init__(message)


@dataclass(eq=False)
class RequestState:
    params: GenParams
    future: asyncio.Future
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    item: Item | None = None
    attempts: int = 0
    step: int = 0
    images: list[bytes] | None = None
    error: ServeError | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_images: int = 0
    worker: int | None = None
    finished_at: float | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


@dataclass(eq=False)
class Batch:
    id: int
    key: tuple
    requests: list[RequestState]
    worker: WorkerHandle


class Engine:
    def __init__(self, cfg: ServerConfig, limits, metrics: ServeMetrics | None = None):
        self.cfg, self.limits = cfg, limits
        self.metrics = metrics or ServeMetrics()
        self.batcher = Batcher(lambda key: self.max_images(key[3]), cfg.max_queue_delay_ms / 1000,
                               cfg.max_queue_size)
        self.executor = Executor(cfg, self._on_message, self._on_death)
        self.jobs: dict[str, RequestState] = {}
        self.closing = False
        self._batch_ids = itertools.count()
        self._capacity = asyncio.Event()
        self._avg_batch_s = 1.0
        self._task: asyncio.Task | None = None

    def max_images(self, cfg_on: bool) -> int:
        """Images per pipeline call: the flag, capped by the engine's limits. `limits.batch` counts images
        (requests' images), not CFG branches: the profile builder already doubled it for CFG."""
        profile = self.limits.batch[1]
        want = self.cfg.max_batch_size or min(profile, DEFAULT_MAX_BATCH)
        return max(1, min(want, profile))

    async def start(self) -> None:
        self.executor.start()
        self._task = asyncio.create_task(self._dispatch_loop(), name="qitrt-dispatch")

    # ---- requests --------------------------------------------------------------------------------------
    def accept(self, params: GenParams, job: bool = False) -> RequestState:
        if self.closing:
            raise ServeError(503, "unavailable", "the server is shutting down")
        if self.executor.all_gave_up():
            raise ServeError(503, "unavailable", "no worker could load the pipeline; see /health")
        st = RequestState(params, asyncio.get_running_loop().create_future())
        st.item = Item(params.key, params.n, params.priority, payload=st)
        try:
            self.batcher.submit(st.item)
        except QueueFull as e:
            raise ServeError(429, "queue_full", f"{e}; retry later", retry_after=self.retry_after()) from None
        st.timer = asyncio.get_running_loop().call_later(params.timeout_s, self._expire, st)
        if job:
            self._purge_jobs()
            self.jobs[st.id] = st
        return st

    async def result(self, st: RequestState) -> RequestState:
        """Wait for `st` to finish (its timeout bounds the wait); raises its ServeError."""
        try:
            await asyncio.shield(st.future)
        except asyncio.CancelledError:  # the client went away or the server stops: free the slot
            self.cancel(st, "the client disconnected")
            raise
        if st.error:
            raise st.error
        return st

    def cancel(self, st: RequestState, why: str = "cancelled by the client") -> None:
        if st.done:
            return
        if st.status == "queued":
            self.batcher.remove(st.item)
        self._finish(st, "cancelled", error=ServeError(409, "cancelled", why))

    def job(self, job_id: str) -> RequestState:
        self._purge_jobs()  # on reads too: an idle server must not serve results past their TTL
        st = self.jobs.get(job_id)
        if st is None:
            raise ServeError(404, "not_found", f"no job {job_id!r} (unknown, deleted, or expired)")
        return st

    def job_status(self, st: RequestState) -> dict:
        out = {"id": st.id, "status": st.status, "created": int(st.created), "n": st.params.n,
               "queue_position": self.batcher.position(st.item) if st.status == "queued" else None,
               "progress": {"step": st.step, "total": st.params.steps},
               "attempts": st.attempts + 1, "seed": st.params.seed}
        if st.done:
            out.update(queue_time_s=round(st.queue_s, 6), compute_time_s=round(st.compute_s, 6),
                       batch_images=st.batch_images, worker=st.worker)
        if st.error:
            out["error"] = {"type": st.error.type, "message": st.error.message}
        return out

    def delete_job(self, st: RequestState) -> None:
        if not st.done:
            self.cancel(st)
        else:
            self.jobs.pop(st.id, None)

    def _purge_jobs(self) -> None:
        now = time.time()
        done = [s for s in self.jobs.values() if s.done]
        for s in done:
            if now - s.finished_at > self.cfg.job_ttl_s:
                del self.jobs[s.id]
        for s in sorted(done, key=lambda s: s.finished_at)[:max(0, len(done) - MAX_FINISHED_JOBS)]:
            self.jobs.pop(s.id, None)

    def retry_after(self) -> int:
        ready = max(1, sum(w.ready for w in self.executor.workers))
        batches = len(self.batcher) / (ready * self.max_images(False))
        return max(1, math.ceil(batches * self._avg_batch_s))

    def _expire(self, st: RequestState) -> None:
        if st.done:
            return
        if st.status == "queued":
            self.batcher.remove(st.item)
        self._finish(st, "failed", error=ServeError(
            504, "timeout", f"not finished within its timeout of {st.params.timeout_s:g} s (was {st.status})"))

    def _finish(self, st: RequestState, status: str, images=None, error: ServeError | None = None) -> None:
        st.status, st.images, st.error, st.finished_at = status, images, error, time.time()
        if st.timer:
            st.timer.cancel()
        if not st.future.done():
            st.future.set_result(st)
        # a batch whose every request is gone (timed out, cancelled) is stopped at the next step
        for w in self.executor.workers:
            b = w.batch
            if b is not None and st in b.requests and all(r.done for r in b.requests):
                self.executor.cancel(w, b.id)

    # ---- dispatch --------------------------------------------------------------------------------------
    async def _dispatch_loop(self) -> None:
        while True:
            await self._capacity.wait()
            if self.executor.idle_worker() is None:
                self._capacity.clear()
                continue
            items = await self.batcher.next_batch()
            try:
                w = self.executor.idle_worker()
                if w is None:
                    for it in items:
                        self.batcher.submit(it, force=True)
                    continue
                self._send(w, [it.payload for it in items])
            except Exception as e:  # noqa: BLE001 - a bug here must fail this batch loudly, not stop dispatching
                log.exception("dispatching a batch failed")
                error = ServeError(500, "dispatch_error", f"{type(e).__name__}: {e}")
                for it in items:
                    self._finish(it.payload, "failed", error=error)

    def _send(self, w: WorkerHandle, reqs: list[RequestState]) -> None:
        now = time.monotonic()
        batch = Batch(next(self._batch_ids), reqs[0].params.key, reqs, w)
        images = sum(r.params.n for r in reqs)
        for r in reqs:
            r.status, r.queue_s, r.worker, r.step, r.batch_images = "running", now - r.item.arrival, w.index, 0, images
            self.metrics.queue_time.observe(r.queue_s)
        payload = [{"request_id": r.id, "prompt": r.params.prompt, "negative_prompt": r.params.negative_prompt,
                    "n": r.params.n, "seed": r.params.seed, "true_cfg_scale": r.params.true_cfg_scale}
                   for r in reqs]
        try:
            self.executor.send(w, batch, batch.id, batch.key, payload, images)
        except OSError as e:  # the worker just died: its reader thread reports it and `_on_death` re-queues
            log.warning("sending to worker %d failed: %s", w.index, e)

    def _on_message(self, w: WorkerHandle, msg: tuple) -> None:
        kind, batch = msg[0], w.batch
        if kind == "ready":
            self._capacity.set()
        elif kind == "gave_up" and self.executor.all_gave_up():
            for it in self.batcher.drain():
                self._finish(it.payload, "failed", error=ServeError(
                    503, "unavailable", f"no worker could load the pipeline: {w.last_error}"))
        elif batch is None or msg[1] != batch.id:
            return
        elif kind == "progress":
            for r in batch.requests:
                r.step = msg[2]
        elif kind in ("done", "failed"):
            w.batch, w.in_flight_images = None, 0
            self._capacity.set()
            if kind == "done":
                self._batch_done(w, batch, msg[2], msg[3])
            else:
                self._batch_failed(w, batch, msg[2], msg[3])

    def _batch_done(self, w: WorkerHandle, batch: Batch, images: dict, compute_s: float) -> None:
        n = sum(r.params.n for r in batch.requests)
        w.completed += n
        self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * compute_s
        self.metrics.compute_time.labels(str(w.index)).observe(compute_s)
        self.metrics.batch_images.observe(n)
        self.metrics.batch_requests.observe(len(batch.requests))
        self.metrics.images.inc(n)
        for r in batch.requests:
            r.compute_s = compute_s
            if not r.done:
                self._finish(r, "succeeded", images=images[r.id])

    def _batch_failed(self, w: WorkerHandle, batch: Batch, kind: str, text: str) -> None:
        if kind == "cancelled":
            return
        w.last_error = text
        for r in batch.requests:
            if not r.done:
                self._finish(r, "failed", error=ServeError(500, "pipeline_error", f"the pipeline failed: {text}"))

    def _on_death(self, w: WorkerHandle, batch: Batch | None) -> None:
        self._capacity.set()
        if batch is None:
            return
        for r in batch.requests:
            if r.done:
                continue
            if r.attempts < self.cfg.max_retries:
                r.attempts += 1
                r.status, r.step = "queued", 0
                self.batcher.submit(r.item, force=True)
                self.metrics.requeued.inc()
            else:
                self._finish(r, "failed", error=ServeError(
                    500, "worker_crashed", f"the worker on {w.device} died while running this request, "
                    f"{r.attempts + 1} time(s) ({w.last_error}); it was not retried again"))

    # ---- health and shutdown -----------------------------------------------------------------------------
    def health(self) -> dict:
        workers = [w.health() for w in self.executor.workers]
        return {"status": "ok" if self.executor.any_ready() and not self.closing else "unavailable",
                "ready": self.executor.any_ready(), "queue_length": len(self.batcher),
                "max_batch_images": {"cfg": self.max_images(True), "no_cfg": self.max_images(False)},
                "workers": workers}

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking requests, let queued and in-flight work finish for up to `grace_s`, fail the rest."""
        self.closing = True
        deadline = time.monotonic() + grace_s
        while (len(self.batcher) or any(w.batch for w in self.executor.workers)) and self.executor.any_ready() \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._task:
            self._task.cancel()
        left = [it.payload for it in self.batcher.drain()]
        left += [r for w in self.executor.workers if w.batch for r in w.batch.requests]
        for st in left + list(self.jobs.values()):
            if not st.done:
                self._finish(st, "failed", error=ServeError(503, "unavailable", "the server shut down first"))
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
