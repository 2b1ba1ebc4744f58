"""Durable async jobs: an embedded SQLite database with each result's PNGs as files beside it.

A job is written (and committed) before its 202 is answered, so an accepted job survives a SIGKILL of the whole
server: on the next start, queued and running jobs run again, and finished results are served until their TTL.
Results live on disk, not in memory; the folder is bounded in bytes, oldest finished results evicted first.
One server owns a folder at a time (an exclusive lock), since two would run each other's jobs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

from qwen_image_trt.core.errors import QitrtError
from qwen_image_trt.core.files import write_atomic

log = logging.getLogger(__name__)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, finished_at REAL, error TEXT, timings TEXT, files TEXT,
    bytes INTEGER NOT NULL DEFAULT 0)
"""
FINISHED = ("succeeded", "failed", "cancelled")


@dataclasses.dataclass
class StoredJob:
    id: str
    created: float
    status: str
    params: dict
    attempts: int
    finished_at: float | None
    error: dict | None
    timings: dict
    files: list[str]
    bytes: int


class JobStore:
    def __init__(self, folder: str | os.PathLike, max_bytes: int, ttl_s: float):
        self.folder, self.max_bytes, self.ttl_s = Path(folder), max_bytes, ttl_s
        (self.folder / "results").mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / "server.lock", "a+b")  # noqa: SIM115 - held for the server's life
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise QitrtError(f"jobs_dir {self.folder} is in use by another qitrt server; give each server its own "
                             f"--jobs-dir") from None
        self.db = sqlite3.connect(self.folder / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")  # a commit is one append; survives a process kill
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(SCHEMA)
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at)")  # eviction's scans
        self.bytes = self.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0]

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    # ---- writes ----------------------------------------------------------------------------------------
    def add(self, job_id: str, created: float, params) -> None:
        self.db.execute("INSERT INTO jobs (id, created, status, params) VALUES (?, ?, 'queued', ?)",
                        (job_id, created, json.dumps(dataclasses.asdict(params))))

    def update(self, job_id: str, status: str, attempts: int) -> None:
        self.db.execute("UPDATE jobs SET status = ?, attempts = ? WHERE id = ?", (status, attempts, job_id))

    def finish(self, job_id: str, status: str, attempts: int, finished_at: float, error: dict | None,
               timings: dict, images: list[bytes] | None) -> list[str]:
        """Write the PNGs (each atomically), then mark the row finished: a row never names a missing file.
        Returns the jobs evicted to make room (or past their TTL)."""
        files, size = [], 0
        for i, data in enumerate(images or []):
            name = f"{job_id}_{i}.png"
            write_atomic(self.folder / "results" / name, data)
            files.append(name)
            size += len(data)
        self.db.execute("UPDATE jobs SET status = ?, attempts = ?, finished_at = ?, error = ?, timings = ?, "
                        "files = ?, bytes = ? WHERE id = ?",
                        (status, attempts, finished_at, json.dumps(error), json.dumps(timings), json.dumps(files),
                         size, job_id))
        self.bytes += size
        return self.evict()

    def delete(self, job_id: str) -> None:
        row = self.db.execute("SELECT files, bytes FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return
        self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for name in json.loads(row[0] or "[]"):
            (self.folder / "results" / name).unlink(missing_ok=True)
        self.bytes -= row[1]

    def evict(self, now: float | None = None) -> list[str]:
        """Drop finished jobs past their TTL, then the oldest finished results until the folder fits its bytes."""
        now = time.time() if now is None else now
        gone = [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (now - self.ttl_s,))]
        if self.bytes > self.max_bytes:
            over = self.bytes
            for job_id, size in self.db.execute("SELECT id, bytes FROM jobs WHERE finished_at IS NOT NULL "
                                                "AND bytes > 0 ORDER BY finished_at"):
                if over <= self.max_bytes:
                    break
                if job_id not in gone:
                    gone.append(job_id)
                    over -= size
        for job_id in gone:
            self.delete(job_id)
        return gone

    # ---- reads -----------------------------------------------------------------------------------------
    def jobs(self) -> list[StoredJob]:
        rows = self.db.execute("SELECT id, created, status, params, attempts, finished_at, error, timings, files, "
                               "bytes FROM jobs ORDER BY created").fetchall()
        return [StoredJob(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], json.loads(r[6] or "null"),
                          json.loads(r[7] or "{}"), json.loads(r[8] or "[]"), r[9]) for r in rows]

    def image(self, job_id: str, index: int) -> bytes:
        return (self.folder / "results" / f"{job_id}_{index}.png").read_bytes()

    def exists(self, job_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None
