"""Load generator: closed and open loops against a real `qitrt serve` it starts itself, statistics helpers,
and clear errors for bad input and an unreachable server."""

from __future__ import annotations

import json

import pytest

from qwen_image_trt.bench import serve_load
from qwen_image_trt.bench.serve_load import LoadConfig, ServerUnreachable, run_serve_load
from qwen_image_trt.cli import main
from qwen_image_trt.core.errors import InputError


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
    with pytest.raises(InputError, match="repeat"):
        LoadConfig(url="http://x", concurrency=[1], repeat=0).check()


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


def test_start_the_real_server(tiny_checkpoint, tiny_engines, tmp_path):
    out = tmp_path / "serve"
    code = main(["bench", "serve", "--start", str(tiny_checkpoint), "--engines", str(tiny_engines), "--devices", "cpu",
                 "--max-batch-size", "4", "--max-queue-delay-ms", "20", "--start-timeout", "300",
                 "--concurrency", "1,2", "--requests", "2", "--rate", "2", "--duration", "1", "--repeat", "2",
                 "--size", "32x32", "--steps", "2", "--out", str(out), "--no-progress"])
    result = json.loads((out / "serve.json").read_text())
    assert code == 0, result["errors"]
    assert result["server"]["started_by_bench"] and result["server_health"]["ready"]
    phases = {p["phase"]: p for p in result["phases"]}
    assert phases["concurrency=1"]["ok"] == 2 and phases["concurrency=2"]["ok"] == 2
    assert [p["mode"] for p in result["phases"]] == ["closed", "closed", "open"]
    assert result["phases"][2]["offered_rate"] == 2.0
    assert all(len(p["runs"]) == 2 for p in result["phases"])  # each phase twice, the median run shown
    rates = sorted(r["images_per_s"] for r in phases["concurrency=2"]["runs"])
    assert phases["concurrency=2"]["images_per_s"] == rates[0]  # the lower median of two runs
    assert "img/s spread" in (out / "serve.md").read_text()
    for p in result["phases"]:
        assert p["failed"] == 0 and p["sent"] == p["ok"] and p["images"] == p["ok"]  # n=1
        assert p["images_per_s"] == pytest.approx(p["requests_per_s"])
        lat = p["latency_s"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        # queue and compute time come from the server's headers; a request waits at least its compute
        assert 0 <= p["queue_s"]["p50"] and 0 < p["compute_s"]["p50"] <= lat["max"]
        assert sum(p["batch_images_by_request"].values()) == p["ok"]
        assert p["batch_images_by_call"] and p["batch_images_by_call"]["count"] >= 1
        # every figure beside the server's compute-bound ceiling (one worker here)
        assert 0 < p["images_per_s"] <= p["ceiling_images_per_s"] * 1.05
    assert (out / "serve_throughput_vs_concurrency.png").stat().st_size > 5000
    assert (out / "serve_throughput_vs_rate.png").is_file() and (out / "serve_server.log").is_file()
