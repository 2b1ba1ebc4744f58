"""`qitrt bench batching` and `qitrt serve --batching-profile`: the limit rules on hand-made tables, a real run on the
tiny model writing a profile the server accepts, a real server honouring the profile's per-size limits, and
profiles that do not belong to what is served refused at start, naming the field."""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import threading

import pytest

from qwen_image_trt.bench.batching import (
    BatchingConfig,
    engines_identity,
    limits_from_rows,
    pick_max_batch,
    pick_queue_delay_ms,
)
from qwen_image_trt.cli import main
from qwen_image_trt.core.errors import InputError
from qwen_image_trt.core.identity import checkpoint_identity
from qwen_image_trt.runtime.limits import Limits
from qwen_image_trt.serve.batching_profile import _engines_identity
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.engine import Engine
from serve_helpers import ROOT, Server

# ---- (1) the rules on hand-made tables -----------------------------------------------------------------------------


@pytest.mark.parametrize("table,expected", [
    ({1: 10.0, 2: 18.0, 4: 30.0, 8: 31.0}, 4),  # 8 adds 3%: below the 5% threshold
    ({1: 10.0, 2: 10.2, 4: 10.1, 8: 9.0}, 1),  # batching never gains
    ({1: 10.0, 2: 9.0}, 1),  # batching loses
    ({1: 10.0, 2: 10.1, 4: 20.0}, 1),  # stops at the first batch that does not gain (the later rise is not taken)
    ({1: 10.0, 2: 18.0, 4: None, 8: 40.0}, 2),  # a failed cell (out of memory) ends the curve
    ({1: 10.0, 2: 10.5}, 2),  # exactly the threshold still counts
    ({1: 10.0, 4: 30.0, 2: 18.0}, 4),  # order of the table does not matter
])
def test_max_batch_is_the_last_batch_that_still_gains(table, expected):
    max_batch, steps = pick_max_batch(table, 1.05)
    assert max_batch == expected
    assert all(s["kept"] == (s["gain"] is not None and s["gain"] >= 1.05) for s in steps)
    assert [s["batch"] for s in steps if s["kept"]][-1:] == ([max_batch] if max_batch > 1 else [])


def test_threshold_and_baseline():
    assert pick_max_batch({1: 10.0, 2: 10.4, 4: 10.9}, 1.0)[0] == 4  # 1.0: any gain at all
    assert pick_max_batch({1: 10.0, 2: 11.0}, 1.2)[0] == 1
    with pytest.raises(InputError) as e:
        pick_max_batch({2: 10.0, 4: 20.0})
    assert e.value.field == "batch"


def test_queue_delay_rule():
    assert pick_queue_delay_ms(0.050, 4) == 5.0  # a tenth of the batch-1 latency
    assert pick_queue_delay_ms(4.0, 4) == 100.0  # capped
    assert pick_queue_delay_ms(0.050, 1) == 0.0  # nothing can join: no wait
    assert pick_queue_delay_ms(0.2, 2, fraction=0.5, cap_ms=1000) == 100.0


def _row(backend, size, batch, latency_s, cfg=True):
    w, h = (int(x) for x in size.split("x"))
    return dict(backend=backend, label=f"{backend}:fp32", width=w, height=h, size=size, batch=batch, cfg=cfg,
                latency_s=latency_s, images_per_s=batch / latency_s)


