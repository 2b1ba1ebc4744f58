"""Executor: one spawned worker process per device, watched through its pipe and process sentinel.

A reader thread per worker waits on both; a message or a death is handed to the event loop. A dead worker is
restarted (its in-flight batch goes back to the engine through `on_death`); one that dies `MAX_BOOT_FAILURES` times
in a row before becoming ready is given up on, with its last error shown in /health. A worker that stops answering
(no heartbeat, or a batch stalled: see Engine's watchdog) is killed with SIGKILL, which works on a stopped process
too, and then takes the same path as any death.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.worker import worker_main

log = logging.getLogger(__name__)
MAX_BOOT_FAILURES = 3
WARM_KEYS = 8  # batch keys a worker is remembered to hold warm (adapters loaded, shapes seen)


@dataclass(eq=False)
class WorkerHandle:
    index: int
    device: str
    proc: Any = None
    conn: Any = None
    cancel: Any = None
    pid: int | None = None
    ready: bool = False
    gave_up: bool = False
    generation: int = 0
    batch: Any = None  # the engine's in-flight batch object, or None when idle
    in_flight_images: int = 0
    completed: int = 0
    restarts: int = 0
    boot_failures: int = 0
    last_error: str | None = None
    started: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)  # any message from the process, heartbeats included
    killing: str | None = None  # why the watchdog killed it; it is not ready from that moment
    warm: list = field(default_factory=list)  # batch keys it ran lately (adapters loaded, shapes seen), newest last

    def health(self) -> dict:
        return {"index": self.index, "device": self.device, "pid": self.pid, "ready": self.ready,
                "gave_up": self.gave_up, "in_flight": self.in_flight_images, "completed": self.completed,
                "restarts": self.restarts, "last_error": self.last_error,
                "last_seen_s": round(time.monotonic() - self.last_seen, 3),
                "uptime_s": round(time.time() - self.started, 3) if self.ready else 0.0}


class Executor:
    def __init__(self, cfg: ServerConfig, on_message: Callable, on_death: Callable):
        self.cfg, self.on_message, self.on_death = cfg, on_message, on_death
        self.ctx = mp.get_context("spawn")  # CUDA cannot survive fork; each worker initialises its own device
        self.workers = [WorkerHandle(i, d) for i, d in enumerate(cfg.device_list())]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing = False

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for w in self.workers:
            self._spawn(w)

    def _spawn(self, w: WorkerHandle) -> None:
        parent, child = self.ctx.Pipe()
        w.cancel = self.ctx.Value("q", -1, lock=False)
        w.proc = self.ctx.Process(target=worker_main, name=f"qitrt-worker-{w.index}", daemon=True,
                                  args=(child, w.device, str(self.cfg.checkpoint), self.cfg.engines,
                                        self.cfg.resolved_backend, self.cfg.cpu_threads(), w.cancel,
                                        self.cfg.dtype, self.cfg.trt_options(), self.cfg.heartbeat_interval_s,
                                        self.cfg.lora_dir, self.cfg.lora_cache_bytes, self.cfg.torch_options(),
                                        self.cfg.embedding_cache_bytes,
                                        (self.cfg.encoder_url, self.cfg.api_key) if self.cfg.encoder_url else None))
        w.proc.start()
        child.close()
        w.conn, w.pid, w.ready, w.generation = parent, w.proc.pid, False, w.generation + 1
        w.last_seen, w.killing = time.monotonic(), None
        threading.Thread(target=self._reader, args=(w, w.generation, parent, w.proc), daemon=True,
                         name=f"qitrt-reader-{w.index}").start()

    def _reader(self, w: WorkerHandle, gen: int, conn, proc) -> None:
        while True:
            ready = mp_wait([conn, proc.sentinel])
            if conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                self.loop.call_soon_threadsafe(self._dispatch, w, gen, msg)
            elif not conn.poll():
                break
        proc.join(5)
        self.loop.call_soon_threadsafe(self._died, w, gen, proc.exitcode)

    def _dispatch(self, w: WorkerHandle, gen: int, msg: tuple) -> None:
        if gen != w.generation or w.killing:
            return
        w.last_seen = time.monotonic()
        if msg[0] == "heartbeat":
            return
        if msg[0] == "ready":
            w.ready, w.pid, w.boot_failures, w.started = True, msg[1], 0, time.time()
        elif msg[0] == "fatal":
            w.last_error = msg[1].strip().splitlines()[-1]
            log.error("worker %d (%s) failed to start:\n%s", w.index, w.device, msg[1])
        self.on_message(w, msg)

    def _died(self, w: WorkerHandle, gen: int, exitcode) -> None:
        if gen != w.generation or self.closing:
            return
        was_ready, batch = w.ready or bool(w.killing), w.batch
        w.ready, w.batch, w.in_flight_images = False, None, 0
        if w.killing:
            w.last_error = f"worker process {w.pid} was killed: {w.killing}"
        elif was_ready:
            w.last_error = f"worker process {w.pid} died (exit code {exitcode})"
        else:
            w.boot_failures += 1
            w.last_error = w.last_error or f"worker process {w.pid} died while loading (exit code {exitcode})"
        log.error("worker %d (%s): %s", w.index, w.device, w.last_error)
        self.on_death(w, batch)
        if w.boot_failures >= MAX_BOOT_FAILURES:
            w.gave_up = True
            self.on_message(w, ("gave_up",))
            return
        w.restarts += 1
        self.loop.call_later(min(5.0, 0.5 * w.boot_failures), self._respawn, w)

    def _respawn(self, w: WorkerHandle) -> None:
        if not self.closing:
            self._spawn(w)

    def kill(self, w: WorkerHandle, why: str) -> None:
        """Take `w` out of service now (not ready, no new batch) and SIGKILL it; its reader thread then reports
        the death, which re-queues its batch and restarts it."""
        if w.killing or w.proc is None:
            return
        log.error("worker %d (%s, pid %s): %s; killing it", w.index, w.device, w.pid, why)
        w.killing, w.ready = why, False
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def idle_worker(self, key=None) -> WorkerHandle | None:
        """A ready worker with room (one batch at a time each): one that ran `key` lately first (its adapters are
        loaded, its engine has seen the shapes), then the least loaded, fewest completed first."""
        free = [w for w in self.workers if w.ready and w.batch is None]
        return min(free, key=lambda w: (key is None or key not in w.warm, w.in_flight_images, w.completed),
                   default=None)

    def send(self, w: WorkerHandle, batch, batch_id: int, key, items: list[dict], images: int) -> None:
        w.batch, w.in_flight_images = batch, images
        if key in w.warm:
            w.warm.remove(key)
        w.warm = (w.warm + [key])[-WARM_KEYS:]
        w.cancel.value = -1
        w.conn.send((batch_id, key, items))

    def cancel(self, w: WorkerHandle, batch_id: int) -> None:
        w.cancel.value = batch_id

    def all_gave_up(self) -> bool:
        return all(w.gave_up for w in self.workers)

    def any_ready(self) -> bool:
        return any(w.ready for w in self.workers)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask each worker to exit, then SIGTERM, then SIGKILL what is left."""
        self.closing = True
        for w in self.workers:
            try:
                if w.proc is not None and w.proc.is_alive():
                    w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.proc is None:
                continue
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
            w.ready = False
