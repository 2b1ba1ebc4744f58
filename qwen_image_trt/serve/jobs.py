"""The async jobs the engine knows of: request states in memory (metadata only) mirrored in the durable JobStore.

The engine tells it each change (`added`, `moved`, `finished`); it reads the store back at start (`restore`) and
keeps both bounded (`purge`: the store's TTL and byte limit, a cap on rows in memory).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from qwen_image_trt.serve.jobstore import JobStore
from qwen_image_trt.serve.protocol import GenParams
from qwen_image_trt.serve.state import FINISHED, RequestState, ServeError

log = logging.getLogger(__name__)
MAX_FINISHED_JOBS = 10000  # job rows kept in memory (metadata only; the PNGs are files)
PURGE_EVERY_S = 1.0  # reads (status polls) check the TTL at most this often: a poll must not cost a table scan


class Jobs:
    def __init__(self, store: JobStore):
        self.store = store
        self.states: dict[str, RequestState] = {}
        self._purged = 0.0

    def get(self, job_id: str) -> RequestState | None:
        self.purge(at_most_every_s=PURGE_EVERY_S)  # on reads too: an idle server must not serve past the TTL
        return self.states.get(job_id)

    def newest(self, status: str | None, limit: int) -> list[RequestState]:
        self.purge(at_most_every_s=PURGE_EVERY_S)
        states = [s for s in self.states.values() if status is None or s.status == status]
        return sorted(states, key=lambda s: s.created, reverse=True)[:limit]

    def image(self, st: RequestState, index: int) -> bytes:
        return self.store.image(st.id, index)

    # ---- changes -------------------------------------------------------------------------------------------
    def added(self, st: RequestState) -> None:
        """Committed before the 202: an accepted job is never lost."""
        self.store.add(st.id, st.created, st.params)
        self.states[st.id] = st

    def refused(self, st: RequestState) -> None:
        self.states.pop(st.id, None)
        self.store.delete(st.id)

    def moved(self, st: RequestState) -> None:
        """queued <-> running, with its attempts."""
        self.store.update(st.id, st.status, st.attempts)

    def finished(self, st: RequestState, images: list[bytes] | None) -> None:
        error = st.error.as_dict() if st.error else None
        try:
            evicted = self.store.finish(st.id, st.status, st.attempts, st.finished_at, error, st.timings(), images)
        except (OSError, sqlite3.Error) as e:  # a full disk fails this job, not the event loop
            log.error("storing the result of job %s failed: %s", st.id, e)
            st.status, st.image_count = "failed", 0
            st.error = ServeError(500, "storage_error", f"the result could not be stored: {e}")
            evicted = []
        self._forget(evicted)

    def delete(self, st: RequestState) -> None:
        self.states.pop(st.id, None)
        self.store.delete(st.id)

    def purge(self, at_most_every_s: float = 0.0) -> None:
        now = time.monotonic()
        if now - self._purged < at_most_every_s:
            return
        self._purged = now
        self._forget(self.store.evict())

    def _forget(self, evicted: list[str]) -> None:
        """Drop evicted jobs from memory, and the oldest finished ones beyond the in-memory cap."""
        for job_id in evicted:
            self.states.pop(job_id, None)
        if len(self.states) <= MAX_FINISHED_JOBS:
            return
        done = sorted((s for s in self.states.values() if s.done), key=lambda s: s.finished_at)
        for s in done[:max(0, len(done) - MAX_FINISHED_JOBS)]:
            self.delete(s)

    def restore(self) -> list[RequestState]:
        """Jobs of an earlier run: finished ones are kept to be served until their TTL; the others are returned,
        to be queued again (same parameters, same seed, so the same images)."""
        loop, pending = asyncio.get_running_loop(), []
        for row in self.store.jobs():
            st = RequestState(GenParams(**row.params), loop.create_future(), job=True, id=row.id,
                              created=row.created, attempts=row.attempts)
            if row.status in FINISHED:
                st.status, st.finished_at = row.status, row.finished_at
                if row.error:
                    st.error = ServeError(row.error["status"], row.error["type"], row.error["message"])
                for k in ("queue_s", "compute_s", "batch_images", "worker", "image_count"):
                    setattr(st, k, row.timings.get(k, getattr(st, k)))
                st.future.set_result(st)
            else:
                pending.append(st)
            self.states[st.id] = st
        self.purge()
        return pending

    def close(self) -> None:
        self.store.close()