def test_limits_per_bucket_and_one_delay_per_backend():
    rows = [_row("torch", "64x64", 1, 0.040), _row("torch", "64x64", 2, 0.050), _row("torch", "64x64", 4, 0.095),
            _row("torch", "128x128", 1, 0.200), _row("torch", "128x128", 2, 0.400),  # no gain: max_batch 1
            _row("onnxruntime", "64x64", 1, 0.030), _row("onnxruntime", "64x64", 2, 0.060)]
    errors = [dict(label="torch:fp32", size="64x64", batch=8, cfg=True, stage="run", error="OOM")]
    out = limits_from_rows(rows, errors, BatchingConfig("x", batches=[1, 2, 4, 8]))
    small, big = out["torch"]["buckets"]
    assert (small["size"], small["max_batch"], small["max_queue_delay_ms"]) == ("64x64", 4, 4.0)
    assert small["images_per_s"]["8"] is None and small["gains"][-1] == {"batch": 8, "over": 4, "gain": None,
                                                                         "kept": False}
    assert (big["size"], big["max_batch"], big["max_queue_delay_ms"]) == ("128x128", 1, 0.0)
    assert out["torch"]["max_queue_delay_ms"] == 4.0  # the buckets that batch decide; 128x128 never waits anyway
    assert out["onnxruntime"]["buckets"][0]["max_batch"] == 1 and out["onnxruntime"]["max_queue_delay_ms"] == 0.0


# ---- (2) a real run on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def measured(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_batching")
    code = main(["bench", "batching", str(tiny_checkpoint), "--sizes", "32x32,64x64", "--batch", "1,2", "--steps",
                 "2", "--repeat", "2", "--warmup", "1", "--out", str(out), "--tag", "prof", "--no-progress"])
    return code, out


def test_a_real_run_writes_a_profile_the_server_accepts(measured, tiny_checkpoint):
    code, out = measured
    assert code == 0
    p = json.loads((out / "prof.json").read_text())
    assert p["format"] == "qwen-image-trt/batching-profile@1" and p["complete"] and not p["errors"]
    assert p["checkpoint"]["identity"] == checkpoint_identity(tiny_checkpoint) and p["engines"] is None
    assert p["machine"]["device_kind"] == "cpu" and p["machine"]["cpu_count"] == os.cpu_count()
    assert p["command"].startswith("qitrt bench batching") and p["rule"]["min_gain"] == 1.05
    assert {(r["label"], r["size"], r["batch"]) for r in p["rows"]} == {
        ("torch:fp32", s, b) for s in ("32x32", "64x64") for b in (1, 2)}  # only what was asked: no eager baseline
    assert list(p["backends"]) == ["torch"]
    buckets = p["backends"]["torch"]["buckets"]
    assert [b["size"] for b in buckets] == ["32x32", "64x64"] and all(b["cfg"] for b in buckets)
    for b in buckets:
        rows = {r["batch"]: r for r in p["rows"] if r["size"] == b["size"]}
        assert b["images_per_s"] == {str(k): pytest.approx(r["images_per_s"], rel=1e-3) for k, r in rows.items()}
        assert b["max_batch"] == pick_max_batch({k: r["images_per_s"] for k, r in rows.items()})[0]
        assert b["latency_ms_batch1"] == pytest.approx(rows[1]["latency_s"] * 1e3, rel=1e-3)
        assert b["max_queue_delay_ms"] == pick_queue_delay_ms(rows[1]["latency_s"], b["max_batch"])
    md = (out / "prof.md").read_text()
    assert "## Limits" in md and "| torch:fp32 | 64x64 | on |" in md and "## Raw table" in md
    png = (out / "prof_throughput_vs_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    cfg = ServerConfig(checkpoint=str(tiny_checkpoint), batching_profile=str(out / "prof.json"))
    assert cfg.batching_limits.backend == "torch" and not cfg.batching_limits.warnings
    assert cfg.queue_delay_ms == p["backends"]["torch"]["max_queue_delay_ms"]
    assert [b[3] for b in cfg.batching_limits.buckets] == [b["max_batch"] for b in buckets]


def test_bench_refuses_bad_grids(tiny_checkpoint, tmp_path, capsys):
    for argv, field in ((["--batch", "2,4"], "batch"), (["--batch", "1"], "batch"), (["--min-gain", "0.9"], "min_gain"),
                        (["--backend", "onnxruntime"], "engines"), (["--delay-fraction", "2"], "delay_fraction")):
        assert main(["bench", "batching", str(tiny_checkpoint), "--out", str(tmp_path / "o"), *argv]) == 2
        assert f"{field}=" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work


# ---- (3) a real server with the profile -----------------------------------------------------------------------------


def _concurrent(server, size: str, count: int) -> list[int]:
    """`count` CFG requests at once (CFG on, as the profile measured); the images of the batch each one ran in."""
    sizes, errors = [], []

    def one(i):
        try:
            r = server.post({"prompt": f"a cube {i}", "negative_prompt": " ", "size": size, "seed": i})
            assert r.status_code == 200, r.text
            sizes.append(int(r.headers["X-Batch-Images"]))
        except Exception as e:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return sorted(sizes)


def test_a_server_honours_the_profiles_per_size_limits(measured, tiny_checkpoint, tmp_path):
    _, out = measured
    p = json.loads((out / "prof.json").read_text())
    entry = p["backends"]["torch"]
    # the measured identities, with limits set by hand so the behaviour is certain: 32x32 never batches, 64x64 up to
    # 4 images, and a delay long enough for four concurrent requests to meet
    entry["buckets"][0]["max_batch"], entry["buckets"][1]["max_batch"] = 1, 4
    entry["max_queue_delay_ms"] = 1500.0
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(p))
    server = Server(tiny_checkpoint, tmp_path / "jobs", "--batching-profile", str(path), devices="cpu")
    try:
        b = server.health()["batching"]
        assert b["profile"] == str(path) and b["max_queue_delay_ms"] == 1500.0
        assert (b["max_batch_source"], b["max_queue_delay_source"]) == ("profile", "profile")
        assert [(s["size"], s["max_batch"]) for s in b["by_size"]] == [("32x32", 1), ("64x64", 4)]

        small = _concurrent(server, "32x32", 4)
        assert small == [1, 1, 1, 1]  # without the profile these four would share a call (default max 8)
        big = _concurrent(server, "64x64", 4)
        assert max(big) > 1 and max(big) <= 4  # batched, never beyond the bucket's limit
        # a size between the buckets takes the next larger bucket's limit (64x64: 4)
        assert max(_concurrent(server, "48x48", 3)) > 1
    finally:
        server.kill()


