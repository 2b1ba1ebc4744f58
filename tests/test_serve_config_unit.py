"""Server settings and the door's rules, without a server: each refusal names its field."""

from __future__ import annotations

import pytest

from qwen_image_trt.core.errors import InputError
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.guard import Guard, _host_name


@pytest.mark.parametrize("kw,field", [
    ({"heartbeat_timeout_s": 1.5, "heartbeat_interval_s": 1.0}, "heartbeat_timeout_s"),
    ({"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
    ({"stall_factor": -1}, "stall_factor"),
    ({"header_timeout_s": 0}, "header_timeout_s"),
    ({"max_connections": 0}, "max_connections"),
    ({"jobs_max_bytes": 0}, "jobs_max_bytes"),
    ({"min_timeout_s": 700.0}, "min_timeout_s"),
])
def test_bad_settings_name_their_field(kw, field):
    with pytest.raises(InputError) as e:
        ServerConfig(checkpoint="x", **kw)
    assert e.value.field == field and e.value.allowed


def test_host_allow_list_follows_the_bind():
    assert "localhost" in ServerConfig(checkpoint="x").host_allowlist()
    assert "127.0.0.2" in ServerConfig(checkpoint="x", host="127.0.0.2").host_allowlist()
    assert ServerConfig(checkpoint="x", host="0.0.0.0").host_allowlist() is None  # exposed on purpose: any name
    assert ServerConfig(checkpoint="x", allowed_hosts="img.example, Api.Example").host_allowlist() == \
        ["img.example", "api.example"]
    assert ServerConfig(checkpoint="x", allowed_hosts="*").host_allowlist() is None


def test_jobs_dir_default_is_per_port(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert ServerConfig(checkpoint="x", port=8123).resolved_jobs_dir == str(tmp_path / "qitrt" / "jobs-8123")
    assert ServerConfig(checkpoint="x", jobs_dir="/data/jobs").resolved_jobs_dir == "/data/jobs"


@pytest.mark.parametrize("host,name", [("localhost:8000", "localhost"), ("[::1]:8000", "[::1]"), ("::1", "::1"),
                                       ("Example.COM", "example.com"), ("", "")])
def test_host_header_parsing(host, name):
    assert _host_name(host) == name


def check(method="POST", path="/v1/jobs", key="k", hosts=("127.0.0.1", "localhost"), **headers):
    base = {"host": "127.0.0.1:8000", "authorization": "Bearer k", "content-type": "application/json"}
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    base = {k: v for k, v in base.items() if v is not None}
    return Guard(None, key, list(hosts) if hosts else None).check(method, path, base)


def test_guard_rules():
    assert check() is None
    assert check(content_type="application/json; charset=utf-8") is None
    assert check(method="GET", content_type=None) is None
    assert check(host="evil.example")[0] == 400 and check(host="evil.example")[1]["error"]["param"] == "Host"
    assert check(host="evil.example", hosts=None) is None
    status, body, extra = check(authorization="Bearer wrong", x_api_key="k")
    assert status == 401 and extra["www-authenticate"].startswith("Bearer")  # Authorization decides when present
    assert check(authorization=None, x_api_key="k") is None
    assert check(authorization="Basic k")[0] == 401
    assert check(path="/health", authorization=None, method="GET") is None
    assert check(path="/docs", authorization=None, method="GET")[0] == 401
    assert check(key=None, authorization=None) is None
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        status, body, _ = check(content_type=ctype)
        assert status == 415 and body["error"]["allowed"] == "application/json"


def test_a_batch_goes_to_an_idle_worker_that_holds_its_key_warm(tiny_checkpoint):
    from qwen_image_trt.serve.executor import WARM_KEYS, Executor

    ex = Executor(ServerConfig(checkpoint=str(tiny_checkpoint), devices="cpu,cpu"), lambda *a: None,
                  lambda *a: None)
    a, b = ex.workers
    a.ready = b.ready = True
    a.completed, b.completed = 0, 10  # without affinity, the less used worker (a) would be picked
    b.warm = [("64x64", "style-lora")]
    assert ex.idle_worker(("64x64", "style-lora")) is b
    assert ex.idle_worker(("64x64", "another")) is a
    b.batch = object()  # busy: the warm worker is not waited for
    assert ex.idle_worker(("64x64", "style-lora")) is a
    assert WARM_KEYS >= 2
