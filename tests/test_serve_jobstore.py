"""The durable job store on its own: rows and files, eviction by TTL and by bytes (oldest finished first)."""

from __future__ import annotations

import sqlite3
import time

from qwen_image_trt.serve.jobstore import JobStore
from qwen_image_trt.serve.protocol import GenParams


def params(seed: int = 0) -> GenParams:
    return GenParams("a cat", None, 1, 64, 64, 2, 4.0, seed, 1, 60.0)


def finish(store: JobStore, job_id: str, at: float, size: int) -> list[str]:
    return store.finish(job_id, "succeeded", 0, at, None, {"image_count": 1}, [bytes([1]) * size])


def test_rows_and_files_round_trip(tmp_path):
    store = JobStore(tmp_path, 10_000, 3600)
    store.add("a", 1.0, params(5))
    store.update("a", "running", 1)
    finish(store, "a", time.time(), 100)
    store.add("b", 2.0, params(6))
    store.close()
    again = JobStore(tmp_path, 10_000, 3600)
    rows = {r.id: r for r in again.jobs()}
    assert rows["a"].status == "succeeded" and rows["a"].params["seed"] == 5 and rows["a"].bytes == 100
    assert rows["b"].status == "queued" and rows["b"].files == []
    assert again.image("a", 0) == bytes([1]) * 100
    again.close()


def test_eviction_by_bytes_drops_the_oldest_finished_results_first(tmp_path):
    store = JobStore(tmp_path, 250, 3600)
    now = time.time()
    for i, job_id in enumerate(["old", "mid", "new"]):
        store.add(job_id, float(i), params(i))
    store.add("waiting", 9.0, params(9))
    finish(store, "old", now - 30, 100)
    finish(store, "mid", now - 20, 100)
    assert store.bytes == 200 and store.exists("old")
    assert finish(store, "new", now - 10, 100) == ["old"]  # 300 > 250: the oldest finished result goes
    assert not store.exists("old") and store.exists("mid") and store.exists("new") and store.exists("waiting")
    assert store.bytes == 200
    assert not (tmp_path / "results" / "old_0.png").exists()
    assert sqlite3.connect(tmp_path / "jobs.sqlite3").execute("SELECT SUM(bytes) FROM jobs").fetchone()[0] == 200
    store.close()


def test_eviction_by_ttl_keeps_unfinished_jobs(tmp_path):
    store = JobStore(tmp_path, 10_000, 60)
    store.add("done", 0.0, params())
    store.add("queued", 0.0, params())
    finish(store, "done", time.time() - 61, 10)
    assert store.evict() == []  # finish() already evicted it
    assert not store.exists("done") and store.exists("queued")
    store.close()
