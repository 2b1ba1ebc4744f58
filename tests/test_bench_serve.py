"""Load generator: loop and statistics logic against an in-process stand-in (httpx MockTransport), clear errors
for an unreachable server, and (where the server package is present) one real run with `--start`."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import httpx
import pytest

from qwen_image_trt.bench import serve_load
from qwen_image_trt.bench.serve_load import LoadConfig, ServerUnreachable, run_serve_load
from qwen_image_trt.cli import main
from qwen_image_trt.errors import InputError


class StandIn:
    """A tiny fake of `qitrt serve`: fixed service time, every 5th request refused with 429, a batch histogram."""

    def __init__(self, service_s=0.01):
        self.service_s, self.calls, self.batches = service_s, 0, []

    def metrics(self) -> str:
        lines = ["# TYPE qitrt_batch_images histogram"]
        for le in ("1.0", "2.0", "4.0", "+Inf"):
            bound = float("inf") if le == "+Inf" else float(le)
            lines.append(f'qitrt_batch_images_bucket{{le="{le}"}} {sum(1 for b in self.batches if b <= bound)}')
        lines += [f"qitrt_batch_images_sum {sum(self.batches)}", f"qitrt_batch_images_count {len(self.batches)}"]
        return "\n".join(lines) + "\n"

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok", "ready": True})
        if request.url.path == "/metrics":
            return httpx.Response(200, text=self.metrics())
        body = json.loads(request.content)
        assert body["response_format"] == "b64_json" and body["size"] == "32x32" and body["negative_prompt"] == " "
        self.calls += 1
        if self.calls % 5 == 0:
            return httpx.Response(429, json={"error": {"message": "full", "type": "queue_full", "code": "queue_full"}})
        await asyncio.sleep(self.service_s)
        self.batches.append(2)
        return httpx.Response(200, json={"data": [{"b64_json": "AAAA"}] * body["n"]},
                              headers={"X-Queue-Time-Ms": "1.5", "X-Compute-Time-Ms": "8.0", "X-Batch-Images": "2"})


def test_closed_and_open_loop_statistics():
    stand_in = StandIn()
    cfg = LoadConfig(url="http://stand-in", concurrency=[1, 3], rates=[100.0], duration_s=0.3, requests=None,
                     size="32x32", steps=2, n=2, warmup_requests=1, progress=False)
    updates = []
    result = run_serve_load(cfg, on_update=lambda r: updates.append(len(r["phases"])),
                            transport=httpx.MockTransport(stand_in))
    assert result["complete"] and [p["phase"] for p in result["phases"]] == ["concurrency=1", "concurrency=3",
                                                                             "rate=100/s"]
    assert updates[:3] == [1, 2, 3]  # written after every phase
    for p in result["phases"]:
        assert p["sent"] == p["ok"] + p["failed"] and p["ok"] > 0
        assert set(p["errors"]) <= {"http_429:queue_full"}
        assert p["images"] == 2 * p["ok"] and p["images_per_s"] == pytest.approx(2 * p["requests_per_s"])
        lat = p["latency_s"]
        assert 0.01 <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert p["queue_s"]["p50"] == pytest.approx(0.0015) and p["compute_s"]["p50"] == pytest.approx(0.008)
        assert p["batch_images_by_request"] == {"2": p["ok"]}
        assert p["batch_images_by_call"]["count"] == p["ok"] and p["batch_images_by_call"]["mean"] == 2.0
    # three clients finish more requests in the same time than one
    assert result["phases"][1]["ok"] > result["phases"][0]["ok"]
    assert result["phases"][2]["mode"] == "open" and result["phases"][2]["offered_rate"] == 100.0


def test_fixed_request_count_per_phase():
    stand_in = StandIn(service_s=0.0)
    cfg = LoadConfig(url="http://stand-in", concurrency=[4], requests=10, size="32x32", warmup_requests=0,
                     progress=False)
    result = run_serve_load(cfg, transport=httpx.MockTransport(stand_in))
    assert result["phases"][0]["sent"] == 10 and result["phases"][0]["errors"] == {"http_429:queue_full": 2}


def test_compute_ceiling():
    ok = [{"batch_images": 4, "compute_s": 0.5}, {"batch_images": 2, "compute_s": 0.5}, {"batch_images": 1}]
    assert serve_load.compute_ceiling(ok, workers=2) == 2 * 6.0  # median of 8 and 4 images/s, two workers
    assert serve_load.compute_ceiling(ok, workers=None) is None
    assert serve_load.compute_ceiling([{"images": 1}], workers=1) is None


def test_prometheus_parsing():
    before = serve_load.parse_prometheus('x_bucket{le="1.0"} 1\nx_bucket{le="+Inf"} 2\nx_sum 3\nx_count 2\n')
    after = serve_load.parse_prometheus('# HELP x\nx_bucket{le="1.0"} 2\nx_bucket{le="+Inf"} 5\nx_sum 10\n'
                                        'x_count 5\nother 1\n')
    d = serve_load.histogram_delta(before, after, "x")
    assert d["count"] == 3 and d["sum"] == 7 and d["mean"] == pytest.approx(7 / 3)
    assert d["buckets"] == {"1.0": 1, "+Inf": 2}
    assert serve_load.histogram_delta({}, after, "missing") is None


def test_bad_load_config():
    with pytest.raises(InputError, match="concurrency"):
        LoadConfig(url="http://x").check()
    with pytest.raises(InputError, match="url"):
        LoadConfig(url="localhost:8000", concurrency=[1]).check()


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{serve_load.free_port()}"
    with pytest.raises(ServerUnreachable, match="cannot reach"):
        run_serve_load(LoadConfig(url=url, concurrency=[1], duration_s=1, progress=False))
    code = main(["bench", "serve", url, "--concurrency", "1", "--duration", "1", "--out", str(tmp_path),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach" in err and "qitrt serve" in err
    result = json.loads((tmp_path / "serve.json").read_text())
    assert not result["complete"] and result["errors"][0]["phase"] == "health"


def test_url_or_start(capsys):
    assert main(["bench", "serve", "--concurrency", "1"]) == 2
    assert "--start" in capsys.readouterr().err


def _server_available() -> bool:
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        return False
    try:
        from qwen_image_trt.serve.app import create_app  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _server_available(), reason="qwen_image_trt.serve has no app yet (or fastapi is missing)")
def test_start_the_real_server(tiny_checkpoint, tiny_engines, tmp_path):
    out = tmp_path / "serve"
    code = main(["bench", "serve", "--start", str(tiny_checkpoint), "--engines", str(tiny_engines), "--devices", "cpu",
                 "--max-batch-size", "4", "--max-queue-delay-ms", "20", "--start-timeout", "300",
                 "--concurrency", "1,2", "--requests", "2", "--rate", "2", "--duration", "1",
                 "--size", "32x32", "--steps", "2", "--out", str(out), "--no-progress"])
    result = json.loads((out / "serve.json").read_text())
    assert code == 0, result["errors"]
    assert result["server"]["started_by_bench"] and result["server_health"]["ready"]
    phases = {p["phase"]: p for p in result["phases"]}
    assert phases["concurrency=1"]["ok"] == 2 and phases["concurrency=2"]["ok"] == 2
    for p in result["phases"]:
        assert p["failed"] == 0 and p["queue_s"]["p50"] is not None
        assert p["batch_images_by_call"] and p["batch_images_by_call"]["count"] >= 1
        # every figure beside the server's compute-bound ceiling (one worker here)
        assert 0 < p["images_per_s"] <= p["ceiling_images_per_s"] * 1.05
    assert (out / "serve_throughput_vs_concurrency.png").stat().st_size > 5000
    assert (out / "serve_throughput_vs_rate.png").is_file() and (out / "serve_server.log").is_file()