def test_a_server_refuses_a_profile_from_another_checkpoint(measured, tiny_checkpoint, tmp_path):
    _, out = measured
    p = json.loads((out / "prof.json").read_text())
    p["checkpoint"]["identity"] = "0123456789abcdef"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(p))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "qwen_image_trt.cli", "serve", str(tiny_checkpoint), "--devices",
                           "cpu", "--port", "1", "--jobs-dir", str(tmp_path / "jobs"), "--batching-profile", str(path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: checkpoint=" in done.stderr and "0123456789abcdef" in done.stderr and str(path) in done.stderr
    assert not (tmp_path / "jobs").exists()  # refused before the job store or any worker


# ---- (4) bad and mismatching profiles, and the fallback rules, without a server ------------------------------------


@pytest.fixture()
def hand_profile(tiny_checkpoint):
    """A valid profile for the tiny checkpoint on this machine, torch backend."""
    return {"format": "qwen-image-trt/batching-profile@1", "complete": True,
            "machine": {"device_kind": "cpu", "device_name": platform.processor() or platform.machine() or "cpu",
                        "cpu_count": os.cpu_count()},
            "checkpoint": {"path": str(tiny_checkpoint), "identity": checkpoint_identity(tiny_checkpoint)},
            "engines": None,
            "backends": {"torch": {"label": "torch:fp32", "max_queue_delay_ms": 12.5, "buckets": [
                {"size": "32x32", "cfg": True, "max_batch": 1},
                {"size": "64x64", "cfg": True, "max_batch": 4},
                {"size": "128x128", "cfg": True, "max_batch": 2},
                {"size": "16x16", "cfg": True, "max_batch": 16}]}}}


def _config(tiny_checkpoint, tmp_path, profile, **kw) -> ServerConfig:
    path = tmp_path / "p.json"
    path.write_text(profile if isinstance(profile, str) else json.dumps(profile))
    return ServerConfig(checkpoint=str(tiny_checkpoint), batching_profile=str(path), **kw)


def _edit(profile, where: str, value):
    out = copy.deepcopy(profile)
    *path, last = where.split(".")
    node = out
    for k in path:
        node = node[int(k)] if k.isdigit() else node[k]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return out


@pytest.mark.parametrize("where,value,field,allowed", [
    ("format", "qwen-image-trt/batching-profile@0", "format", "batching-profile@1"),
    ("complete", False, "complete", "finished"),
    ("backends.torch.buckets.1.max_batch", 0, "backends.torch.buckets[1].max_batch", "[1, 1024]"),
    ("backends.torch.buckets.1.max_batch", 4096, "backends.torch.buckets[1].max_batch", "[1, 1024]"),
    ("backends.torch.buckets.1.max_batch", "4", "backends.torch.buckets[1].max_batch", "[1, 1024]"),
    ("backends.torch.buckets.0.size", "65x64", "backends.torch.buckets[0].size", "multiple of 16"),
    ("backends.torch.buckets.0.cfg", "yes", "backends.torch.buckets[0].cfg", "true or false"),
    ("backends.torch.max_queue_delay_ms", -1, "backends.torch.max_queue_delay_ms", "[0, 60000]"),
    ("backends.torch.buckets", [], "backends.torch.buckets", "non-empty"),
    ("backends", {"onnxruntime": {}}, "backend", "onnxruntime"),  # measured for another backend
    ("machine.device_kind", "cuda", "devices", "cuda devices"),  # measured on a GPU, served on a CPU
    ("checkpoint.identity", "feedfacefeedface", "checkpoint", "feedfacefeedface"),
])
def test_bad_profiles_are_refused_naming_the_field(tiny_checkpoint, tmp_path, hand_profile, where, value, field,
                                                   allowed):
    with pytest.raises(InputError) as e:
        _config(tiny_checkpoint, tmp_path, _edit(hand_profile, where, value))
    assert e.value.field == field and allowed in e.value.allowed


def test_unreadable_profile_files(tiny_checkpoint, tmp_path):
    with pytest.raises(InputError) as e:
        ServerConfig(checkpoint=str(tiny_checkpoint), batching_profile=str(tmp_path / "missing.json"))
    assert e.value.field == "batching_profile" and "qitrt bench batching" in e.value.allowed
    with pytest.raises(InputError) as e:
        _config(tiny_checkpoint, tmp_path, "{not json")
    assert e.value.field == "batching_profile" and "not JSON" in e.value.allowed
    with pytest.raises(InputError) as e:
        _config(tiny_checkpoint, tmp_path, "[1, 2]")
    assert e.value.field == "format"


def test_another_cpu_is_let_through_with_a_warning(tiny_checkpoint, tmp_path, hand_profile):
    cfg = _config(tiny_checkpoint, tmp_path, _edit(hand_profile, "machine.cpu_count", 999))
    assert "999 cores" in cfg.batching_limits.warnings[0]
    assert Engine(cfg, Limits()).batching_info()["warnings"] == list(cfg.batching_limits.warnings)


def test_per_size_limits_fallbacks_and_explicit_flags(tiny_checkpoint, tmp_path, hand_profile):
    def limit(engine, w, h, cfg_on=True):
        return engine.batch_limit((w, h, 2, cfg_on, "text-to-image", None, "", ()))

    cfg = _config(tiny_checkpoint, tmp_path, hand_profile)
    e = Engine(cfg, Limits())  # no engine folder: 64 images per call at most
    assert cfg.queue_delay_ms == 12.5 and e.batcher.max_delay_s == 0.0125
    assert [limit(e, 32, 32), limit(e, 64, 64), limit(e, 128, 128)] == [1, 4, 2]
    assert limit(e, 16, 16) == 16  # measured to gain: above the server's default of 8
    assert limit(e, 48, 48) == 4 and limit(e, 64, 32) == 4  # between buckets: the next larger one's limit
    assert limit(e, 32, 64) == 4 and limit(e, 16, 32) == 1
    assert limit(e, 256, 256) == 2  # bigger than every bucket: the biggest one's limit (and at most the default)
    assert limit(e, 64, 64, cfg_on=False) == 8  # a CFG mode the profile did not measure: the default
    assert e.max_images(True) == 8  # the door's bound on a request's n is unchanged
    assert limit(Engine(cfg, Limits(batch=(1, 2))), 64, 64) == 2  # the engine's profile still caps

    flags = _config(tiny_checkpoint, tmp_path, hand_profile, max_batch_size=3, max_queue_delay_ms=7.0)
    e = Engine(flags, Limits())
    assert [limit(e, 32, 32), limit(e, 64, 64), limit(e, 16, 16)] == [3, 3, 3]  # explicit flags win
    assert flags.queue_delay_ms == 7.0 and e.batcher.max_delay_s == 0.007
    assert e.batching_info()["max_batch_source"] == "--max-batch-size"
    delay_only = _config(tiny_checkpoint, tmp_path, hand_profile, max_queue_delay_ms=0.0)
    assert delay_only.queue_delay_ms == 0.0 and limit(Engine(delay_only, Limits()), 64, 64) == 4

    plain = ServerConfig(checkpoint="x")  # no profile: nothing changes
    assert plain.batching_limits is None and plain.queue_delay_ms == 5.0
    assert limit(Engine(plain, Limits()), 32, 32) == 8


def _engine_folder(root, graph_sha: str):
    from qwen_image_trt.core.manifest import CheckpointRef, Component, GraphFile, Manifest, write_manifest

    manifest = Manifest(stage="export", precision="fp32", opset=18, exporter="dynamo", versions={},
                        checkpoint=CheckpointRef(path="ckpt", identity="c" * 16, pipeline="QwenImagePipeline",
                                                 transformer_config={}, vae_config={}),
                        components={"transformer": Component(graph=GraphFile(file="t.onnx", sha256=graph_sha, bytes=1),
                                                             precision="fp32", source={}, inputs=[], outputs=[],
                                                             dynamic_axes={})})
    root.mkdir()
    write_manifest(root, manifest)
    return root, manifest


def test_a_profile_is_bound_to_its_engine_folder(tiny_checkpoint, tmp_path, hand_profile):
    measured, manifest = _engine_folder(tmp_path / "measured", "a" * 64)
    rebuilt, other = _engine_folder(tmp_path / "rebuilt", "b" * 64)
    assert engines_identity(manifest) == _engines_identity(manifest) != engines_identity(other)  # writer == reader
    profile = copy.deepcopy(hand_profile)
    profile["engines"] = {"path": str(measured), "identity": engines_identity(manifest)}
    profile["backends"] = {"onnxruntime": profile["backends"]["torch"]}
    cfg = _config(tiny_checkpoint, tmp_path, profile, engines=str(measured))
    assert cfg.batching_limits.backend == "onnxruntime"
    with pytest.raises(InputError) as e:
        _config(tiny_checkpoint, tmp_path, profile, engines=str(rebuilt))
    assert e.value.field == "engines" and engines_identity(manifest) in e.value.allowed
    with pytest.raises(InputError) as e:  # the same profile for a torch server: that backend was not measured
        _config(tiny_checkpoint, tmp_path, profile)
    assert e.value.field == "backend" and "onnxruntime" in e.value.allowed


def test_the_served_flag_exists():
    from qwen_image_trt.cli import build_parser

    a = build_parser().parse_args(["serve", "ckpt", "--batching-profile", "p.json"])
    assert a.batching_profile == "p.json" and a.max_queue_delay_ms is None
