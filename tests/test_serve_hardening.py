"""Serve hardening against a real `qitrt serve` on loopback: bad requests fail alone, stopped and wedged workers
are replaced, idle and half-sent connections are closed, the door refuses what browsers could smuggle in, a
SIGTERM drains, and async jobs survive a SIGKILL of the whole server. Faults are real signals and sockets; the
pipeline failure and the GPU wedge are injected in the real worker through its documented environment switches.
The tests on the module's server run in file order; the metrics test checks what the earlier ones caused.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import AUTH, HANG, KEY, POISON, Server, connect, free_port, read_all, wait_until

HEADER_TIMEOUT_S, MAX_CONNECTIONS = 1.5, 40


@pytest.fixture(scope="module")
def srv(tiny_checkpoint, tmp_path_factory):
    s = Server(tiny_checkpoint, tmp_path_factory.mktemp("jobs"), "--max-queue-delay-ms", "300",
               "--max-batch-size", "8", "--heartbeat-interval-s", "0.5", "--heartbeat-timeout-s", "3",
               "--stall-first-s", "8", "--stall-min-s", "4", "--stall-factor", "5",
               "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", "2", "--keep-alive-s", "30",
               "--max-connections", str(MAX_CONNECTIONS), "--max-retries", "1")
    yield s
    s.kill()


# ---- 1. failure isolation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogate_is_a_400_at_the_edge(srv, field):
    body = b'{"prompt": "a cat", "' + field.encode() + b'": "bad \\ud800 text"}'
    r = httpx.post(srv.url + "/v1/images/generations", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and "surrogate" in err["message"] and err["allowed"]


def test_a_failing_request_fails_alone_and_its_batch_mates_succeed(srv):
    isolated = srv.metric("qitrt_isolated_total")
    prompts = ["good one", f"bad {POISON}", "good two", "good three"]

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=90) as c:
            return await asyncio.gather(*[c.post(srv.url + "/v1/images/generations", json={"prompt": p, "seed": i})
                                          for i, p in enumerate(prompts)])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200, 500, 200, 200], [r.text[:200] for r in responses]
    err = responses[1].json()["error"]
    assert err["type"] == "pipeline_error" and POISON in err["message"] and "InjectedFault" in err["message"]
    assert srv.metric("qitrt_isolated_total") >= isolated + 2  # they shared a batch, which was split
    assert srv.metric("qitrt_outcomes_total", kind="request", outcome="error") >= 1


# ---- 2. liveness --------------------------------------------------------------------------------------------
def test_a_stopped_worker_is_killed_and_its_batch_runs_on_the_other(srv):
    body = {"prompt": "survive a stop", "size": "192x192", "num_inference_steps": 30}
    jobs = [srv.post({**body, "seed": i}, path="/v1/jobs").json()["id"] for i in range(3)]
    wait_until("a job is running", lambda: srv.job(jobs[0])["progress"]["step"] >= 1, every=0.02)
    victim = next(w for w in srv.health()["workers"] if w["in_flight"])
    os.kill(victim["pid"], signal.SIGSTOP)  # alive to the kernel, silent to us: only heartbeats can tell
    try:
        gone = wait_until("the stopped worker is out of service",
                          lambda: (w := srv.health()["workers"][victim["index"]])["pid"] != victim["pid"]
                          or not w["ready"] and w, limit=10, every=0.05)
        finals = [wait_until("job finished", lambda j=j: (s := srv.job(j))["status"] in ("succeeded", "failed")
                             and s, limit=90) for j in jobs]
    finally:
        try:
            os.kill(victim["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert [f["status"] for f in finals] == ["succeeded"] * 3, finals
    assert all(f["attempts"] == 2 for f in finals)  # each ran again once, elsewhere
    assert gone
    h = srv.wait_ready()
    w = h["workers"][victim["index"]]
    assert w["pid"] != victim["pid"] and w["restarts"] >= 1 and "no heartbeat" in w["last_error"]
    with pytest.raises(ProcessLookupError):
        os.kill(victim["pid"], 0)


def test_a_wedged_batch_is_killed_and_only_its_wedging_request_fails(srv):
    srv.wait_ready()
    kills = srv.metric("qitrt_watchdog_kills_total")

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            return await asyncio.gather(*[c.post(srv.url + "/v1/images/generations", json={"prompt": p, "seed": 1})
                                          for p in (f"stuck {HANG}", "fine")])

    stuck, fine = asyncio.run(main())
    assert fine.status_code == 200, fine.text
    assert stuck.status_code == 500, stuck.text
    err = stuck.json()["error"]
    assert err["type"] == "worker_crashed" and "no denoising step" in err["message"], err
    assert srv.metric("qitrt_watchdog_kills_total") >= kills + 2  # its first run, and its retry
    srv.wait_ready()


# ---- 3. connections -----------------------------------------------------------------------------------------
def test_idle_and_half_sent_connections_are_closed(srv):
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
    half = connect(srv.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    time.sleep(HEADER_TIMEOUT_S + 1.5)
    for s in idle:
        s.settimeout(2)
        assert s.recv(100) == b""  # closed by the server
        s.close()
    half.settimeout(2)
    reply = read_all(half)
    assert reply.startswith(b"HTTP/1.1 408") and b"header_timeout" in reply
    assert srv.metric("qitrt_dropped_connections_total", reason="header_timeout") >= 21


def test_connections_beyond_the_cap_get_503_and_the_server_recovers(srv):
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(MAX_CONNECTIONS + 5)]
    time.sleep(0.5)
    refused = 0
    for s in socks:
        s.settimeout(0.3)
        try:
            data = s.recv(1000)
        except TimeoutError:
            continue
        refused += data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data
    for s in socks:
        s.close()
    assert refused >= 5
    time.sleep(0.3)
    assert srv.health()["ready"]


def test_a_slow_body_gets_408(srv):
    s = connect(srv.port, b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode()
                    + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"prompt\": ")
    s.settimeout(10)
    reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408") and b'"param":"body"' in reply


def _busy_both_workers(srv) -> list[str]:
    """Two long jobs of different sizes: two batches, both workers busy."""
    jobs = [srv.post({"prompt": f"long {size}", "size": size, "num_inference_steps": 100, "timeout": 120},
                     path="/v1/jobs").json()["id"] for size in ("192x192", "256x256")]
    wait_until("both workers busy", lambda: all(w["in_flight"] for w in srv.health()["workers"]), every=0.05)
    return jobs


def test_a_client_that_disconnects_while_queued_is_dropped(srv):
    srv.wait_ready()
    jobs = _busy_both_workers(srv)
    try:
        cancelled = srv.metric("qitrt_outcomes_total", kind="request", outcome="cancelled")
        body = b'{"prompt": "never mind"}'
        s = connect(srv.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                        + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until("queued", lambda: srv.health()["queue_length"] == 1, every=0.05)
        s.close()
        wait_until("dropped from the queue", lambda: srv.health()["queue_length"] == 0, limit=5, every=0.05)
        assert srv.metric("qitrt_outcomes_total", kind="request", outcome="cancelled") == cancelled + 1
        assert srv.metric("qitrt_requests_total", endpoint="/v1/images/generations", outcome="disconnected") >= 1
    finally:
        for j in jobs:
            httpx.delete(f"{srv.url}/v1/jobs/{j}", headers=AUTH)


def test_a_client_that_disconnects_while_running_alone_frees_its_worker(srv):
    wait_until("workers idle", lambda: not any(w["in_flight"] for w in srv.health()["workers"]), limit=30)
    body = b'{"prompt": "long and abandoned", "size": "256x256", "num_inference_steps": 100, "timeout": 120}'
    s = connect(srv.port, b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                    + KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_until("running", lambda: any(w["in_flight"] for w in srv.health()["workers"]), every=0.05)
    images = srv.metric("qitrt_images_total")
    s.close()
    wait_until("its worker is free again", lambda: not any(w["in_flight"] for w in srv.health()["workers"]),
               limit=10, every=0.05)
    assert srv.metric("qitrt_images_total") == images  # stopped between steps, not run to the end


# ---- 6. browser-proof and honest API ------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_bodies_other_than_json_are_415(srv, ctype):
    headers = {**AUTH, **({"Content-Type": ctype} if ctype else {})}
    r = httpx.post(srv.url + "/v1/jobs", content=b'{"prompt": "csrf"}', headers=headers)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["param"] == "Content-Type" and r.json()["error"]["allowed"] == "application/json"


def test_foreign_host_header_is_refused_and_cors_is_off(srv):
    r = httpx.get(srv.url + "/v1/jobs", headers={**AUTH, "Host": "rebound.example:8000"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Host"
    assert httpx.get(srv.url + "/health", headers={"Host": "localhost:1234"}).status_code == 200
    r = httpx.get(srv.url + "/v1/jobs", headers={**AUTH, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    r = httpx.options(srv.url + "/v1/jobs", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/redoc", "/metrics", "/v1/jobs"])
def test_every_endpoint_but_health_needs_the_key(srv, path):
    r = httpx.get(srv.url + path)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(srv.url + path, headers=AUTH).status_code == 200


def test_one_precedence_rule_for_the_two_key_headers(srv):
    good_bearer_bad_x = {**AUTH, "X-API-Key": "wrong"}
    assert httpx.get(srv.url + "/metrics", headers=good_bearer_bad_x).status_code == 200
    bad_bearer_good_x = {"Authorization": "Bearer wrong", "X-API-Key": KEY}
    assert httpx.get(srv.url + "/metrics", headers=bad_bearer_good_x).status_code == 401
    assert httpx.get(srv.url + "/metrics", headers={"X-API-Key": KEY}).status_code == 200
    assert httpx.get(srv.url + "/metrics", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


MALFORMED = [
    (b"[" * 50000, "body"),
    (b'{"prompt": {"nested": [[[[1]]]]}}', "prompt"),
    (b'{"prompt": "x", "timeout": 1e-9}', "timeout"),
    (b'{"prompt": "x", "size": ["64", "64"]}', "size"),
    (b'{"prompt": "x", "seed": 1e400}', "seed"),
    (b'\xff\xfe{"prompt": "x"}', "body"),
]


@pytest.mark.parametrize("body,field", MALFORMED, ids=[m[1] + str(i) for i, m in enumerate(MALFORMED)])
def test_malformed_input_is_4xx_naming_the_field(srv, body, field):
    r = httpx.post(srv.url + "/v1/images/generations", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("query,field", [("index=x", "query.index"), ("index=-1", "index")])
def test_malformed_query_is_4xx_naming_the_field(srv, query, field):
    job = srv.post({"prompt": "for the query test"}, path="/v1/jobs").json()["id"]
    wait_until("job done", lambda: srv.job(job)["status"] == "succeeded", limit=60)
    r = httpx.get(f"{srv.url}/v1/jobs/{job}/result?{query}", headers=AUTH)
    assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == field, r.text


def test_jobs_list_filters_and_refuses_unknown_states(srv):
    r = httpx.get(srv.url + "/v1/jobs?status=succeeded&limit=5", headers=AUTH)
    assert r.status_code == 200 and all(j["status"] == "succeeded" for j in r.json()["data"])
    assert 1 <= len(r.json()["data"]) <= 5
    r = httpx.get(srv.url + "/v1/jobs?status=done", headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"


def test_openapi_describes_every_body_response_and_error(srv):
    import jsonschema
    from openapi_spec_validator import validate

    doc = httpx.get(srv.url + "/openapi.json", headers=AUTH).json()
    validate(doc)  # a valid OpenAPI 3.1 document, as client generators need
    schemas = doc["components"]["schemas"]

    def conforms(instance, name: str) -> None:  # a real answer matches the schema the document gives for it
        jsonschema.validate(instance, {"$ref": f"#/components/schemas/{name}", "components": doc["components"]})

    conforms(httpx.get(srv.url + "/v1/jobs", headers=AUTH).json(), "JobList")
    conforms(httpx.get(srv.url + "/v1/jobs/nope", headers=AUTH).json(), "ErrorResponse")
    conforms(srv.post({"prompt": "schema"}).json(), "ImagesResponse")
    assert {"ErrorResponse", "ImagesResponse", "JobStatus", "JobList"} <= set(schemas)
    for path in ("/v1/images/generations", "/v1/jobs"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["additionalProperties"] is False and "prompt" in body["required"]
        assert set(body["properties"]) >= {"prompt", "n", "size", "seed", "timeout"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path == "/health":
                continue
            errors = {c: r for c, r in op["responses"].items() if c.startswith(("4", "5"))}
            assert "401" in errors, (method, path)
            for code, r in errors.items():
                ref = r["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path, code)
            ok = op["responses"][next(c for c in op["responses"] if c.startswith("2"))]
            assert ok.get("content"), (method, path)


# ---- 7. metrics ---------------------------------------------------------------------------------------------
def test_metrics_cover_every_outcome_and_worker_busy_time(srv):
    assert srv.metric("qitrt_outcomes_total", kind="request", outcome="ok") >= 3
    assert srv.metric("qitrt_outcomes_total", kind="request", outcome="error") >= 2
    assert srv.metric("qitrt_outcomes_total", kind="request", outcome="cancelled") >= 1
    assert srv.metric("qitrt_outcomes_total", kind="job", outcome="ok") >= 3
    assert srv.metric("qitrt_outcomes_total", kind="job", outcome="cancelled") >= 1
    assert srv.metric("qitrt_worker_busy_seconds_total", worker="0") > 0
    assert srv.metric("qitrt_worker_busy_seconds_total", worker="1") > 0
    assert srv.metric("qitrt_queue_seconds_count") > 0 and srv.metric("qitrt_batch_images_count") > 0
    assert srv.metric("qitrt_dropped_connections_total", reason="over_cap") >= 5


# ---- 4, 5. drain and durable jobs (servers of their own) ----------------------------------------------------
def _statuses(jobs_dir) -> dict:
    with sqlite3.connect(Path(jobs_dir) / "jobs.sqlite3") as db:
        return dict(db.execute("SELECT id, status FROM jobs").fetchall())


def test_ctrl_c_drains_running_work_and_keeps_unstarted_jobs(tiny_checkpoint, tmp_path):
    jobs_dir = tmp_path / "jobs"
    s = Server(tiny_checkpoint, jobs_dir, "--max-batch-size", "1", "--shutdown-grace-s", "60", devices="cpu")
    try:
        slow = {"prompt": "drain me", "size": "128x128", "num_inference_steps": 40}
        jobs = [s.post({**slow, "seed": i}, path="/v1/jobs").json()["id"] for i in range(4)]
        wait_until("first job running", lambda: s.job(jobs[0])["progress"]["step"] >= 1, every=0.02)
        result = {}
        waiting = threading.Thread(target=lambda: result.update(r=s.post({"prompt": "waiting sync", "seed": 9})))
        waiting.start()
        wait_until("sync request queued", lambda: s.health()["queue_length"] == 4, every=0.02)
        os.killpg(s.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole group, workers included
        late = wait_until("new work refused", lambda: (r := s.post({"prompt": "too late"})).status_code == 503 and r,
                          limit=10, every=0.05)
        assert int(late.headers["retry-after"]) >= 1 and "shutting down" in late.json()["error"]["message"]
        assert httpx.get(s.url + "/health").json()["status"] == "draining"
        waiting.join(90)
        assert result["r"].status_code == 200, result["r"].text  # a waiting sync request is served
        assert s.proc.wait(60) in (0, 130, -signal.SIGINT)  # 130: the CLI's own exit status for an interrupt
        stored = _statuses(jobs_dir)
        assert stored[jobs[0]] == "succeeded"  # it was running: finished within the grace
        assert [stored[j] for j in jobs[1:]] == ["queued"] * 3  # not started: kept for the next start
    finally:
        s.kill()
    s2 = Server(tiny_checkpoint, jobs_dir, "--max-batch-size", "4", devices="cpu")
    try:
        finals = [wait_until("restored job done", lambda j=j: (x := s2.job(j))["status"] in ("succeeded", "failed")
                             and x, limit=120) for j in jobs]
        assert [f["status"] for f in finals] == ["succeeded"] * 4
        assert s2.metric("qitrt_jobs_restored_total") == 3
    finally:
        s2.kill()


def test_jobs_survive_a_sigkill_of_the_whole_server(tiny_checkpoint, tmp_path):
    jobs_dir, port = tmp_path / "jobs", free_port()
    s = Server(tiny_checkpoint, jobs_dir, "--max-batch-size", "1", port=port, devices="cpu")
    try:
        body = {"prompt": "durable", "size": "128x128", "num_inference_steps": 30}
        jobs = [s.post({**body, "seed": 20 + i}, path="/v1/jobs").json()["id"] for i in range(3)]
        wait_until("first done, second running", lambda: s.job(jobs[0])["status"] == "succeeded"
                   and s.job(jobs[1])["status"] == "running", limit=60, every=0.02)
        first = httpx.get(f"{s.url}/v1/jobs/{jobs[0]}/result", headers=AUTH).content
    finally:
        s.kill()  # SIGKILL to the server and its workers: no shutdown code runs
    s2 = Server(tiny_checkpoint, jobs_dir, port=port, devices="cpu")
    try:
        finals = [wait_until("job done after restart", lambda j=j: (x := s2.job(j))["status"] in ("succeeded",
                                                                                              "failed") and x,
                             limit=120) for j in jobs]
        assert [f["status"] for f in finals] == ["succeeded"] * 3
        again = httpx.get(f"{s2.url}/v1/jobs/{jobs[0]}/result", headers=AUTH)
        assert again.status_code == 200 and again.content == first  # served from disk after the restart
        listed = {j["id"] for j in httpx.get(s2.url + "/v1/jobs", headers=AUTH).json()["data"]}
        assert set(jobs) <= listed
    finally:
        s2.kill()


def test_a_second_server_on_the_same_job_store_is_refused(tiny_checkpoint, tmp_path):
    from qwen_image_trt.core.errors import QitrtError
    from qwen_image_trt.serve.jobstore import JobStore

    first = JobStore(tmp_path, 1 << 20, 60)
    try:
        with pytest.raises(QitrtError, match="in use by another qitrt server"):
            JobStore(tmp_path, 1 << 20, 60)
    finally:
        first.close()
    JobStore(tmp_path, 1 << 20, 60).close()  # free again once the first is closed
