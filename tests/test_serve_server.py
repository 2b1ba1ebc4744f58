"""A real `qitrt serve` (subprocess, uvicorn on loopback) with the tiny model and two CPU workers.

Tests run in file order against one server: the metrics test checks the counts the earlier ones produced, and
the last test shuts the server down gracefully.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from qwen_image_trt.bench.serve_load import metric_sum

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
QUEUE = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "QITRT_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "qwen_image_trt.cli", "serve", str(tiny_checkpoint),
                             "--devices", "cpu,cpu", "--port", str(port), "--max-queue-size", str(QUEUE),
                             "--max-queue-delay-ms", "40", "--max-batch-size", "8", "--default-size", "64x64",
                             "--default-steps", "2", "--max-body-bytes", "65536", "--shutdown-grace-s", "20",
                             "--jobs-dir", str(tmp_path_factory.mktemp("jobs")), "--min-timeout-s", "0.1"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            h = httpx.get(url + "/health", timeout=2).json()
            if all(w["ready"] for w in h["workers"]):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not become ready: " + proc.stdout.read())
    yield {"url": url, "proc": proc}
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def twin_pipe(tiny_checkpoint):
    from qwen_image_trt import load_pipeline

    return load_pipeline(tiny_checkpoint, backend="torch")


def twin(pipe, prompt, seed, size=64, steps=2, negative_prompt=None, scale=4.0) -> np.ndarray:
    """The same request run alone, in this process."""
    import torch

    kw = dict(negative_prompt=negative_prompt, true_cfg_scale=scale) if negative_prompt else dict(true_cfg_scale=1.0)
    img = pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]
    return np.asarray(img, dtype=np.int16)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def b64png(item: dict) -> np.ndarray:
    return png(base64.b64decode(item["b64_json"]))


def post(server, body, path="/v1/images/generations", **kw):
    return httpx.post(server["url"] + path, json=body, headers=AUTH, timeout=60, **kw)


def metric(server, name: str, **labels) -> float:
    return metric_sum(httpx.get(server["url"] + "/metrics", headers=AUTH).text, name, **labels)


def test_openai_client(server, twin_pipe):
    from openai import OpenAI

    client = OpenAI(base_url=server["url"] + "/v1", api_key=KEY)
    res = client.images.generate(prompt="a red cube", n=2, size="64x64", response_format="b64_json",
                                 extra_body={"seed": 7, "num_inference_steps": 2})
    assert len(res.data) == 2
    for i, item in enumerate(res.data):
        img = png(base64.b64decode(item.b64_json))
        assert img.shape == (64, 64, 3)
        assert np.abs(img - twin(twin_pipe, "a red cube", 7 + i)).max() <= 1  # n>1: seeds seed, seed+1, ...


def test_api_key_required_except_health(server):
    assert httpx.post(server["url"] + "/v1/images/generations", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server["url"] + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server["url"] + "/v1/jobs/nope").status_code == 401
    h = httpx.get(server["url"] + "/health").json()
    assert h["ready"] and len(h["workers"]) == 2
    assert {"device", "ready", "in_flight", "completed", "last_error", "uptime_s", "pid"} <= set(h["workers"][0])


def test_concurrent_requests_batch_and_equal_their_unbatched_twins(server, twin_pipe):
    reqs = [{"prompt": f"prompt number {i} " + "word " * (i % 5), "seed": 100 + i, "size": "64x64",
             "num_inference_steps": 2, **({"negative_prompt": "blurry", "true_cfg_scale": 3.0 + i % 3}
                                          if i % 2 else {})} for i in range(36)]

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*[c.post(server["url"] + "/v1/images/generations", json=r) for r in reqs])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * len(reqs), [r.text for r in responses if r.status_code != 200]
    batch_sizes = [int(r.headers["x-batch-images"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    assert {r.headers["x-worker"] for r in responses} == {"0", "1"}
    for req, res in zip(reqs, responses):
        got = b64png(res.json()["data"][0])
        want = twin(twin_pipe, req["prompt"], req["seed"], negative_prompt=req.get("negative_prompt"),
                    scale=req.get("true_cfg_scale", 4.0))
        assert np.abs(got - want).max() <= 1, (req, res.headers["x-batch-images"])


def test_step_cache_request_equals_its_in_process_twin(server, twin_pipe):
    """A request's step cache runs in the worker exactly as `pipe(..., step_cache=)` does in process."""
    import torch

    body = {"prompt": "a cached fox", "seed": 5, "size": "64x64", "num_inference_steps": 8,
            "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    cached, plain = post(server, {**body, "step_cache": 0.5}), post(server, body)
    assert cached.status_code == plain.status_code == 200, (cached.text, plain.text)
    want = twin_pipe(prompt=body["prompt"], negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
                     num_inference_steps=8, generator=torch.Generator("cpu").manual_seed(5), step_cache=0.5).images[0]
    assert twin_pipe.step_cache_stats.skipped > 0  # the cache did skip steps, so the comparison means something
    got = b64png(cached.json()["data"][0])
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    assert np.abs(got - b64png(plain.json()["data"][0])).max() > 1  # and the uncached request differs


BAD = [
    ({"prompt": "x", "size": "64"}, 400, "size"),
    ({"prompt": "x", "size": "72x64"}, 400, "size"),
    ({"prompt": "x", "size": "8192x64"}, 400, "size"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1000}, 400, "num_inference_steps"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 99}, 400, "n"),
    ({"prompt": "x", "n": "2"}, 422, "n"),
    ({"prompt": "x", "seed": 1.5}, 422, "seed"),
    ({"prompt": "x", "num_inference_steps": "many"}, 422, "num_inference_steps"),
    ({"prompt": "x", "colour": "red"}, 422, "colour"),
    ({"prompt": "x", "response_format": "url"}, 422, "response_format"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"prompt": "x" * 5000}, 400, "prompt"),
    ({}, 422, "prompt"),
    ({"prompt": "x", "priority": 7}, 400, "priority"),
    ({"prompt": "x", "timeout": -1}, 400, "timeout"),
    ({"prompt": "x", "step_cache": 5}, 400, "step_cache"),
    ({"prompt": "x", "step_cache": "on"}, 422, "step_cache"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_field_and_allowed(server, body, status, field):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["allowed"], err


def test_non_json_and_oversized_bodies_then_still_serving(server):
    json_auth = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(server["url"] + "/v1/images/generations", content=b"{not json", headers=json_auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = httpx.post(server["url"] + "/v1/jobs", content=b"[1, 2]", headers=json_auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = post(server, {"prompt": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    assert post(server, {"prompt": "still serving"}).status_code == 200


def test_timeout_gives_504(server):
    t0 = time.monotonic()
    r = post(server, {"prompt": "slow", "size": "256x256", "num_inference_steps": 30, "timeout": 0.2})
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert time.monotonic() - t0 < 5


def wait_job(server, job_id, until, limit=60.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        s = httpx.get(f"{server['url']}/v1/jobs/{job_id}", headers=AUTH).json()
        if until(s):
            return s
        time.sleep(0.02)
    pytest.fail(f"job {job_id} stuck: {s}")


def test_job_progress_and_png_result(server, twin_pipe):
    r = post(server, {"prompt": "a job", "seed": 3, "size": "128x128", "num_inference_steps": 12}, path="/v1/jobs")
    assert r.status_code == 202 and r.json()["status"] == "queued"
    jid = r.json()["id"]
    running = wait_job(server, jid, lambda s: s["status"] != "queued" or s["progress"]["step"] > 0)
    assert running["status"] in ("running", "succeeded")
    done = wait_job(server, jid, lambda s: s["status"] == "succeeded")
    assert done["progress"] == {"step": 12, "total": 12} and done["compute_time_s"] > 0
    res = httpx.get(f"{server['url']}/v1/jobs/{jid}/result", headers=AUTH)
    assert res.headers["content-type"] == "image/png"
    assert np.abs(png(res.content) - twin(twin_pipe, "a job", 3, size=128, steps=12)).max() <= 1
    assert httpx.delete(f"{server['url']}/v1/jobs/{jid}", headers=AUTH).status_code == 200
    assert httpx.get(f"{server['url']}/v1/jobs/{jid}", headers=AUTH).status_code == 404


def test_queue_full_429_then_cancel_everything(server):
    slow = {"prompt": "fill", "size": "128x128", "num_inference_steps": 100}

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            return await asyncio.gather(*[c.post(server["url"] + "/v1/jobs", json={**slow, "seed": i})
                                          for i in range(QUEUE + 30)])

    responses = asyncio.run(main())
    assert {r.status_code for r in responses} == {202, 429}
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    rejected = next(r for r in responses if r.status_code == 429)
    assert int(rejected.headers["retry-after"]) >= 1
    assert rejected.json()["error"]["type"] == "queue_full"
    assert QUEUE <= len(accepted) <= QUEUE + 16  # the queue, plus at most one batch per worker in flight
    try:
        # Responses come back in list order, not arrival order, and a batch may leave the queue meanwhile:
        # what must hold is that the queued jobs hold distinct places counted from 0.
        states = [httpx.get(f"{server['url']}/v1/jobs/{j}", headers=AUTH).json() for j in accepted]
        positions = [st["queue_position"] for st in states if st["status"] == "queued"]
        assert len(positions) >= QUEUE - 16 and len(set(positions)) == len(positions)
        assert all(0 <= p < len(accepted) for p in positions)
    finally:  # never leave 100-step jobs behind for the next test's workers
        for j in accepted:
            s = httpx.delete(f"{server['url']}/v1/jobs/{j}", headers=AUTH).json()
            assert s["status"] in ("cancelled", "succeeded")
    # the running batches (every request cancelled) stop at their next step: workers are free again soon
    deadline = time.monotonic() + 30
    while any(w["in_flight"] for w in httpx.get(server["url"] + "/health").json()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.get(server["url"] + "/health").json()["queue_length"] == 0


def test_killed_worker_requeues_its_requests(server, twin_pipe):
    body = {"prompt": "survive", "size": "192x192", "num_inference_steps": 30}
    jobs = [post(server, {**body, "seed": 50 + i}, path="/v1/jobs").json()["id"] for i in range(3)]
    wait_job(server, jobs[0], lambda s: s["status"] == "running" and s["progress"]["step"] >= 2)
    victim = next(w for w in httpx.get(server["url"] + "/health").json()["workers"] if w["in_flight"])
    os.kill(victim["pid"], signal.SIGKILL)
    finals = [wait_job(server, j, lambda s: s["status"] in ("succeeded", "failed", "cancelled"), 120) for j in jobs]
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    assert max(f["attempts"] for f in finals) == 2  # re-queued once
    res = httpx.get(f"{server['url']}/v1/jobs/{jobs[0]}/result", headers=AUTH)
    assert np.abs(png(res.content) - twin(twin_pipe, "survive", 50, size=192, steps=30)).max() <= 1
    w = httpx.get(server["url"] + "/health").json()["workers"][victim["index"]]
    assert w["restarts"] == 1 and w["pid"] != victim["pid"] and "died" in w["last_error"]


def test_burst_beyond_queue_limit_every_request_answered(server):
    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(headers=AUTH, timeout=120, limits=limits) as c:
            return await asyncio.gather(*[c.post(server["url"] + "/v1/images/generations",
                                                 json={"prompt": f"burst {i}", "seed": i, "timeout": 30})
                                          for i in range(150)])

    codes = [r.status_code for r in asyncio.run(main())]
    assert set(codes) <= {200, 429, 504}, codes
    assert codes.count(429) > 0 and codes.count(200) >= QUEUE


def test_metrics_count_what_happened(server):
    deadline = time.monotonic() + 120  # the worker killed above is back
    while not all(w["ready"] for w in httpx.get(server["url"] + "/health").json()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    gen = "/v1/images/generations"
    assert metric(server, "qitrt_requests_total", endpoint=gen, outcome="ok") >= 36 + 1 + 1 + QUEUE
    assert metric(server, "qitrt_requests_total", endpoint=gen, outcome="invalid") >= len(BAD) + 1
    assert metric(server, "qitrt_requests_total", endpoint=gen, outcome="timeout") >= 1
    assert metric(server, "qitrt_requests_total", endpoint=gen, outcome="too_large") == 1
    assert metric(server, "qitrt_requests_total", endpoint=gen, outcome="queue_full") >= 1
    assert metric(server, "qitrt_requests_total", endpoint="/v1/jobs", outcome="queue_full") >= 1
    assert metric(server, "qitrt_requeued_total") >= 1
    calls = metric(server, "qitrt_batch_images_count")
    assert metric(server, "qitrt_batch_images_bucket", le="1.0") < calls  # some batches held several images
    assert metric(server, "qitrt_images_total") > calls
    assert metric(server, "qitrt_worker_restarts", worker="0") + metric(server, "qitrt_worker_restarts",
                                                                         worker="1") == 1
    assert metric(server, "qitrt_queue_length") == 0
    # repeated prompts and negatives ("blurry", the twins above) came from the workers' embedding caches
    assert metric(server, "qitrt_embedding_cache_total", event="hits") > 0
    assert metric(server, "qitrt_embedding_cache_total", event="misses") > 0


def test_graceful_shutdown_finishes_in_flight(server):
    result = {}

    def slow():
        result["r"] = post(server, {"prompt": "last one", "size": "128x128", "num_inference_steps": 20})

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.monotonic() + 30
    while not any(w["in_flight"] for w in httpx.get(server["url"] + "/health").json()["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pids = [w["pid"] for w in httpx.get(server["url"] + "/health").json()["workers"]]
    server["proc"].send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].status_code == 200
    assert server["proc"].wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
