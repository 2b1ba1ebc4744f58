"""Engine: owns the batcher, the executor and the job store; one future per request, timeouts, cancellation,
re-queueing, failure isolation, the liveness watchdog and the drain.

The HTTP layer only calls `accept` (then awaits the state's future), `cancel`, `job`, `jobs_list`, `health`, `drain`
(vLLM's EngineClient split). Every accepted request ends exactly once in `_finish`: images, or a ServeError with an HTTP status and a
message. Async jobs are also kept by `Jobs` (serve/jobs.py) in the durable JobStore, so they outlive the process.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time

from qwen_image_trt.serve.batcher import Batcher, Item, QueueFull
from qwen_image_trt.serve.config import DEFAULT_MAX_BATCH, ServerConfig
from qwen_image_trt.serve.executor import Executor, WorkerHandle
from qwen_image_trt.serve.jobs import Jobs
from qwen_image_trt.serve.jobstore import JobStore
from qwen_image_trt.serve.metrics import ServeMetrics
from qwen_image_trt.serve.protocol import GenParams
from qwen_image_trt.serve.state import Batch, RequestState, ServeError

__all__ = ["Engine", "RequestState", "ServeError"]
log = logging.getLogger(__name__)
ENCODER_PROBE_S = 1.0  # how often a denoiser asks its encoder service's /health
OUTCOME = {"succeeded": "ok", "cancelled": "cancelled"}


class Engine:
    def __init__(self, cfg: ServerConfig, limits, metrics: ServeMetrics | None = None, encoder=None):
        self.cfg, self.limits = cfg, limits
        self.encoder = encoder  # --role denoiser: the EncoderLink (serve/remote_encoder.py)
        self.metrics = metrics or ServeMetrics()
        self.batcher = Batcher(self.batch_limit, cfg.queue_delay_ms / 1000, cfg.max_queue_size)
        self.executor = Executor(cfg, self._on_message, self._on_death)
        self.jobs: Jobs | None = None  # opened by `start` (its store locks its folder)
        self.closing = False
        self._batch_ids = itertools.count()
        self._capacity = asyncio.Event()
        self._avg_batch_s = 1.0
        self._step_s: float | None = None  # seconds per denoising step per image, measured (EWMA)
        self._tasks: list[asyncio.Task] = []

    def max_images(self, cfg_on: bool) -> int:
        """Images per pipeline call: the flag, capped by the engine's limits. `limits.batch` counts images
        (requests' images), not CFG branches: the profile builder already doubled it for CFG."""
        profile = self.limits.batch[1]
        want = self.cfg.max_batch_size or min(profile, DEFAULT_MAX_BATCH)
        return max(1, min(want, profile))

    def batch_limit(self, key) -> int:
        """Images per pipeline call for one batch group (key: width, height, steps, CFG, ...). Without a
        --batching-profile, or with --max-batch-size given, `max_images`. With one, the profile's limit for the
        request's size bucket (see BatchingLimits.max_batch), capped by the engine's `limits.batch`; for an image
        bigger than every bucket also by `max_images`; a CFG mode the profile did not measure gets `max_images`.
        (A request's own `n` is bounded by `max_images` at the door; one above its bucket's limit runs alone.)"""
        default = self.max_images(key[3])
        prof = self.cfg.batching_limits
        if prof is None or self.cfg.max_batch_size is not None:
            return default
        limit, measured = prof.max_batch(key[0], key[1], key[3])
        if limit is None:
            return default
        return max(1, min(limit, self.limits.batch[1] if measured else default))

    def batching_info(self) -> dict:
        """The active batching limits, for /health: where they come from and, per profiled size, what applies."""
        prof = self.cfg.batching_limits

        def source(flag: str, given: bool) -> str:
            return f"--{flag}" if given else ("profile" if prof is not None else "default")

        info = {"profile": prof.path if prof else None, "max_queue_delay_ms": self.cfg.queue_delay_ms,
                "max_queue_delay_source": source("max-queue-delay-ms", self.cfg.max_queue_delay_ms is not None),
                "max_batch_source": source("max-batch-size", self.cfg.max_batch_size is not None)}
        if prof is not None:
            info["by_size"] = [{"size": f"{w}x{h}", "cfg": c, "profile_max_batch": n,
                                "max_batch": self.batch_limit((w, h, None, c))} for w, h, c, n in prof.buckets]
            info["warnings"] = list(prof.warnings)
        return info

    async def start(self) -> None:
        self.jobs = Jobs(JobStore(self.cfg.resolved_jobs_dir, self.cfg.jobs_max_bytes, self.cfg.job_ttl_s))
        self.executor.start()
        for st in self.jobs.restore():
            self._enqueue(st, force=True)
            self.jobs.moved(st)
            self.metrics.restored.inc()
        self._tasks = [asyncio.create_task(self._dispatch_loop(), name="qitrt-dispatch"),
                       asyncio.create_task(self._watchdog_loop(), name="qitrt-watchdog")]
        if self.encoder is not None:
            self._tasks.append(asyncio.create_task(self._encoder_loop(), name="qitrt-encoder-link"))

    # ---- requests --------------------------------------------------------------------------------------
    def accept(self, params: GenParams, job: bool = False) -> RequestState:
        kind = "job" if job else "request"
        if self.closing:
            self.metrics.outcomes.labels(kind, "rejected").inc()
            raise ServeError(503, "unavailable", "the server is shutting down; retry on another replica or later",
                             retry_after=self.cfg.drain_retry_after_s)
        if self.executor.all_gave_up():
            self.metrics.outcomes.labels(kind, "rejected").inc()
            raise ServeError(503, "unavailable", "no worker could load the pipeline; see /health")
        if self.encoder is not None and not self.encoder.ok:
            self.metrics.outcomes.labels(kind, "rejected").inc()
            raise ServeError(503, "encoder_unavailable", f"the encoder service at {self.encoder.url} is "
                             f"unavailable ({self.encoder.last_error}); retry later",
                             retry_after=self.cfg.drain_retry_after_s)
        st = RequestState(params, asyncio.get_running_loop().create_future(), job=job)
        if job:
            self.jobs.added(st)
        try:
            self._enqueue(st, force=False)
        except QueueFull as e:
            if job:
                self.jobs.refused(st)
            self.metrics.outcomes.labels(kind, "rejected").inc()
            raise ServeError(429, "queue_full", f"{e}; retry later", retry_after=self.retry_after()) from None
        return st

    def _enqueue(self, st: RequestState, force: bool) -> None:
        key = st.params.key + ((st.id,) if st.solo else ())  # a key of its own: a batch of one
        st.item = Item(key, st.params.n, st.params.priority, payload=st)
        self.batcher.submit(st.item, force=force)
        if st.timer is None:
            st.timer = asyncio.get_running_loop().call_later(st.params.timeout_s, self._expire, st)

    def cancel(self, st: RequestState, why: str = "cancelled by the client") -> None:
        if st.done:
            return
        if st.status == "queued":
            self.batcher.remove(st.item)
        self._finish(st, "cancelled", error=ServeError(409, "cancelled", why))

    def job(self, job_id: str) -> RequestState:
        st = self.jobs.get(job_id)
        if st is None:
            raise ServeError(404, "not_found", f"no job {job_id!r} (unknown, deleted, or expired)")
        return st

    def job_image(self, st: RequestState, index: int) -> bytes:
        return self.jobs.image(st, index)

    def jobs_list(self, status: str | None, limit: int) -> list[dict]:
        return [self.job_status(s) for s in self.jobs.newest(status, limit)]

    def job_status(self, st: RequestState) -> dict:
        out = {"id": st.id, "status": st.status, "created": int(st.created), "n": st.params.n,
               "queue_position": self.batcher.position(st.item) if st.status == "queued" and st.item else None,
               "progress": {"step": st.step, "total": st.params.steps},
               "attempts": st.attempts + 1, "seed": st.params.seed}
        if st.done:
            out.update(queue_time_s=round(st.queue_s, 6), compute_time_s=round(st.compute_s, 6),
                       batch_images=st.batch_images, worker=st.worker, images=st.image_count)
        if st.error:
            out["error"] = {"type": st.error.type, "message": st.error.message}
        return out

    def delete_job(self, st: RequestState) -> None:
        if not st.done:
            self.cancel(st)
        else:
            self.jobs.delete(st)

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
        st.status, st.error, st.finished_at = status, error, time.time()
        st.image_count = len(images or [])
        if st.timer:
            st.timer.cancel()
        outcome = OUTCOME.get(status) or ("timeout" if error and error.status == 504 else "error")
        self.metrics.outcomes.labels("job" if st.job else "request", outcome).inc()
        if st.job:
            self.jobs.finished(st, images)
        else:
            st.images = images
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
                w = self.executor.idle_worker(items[0].payload.params.key)  # warm first
                if w is None:
                    for it in items:
                        self.batcher.submit(it, force=True)
                    continue
                self._send(w, [it.payload for it in items])
            except Exception as e:
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
            if r.job:
                self.jobs.moved(r)
        payload = [{"request_id": r.id, "prompt": r.params.prompt, "negative_prompt": r.params.negative_prompt,
                    "n": r.params.n, "seed": r.params.seed, "true_cfg_scale": r.params.true_cfg_scale,
                    "images": r.params.images, "mask": r.params.mask}
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
            batch.last_progress = time.monotonic()
            for r in batch.requests:
                r.step = msg[2]
        elif kind in ("done", "failed"):
            w.batch, w.in_flight_images = None, 0
            self._capacity.set()
            self.metrics.busy.labels(str(w.index)).inc(time.monotonic() - batch.sent)
            if kind == "done":
                self._batch_done(w, batch, msg[2], msg[3])
                if len(msg) > 4:  # the worker's prompt-embedding cache counts since its last batch
                    for what, n in msg[4].items():
                        self.metrics.embedding_cache.labels(what).inc(n)
            else:
                self._batch_failed(w, batch, msg[2], msg[3])

    def _batch_done(self, w: WorkerHandle, batch: Batch, images: dict, compute_s: float) -> None:
        n = sum(r.params.n for r in batch.requests)
        w.completed += n
        self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * compute_s
        step_s = compute_s / max(1, batch.key[2]) / n
        self._step_s = step_s if self._step_s is None else 0.8 * self._step_s + 0.2 * step_s
        self.metrics.compute_time.labels(str(w.index)).observe(compute_s)
        self.metrics.batch_images.observe(n)
        self.metrics.batch_requests.observe(len(batch.requests))
        self.metrics.images.inc(n)
        for r in batch.requests:
            r.compute_s = compute_s
            if not r.done:
                self._finish(r, "succeeded", images=images[r.id])

    def _batch_failed(self, w: WorkerHandle, batch: Batch, kind: str, text: str) -> None:
        """A failed batch of several requests is split: each runs again alone, so the request that causes the
        failure fails by itself (with the error's message) and the others succeed."""
        if kind == "cancelled":
            return
        w.last_error = text
        if kind == "EncoderUnavailable":  # not this batch's fault: 503 + Retry-After, and the door closes until
            if self.encoder is not None:  # the link's next probe finds the encoder back
                self.encoder.ok, self.encoder.last_error = False, text
            for r in batch.requests:
                if not r.done:
                    self._finish(r, "failed", error=ServeError(503, "encoder_unavailable", text,
                                                               retry_after=self.cfg.drain_retry_after_s))
            return
        live = [r for r in batch.requests if not r.done]
        if len(batch.requests) > 1:
            for r in live:
                r.solo, r.status, r.step = True, "queued", 0
                self._enqueue(r, force=True)
                if r.job:
                    self.jobs.moved(r)
            self.metrics.isolated.inc(len(live))
            return
        for r in live:
            self._finish(r, "failed", error=ServeError(500, "pipeline_error", f"the pipeline failed: {text}"))

    def _on_death(self, w: WorkerHandle, batch: Batch | None) -> None:
        self._capacity.set()
        if batch is None:
            return
        self.metrics.busy.labels(str(w.index)).inc(time.monotonic() - batch.sent)
        split = len(batch.requests) > 1  # one of them may be what kills (or wedges) workers: each goes alone
        for r in batch.requests:
            if r.done:
                continue
            if r.attempts < self.cfg.max_retries and not (self.closing and r.job):
                r.attempts += 1
                r.status, r.step, r.solo = "queued", 0, r.solo or split
                self._enqueue(r, force=True)
                if r.job:
                    self.jobs.moved(r)
                self.metrics.requeued.inc()
            elif r.job and self.closing:
                pass  # stays 'running' in the store: it runs again on the next start
            else:
                self._finish(r, "failed", error=ServeError(
                    500, "worker_crashed", f"the worker on {w.device} died while running this request, "
                    f"{r.attempts + 1} time(s) ({w.last_error}); it was not retried again"))

    # ---- liveness ----------------------------------------------------------------------------------------
    def stall_limit_s(self, batch: Batch) -> float:
        """How long a batch may go without a denoising step before its worker counts as wedged."""
        if self._step_s is None:
            return self.cfg.stall_first_s
        images = sum(r.params.n for r in batch.requests)
        return max(self.cfg.stall_min_s, self.cfg.stall_factor * self._step_s * images)

    def check_liveness(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for w in self.executor.workers:
            if w.killing or w.proc is None or w.gave_up:
                continue
            silent = now - w.last_seen
            if silent > self.cfg.heartbeat_timeout_s:
                self.executor.kill(w, f"no heartbeat for {silent:.1f} s (limit {self.cfg.heartbeat_timeout_s:g} s)")
            elif w.batch is not None:
                stalled, limit = now - w.batch.last_progress, self.stall_limit_s(w.batch)
                if stalled > limit:
                    self.executor.kill(w, f"batch {w.batch.id} made no denoising step for {stalled:.1f} s (limit "
                                          f"{limit:.1f} s from the measured {self._step_s or 0:.3f} s per step "
                                          f"and image)")
            if w.killing:
                self.metrics.watchdog_kills.labels(str(w.index)).inc()

    async def _encoder_loop(self) -> None:
        """--role denoiser: probe the encoder service; the door opens and closes with it."""
        while True:
            await asyncio.to_thread(self.encoder.check)
            await asyncio.sleep(ENCODER_PROBE_S if self.encoder.ok else ENCODER_PROBE_S / 4)

    async def _watchdog_loop(self) -> None:
        period = max(0.05, min(1.0, self.cfg.heartbeat_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.check_liveness()
            except Exception:
                log.exception("liveness check failed")

    # ---- health, drain and shutdown ----------------------------------------------------------------------
    def health(self) -> dict:
        workers = [w.health() for w in self.executor.workers]
        ready = self.executor.any_ready() and not self.closing and (self.encoder is None or self.encoder.ok)
        return {"status": "draining" if self.closing else ("ok" if ready else "unavailable"),
                "ready": ready, "queue_length": len(self.batcher), "role": self.cfg.role,
                **({"encoder": self.encoder.as_dict()} if self.encoder is not None else {}),
                "max_batch_images": {"cfg": self.max_images(True), "no_cfg": self.max_images(False)},
                "batching": self.batching_info(),
                "workers": workers}

    def running(self) -> list[RequestState]:
        return [r for w in self.executor.workers if w.batch for r in w.batch.requests if not r.done]

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: refuse new work (503 + Retry-After), keep jobs that have not started for the next start, and
        let running batches and waiting sync requests finish for up to `grace_s`."""
        if self.closing:
            return
        self.closing = True
        for it in self.batcher.take_where(lambda it: it.payload.job):  # they stay 'queued' in the store
            if it.payload.timer:
                it.payload.timer.cancel()
        deadline = time.monotonic() + grace_s
        while (len(self.batcher) or self.running()) and self.executor.any_ready() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def shutdown(self, grace_s: float = 0.0) -> None:
        """Drain (if not done already), fail what is left of the sync requests, stop the workers, close the store."""
        await self.drain(grace_s)
        for t in self._tasks:
            t.cancel()
        left = [it.payload for it in self.batcher.drain()] + self.running()
        for st in left:
            if not st.done and not st.job:
                self._finish(st, "failed", error=ServeError(503, "unavailable", "the server shut down first"))
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
        self.jobs.close()
