"""Server figures on the tiny model: own overhead per request, images/s with 1 vs 2 CPU workers and batching off vs
on (64x64, 16 concurrent clients), and a burst far beyond the queue limit (every request answered, memory bounded).

    PYTHONPATH=. python benchmarks/serve_overhead.py [--checkpoint DIR] [--seconds 15] [--out benchmarks/results/serve]

Overhead = client round trip minus the pipeline time the worker reports (X-Compute-Time-Ms), so it holds HTTP,
JSON, the batcher, the pipe to the worker, PNG encoding and base64; with --max-queue-delay-ms 0 it holds no wait.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # torch threads per worker, the same in every configuration (see --threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, checkpoint, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("QITRT_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_image_trt.cli", "serve", str(checkpoint),
                                      "--port", str(self.port), "--default-size", "64x64",
                                      "--threads-per-worker", str(THREADS),
                                      "--jobs-dir", tempfile.mkdtemp(prefix="qitrt-bench-jobs-"), *args],
                                     env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def __enter__(self):
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                h = httpx.get(self.url + "/health", timeout=2).json()
                if all(w["ready"] for w in h["workers"]):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(60)

    def rss_mb(self) -> float:
        import psutil

        p = psutil.Process(self.proc.pid)
        return round(sum(x.memory_info().rss for x in [p, *p.children(recursive=True)]) / 2**20, 1)


def overhead(checkpoint, requests: int, delay_ms: str) -> dict:
    body = {"prompt": "a small red cube", "size": "64x64", "num_inference_steps": 4, "seed": 0}
    with Server(checkpoint, "--devices", "cpu", "--max-queue-delay-ms", delay_ms) as s, httpx.Client() as c:
        for _ in range(5):
            c.post(s.url + "/v1/images/generations", json=body)
        rows = []
        for _ in range(requests):
            t0 = time.perf_counter()
            r = c.post(s.url + "/v1/images/generations", json=body)
            rt = (time.perf_counter() - t0) * 1e3
            r.raise_for_status()
            rows.append((rt, float(r.headers["x-compute-time-ms"]), float(r.headers["x-queue-time-ms"])))
    over = sorted(rt - comp for rt, comp, _ in rows)
    return {"max_queue_delay_ms": float(delay_ms), "requests": requests,
            "round_trip_ms_median": round(statistics.median(r[0] for r in rows), 2),
            "pipeline_ms_median": round(statistics.median(r[1] for r in rows), 2),
            "queue_ms_median": round(statistics.median(r[2] for r in rows), 2),
            "overhead_ms_median": round(statistics.median(over), 2),
            "overhead_ms_p90": round(over[int(0.9 * len(over))], 2)}


async def clients(url: str, n_clients: int, seconds: float, body: dict) -> dict:
    done, codes, batch = 0, {}, []
    stop = time.monotonic() + seconds

    async def one(c, k):
        nonlocal done
        i = 0
        while time.monotonic() < stop:
            r = await c.post(url + "/v1/images/generations", json={**body, "seed": k * 10000 + i})
            i += 1
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                done += 1
                batch.append(int(r.headers["x-batch-images"]))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n_clients + 4)) as c:
        t0 = time.monotonic()
        await asyncio.gather(*[one(c, k) for k in range(n_clients)])
        wall = time.monotonic() - t0
    return {"images": done, "seconds": round(wall, 2), "images_per_s": round(done / wall, 2), "codes": codes,
            "mean_batch_images": round(statistics.mean(batch), 2) if batch else 0}


def throughput(checkpoint, devices: str, max_batch: int, seconds: float, n_clients: int = 16) -> dict:
    body = {"prompt": "a small red cube", "size": "64x64", "num_inference_steps": 4}
    with Server(checkpoint, "--devices", devices, "--max-batch-size", str(max_batch),
                "--max-queue-delay-ms", "5") as s:
        asyncio.run(clients(s.url, n_clients, 2.0, body))  # warm-up
        res = asyncio.run(clients(s.url, n_clients, seconds, body))
    return {"devices": devices, "max_batch_size": max_batch, "clients": n_clients, **res}


def burst(checkpoint, n: int = 600, queue: int = 32) -> dict:
    body = {"prompt": "burst", "size": "64x64", "num_inference_steps": 4, "timeout": 20}
    with Server(checkpoint, "--devices", "cpu,cpu", "--max-queue-size", str(queue)) as s:
        before = s.rss_mb()

        async def main():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n)) as c:
                return await asyncio.gather(*[c.post(s.url + "/v1/images/generations", json={**body, "seed": i})
                                              for i in range(n)], return_exceptions=True)

        t0 = time.monotonic()
        out = asyncio.run(main())
        wall = time.monotonic() - t0
        after = s.rss_mb()
    codes: dict = {}
    for r in out:
        k = r.status_code if isinstance(r, httpx.Response) else type(r).__name__
        codes[k] = codes.get(k, 0) + 1
    return {"requests": n, "max_queue_size": queue, "codes": codes, "seconds": round(wall, 2),
            "rss_mb_before": before, "rss_mb_after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="tiny checkpoint (default: build one in a temp folder)")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker in every configuration: "
                    "1 worker with all cores vs 2 workers with half each measures threading, not serving")
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    ckpt = a.checkpoint
    if ckpt is None:
        from qwen_image_trt.models.tiny import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    res = {"machine": {"cpus": os.cpu_count(), "threads_per_worker": THREADS, "platform": platform.platform(), "python": platform.python_version()},
           "overhead": [overhead(ckpt, 100, "0"), overhead(ckpt, 100, "5")],
           "throughput": [throughput(ckpt, d, b, a.seconds) for d in ("cpu", "cpu,cpu") for b in (1, 8)],
           "burst": burst(ckpt)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_overhead.json").write_text(json.dumps(res, indent=2))
    (out / "serve_overhead.md").write_text(markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    lines = ["# qitrt serve on the tiny model", "", f"machine: {res['machine']}", "",
             "## Server overhead (1 CPU worker, sequential requests, 64x64, 4 steps)", "",
             "| max queue delay ms | round trip ms (median) | pipeline ms | queue ms | overhead ms median | p90 |",
             "|---|---|---|---|---|---|"]
    for o in res["overhead"]:
        lines.append(f"| {o['max_queue_delay_ms']:g} | {o['round_trip_ms_median']} | {o['pipeline_ms_median']} | "
                     f"{o['queue_ms_median']} | {o['overhead_ms_median']} | {o['overhead_ms_p90']} |")
    lines += ["", "## Throughput (64x64, 4 steps, 16 concurrent clients)", "",
              "| devices | max batch | images/s | mean batch | answers |", "|---|---|---|---|---|"]
    for t in res["throughput"]:
        lines.append(f"| {t['devices']} | {t['max_batch_size']} | {t['images_per_s']} | {t['mean_batch_images']} | "
                     f"{t['codes']} |")
    b = res["burst"]
    lines += ["", "## Burst", "", f"{b['requests']} requests at once, queue limit {b['max_queue_size']}: answers "
              f"{b['codes']} in {b['seconds']} s; server RSS (all processes) {b['rss_mb_before']} MB before, "
              f"{b['rss_mb_after']} MB after.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
