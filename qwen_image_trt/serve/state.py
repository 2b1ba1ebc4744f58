"""What the engine tracks per request and per batch, and the error every request can end with."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qwen_image_trt.serve.batcher import Item
from qwen_image_trt.serve.jobstore import FINISHED
from qwen_image_trt.serve.protocol import GenParams


class ServeError(Exception):
    def __init__(self, status: int, type_: str, message: str, retry_after: int | None = None):
        self.status, self.type, self.message, self.retry_after = status, type_, message, retry_after
        super().__init__(message)

    def as_dict(self) -> dict:
        return {"status": self.status, "type": self.type, "message": self.message}


@dataclass(eq=False)
class RequestState:
    params: GenParams
    future: asyncio.Future
    job: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    item: Item | None = None
    attempts: int = 0
    solo: bool = False  # its batch failed: it now runs alone, so only a request that fails by itself fails
    step: int = 0
    images: list[bytes] | None = None  # sync requests only; a job's PNGs are files of the JobStore
    image_count: int = 0
    error: ServeError | None = None
    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_images: int = 0
    worker: int | None = None
    finished_at: float | None = None
    timer: asyncio.TimerHandle | None = None

    @property
    def done(self) -> bool:
        return self.status in FINISHED

    def timings(self) -> dict:
        return {"queue_s": self.queue_s, "compute_s": self.compute_s, "batch_images": self.batch_images,
                "worker": self.worker, "image_count": self.image_count, "seed": self.params.seed}


@dataclass(eq=False)
class Batch:
    id: int
    key: tuple
    requests: list[RequestState]
    worker: Any  # executor.WorkerHandle
    sent: float = field(default_factory=time.monotonic)
    last_progress: float = field(default_factory=time.monotonic)
