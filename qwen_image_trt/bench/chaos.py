"""Chaos run: `qitrt serve` at saturation while faults are injected on a schedule; counts what was lost.

A calm phase measures latency without faults; then the fault phase runs the same load while the schedule kills
a worker (SIGKILL), stops one (SIGSTOP: only the heartbeat watchdog can tell), sends requests that fail in the
pipeline and one that wedges its worker, drops client connections mid-request, and SIGKILLs the whole server
(workers included) with async jobs pending, then starts it again on the same job store.

Good clients behave as production clients do: on a refused connection, 429 or 503 they wait and retry (the
request carries its seed, so a retry is the same request) until their deadline. A good request is lost when it
never got its images; an accepted job is lost when it never succeeded. Both must be 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from qwen_image_trt.bench.serve_load import ServerProcess

POISON, HANG = "CHAOS-POISON", "CHAOS-HANG"
FAULTS = ("worker_sigkill", "worker_sigstop", "bad_inputs", "client_disconnects", "wedge", "server_sigkill")


@dataclass
class ChaosConfig:
    checkpoint: str
    fault_s: float = 600.0  # the fault phase
    calm_s: float = 120.0  # the phase before it, same load, no faults
    clients: int = 8  # closed-loop clients sending good requests: with 2 workers x batch 4, saturation
    job_every_s: float = 1.0
    fault_every_s: float = 40.0
    size: str = "64x64"
    steps: int = 4
    deadline_s: float = 240.0  # a good request's retry budget
    seed: int = 0
    serve_args: list[str] = field(default_factory=list)
    out: str = "runs/bench"
    on_progress: object = print


@dataclass
class Tally:
    http: dict = field(default_factory=dict)  # status (or 'transport') -> count, every attempt
    good: list = field(default_factory=list)  # (phase, latency_s or None when lost, attempts)
    bad: dict = field(default_factory=dict)  # kind -> {status: count}
    jobs: dict = field(default_factory=dict)  # id -> phase
    job_refusals: int = 0
    faults: list = field(default_factory=list)  # (t, kind, detail)
    disconnects: int = 0

    def hit(self, key) -> None:
        self.http[key] = self.http.get(key, 0) + 1


class Chaos:
    def __init__(self, cfg: ChaosConfig):
        self.cfg, self.tally, self.rng = cfg, Tally(), random.Random(cfg.seed)
        self.jobs_dir = Path(cfg.out) / "chaos_jobs"
        args = ["--devices", "cpu,cpu", "--jobs-dir", str(self.jobs_dir), "--max-batch-size", "4",
                "--max-queue-delay-ms", "20", "--max-queue-size", "256", "--max-retries", "3",
                "--default-size", cfg.size, "--default-steps", str(cfg.steps), "--heartbeat-interval-s", "0.5",
                "--heartbeat-timeout-s", "3", "--stall-min-s", "5", "--stall-first-s", "30",
                "--job-ttl-s", "86400", *cfg.serve_args]  # results kept past the run: each job is checked at the end
        os.environ["QITRT_INJECT_FAULT_PROMPT"], os.environ["QITRT_INJECT_HANG_PROMPT"] = POISON, HANG
        self.server = ServerProcess(cfg.checkpoint, args, log_path=Path(cfg.out) / "chaos_server.log")
        self.phase, self.t0, self.stop = "calm", 0.0, False
        self.background: list[asyncio.Task] = []
        self.bad_inputs: list[asyncio.Task] = []  # the bad-input requests, awaited before the server is killed

    # ---- clients -------------------------------------------------------------------------------------------
    async def _send(self, c: httpx.AsyncClient, body: dict, path="/v1/images/generations"):
        try:
            r = await c.post(self.server.url + path, json=body)
        except httpx.TransportError:
            self.tally.hit("transport")
            return None
        self.tally.hit(r.status_code)
        return r

    async def good_client(self, c: httpx.AsyncClient, k: int) -> None:
        i = 0
        while not self.stop:
            body = {"prompt": f"good request {k}-{i}", "seed": k * 100000 + i, "timeout": 120}
            phase, t0, attempts, latency = self.phase, time.monotonic(), 0, None
            while time.monotonic() - t0 < self.cfg.deadline_s:
                attempts += 1
                r = await self._send(c, body)
                if r is not None and r.status_code == 200:
                    latency = time.monotonic() - t0
                    break
                await asyncio.sleep(0.5 + self.rng.random())
            self.tally.good.append((phase, latency, attempts))
            i += 1

    async def job_client(self, c: httpx.AsyncClient) -> None:
        i = 0
        while not self.stop:
            r = await self._send(c, {"prompt": f"job {i}", "seed": 7_000_000 + i, "timeout": 600}, "/v1/jobs")
            if r is not None and r.status_code == 202:
                self.tally.jobs[r.json()["id"]] = self.phase
            else:
                self.tally.job_refusals += 1
            i += 1
            await asyncio.sleep(self.cfg.job_every_s)

    # ---- faults --------------------------------------------------------------------------------------------
    async def _worker(self, c: httpx.AsyncClient) -> dict | None:
        try:
            workers = (await c.get(self.server.url + "/health")).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return None
        busy = [w for w in workers if w["ready"] and w["in_flight"]] or [w for w in workers if w["ready"]]
        return self.rng.choice(busy) if busy else None

    async def fault(self, kind: str, c: httpx.AsyncClient) -> str:
        if kind in ("worker_sigkill", "worker_sigstop"):
            w = await self._worker(c)
            if w is None:
                return "no ready worker"
            os.kill(w["pid"], signal.SIGKILL if kind == "worker_sigkill" else signal.SIGSTOP)
            return f"worker {w['index']} pid {w['pid']}"
        if kind == "bad_inputs":  # in the background: the schedule goes on while they are answered
            self.bad_inputs = [asyncio.create_task(self._bad(c, "poison", {"prompt": f"{POISON} {i}"}))
                               for i in range(3)]
            self.bad_inputs += [asyncio.create_task(self._bad_raw(c, "surrogate", b'{"prompt": "\\ud800"}'))
                                for _ in range(3)]
            self.bad_inputs.append(asyncio.create_task(self._bad_raw(c, "nested", b"[" * 20000)))
            self.background += self.bad_inputs
            return "3 poison, 3 surrogate, 1 nested"
        if kind == "wedge":
            self.background.append(asyncio.create_task(self._bad(c, "wedge", {"prompt": f"{HANG}", "timeout": 300})))
            return "1 request that wedges every worker it runs on"
        if kind == "client_disconnects":
            self.background += [asyncio.create_task(self._disconnect()) for _ in range(5)]
            return "5 clients gone mid-request"
        if kind == "server_sigkill":  # a burst of slower jobs first, so some are surely queued or running
            # Bad inputs still in flight would lose their connection here, not get the answer they are counted for
            # (a poison batch is retried alone before its 500: seconds on a loaded machine). Let them finish first.
            pending = [t for t in self.bad_inputs if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=120)
            burst = [await self._send(c, {"prompt": f"pending {i}", "size": "128x128", "num_inference_steps": 20,
                                          "seed": 9_000_000 + i, "timeout": 600}, "/v1/jobs") for i in range(10)]
            for r in burst:
                if r is not None and r.status_code == 202:
                    self.tally.jobs[r.json()["id"]] = self.phase
            states = [(await c.get(f"{self.server.url}/v1/jobs/{job_id}")).json()["status"] for job_id in
                      list(self.tally.jobs)[-10:]]
            pending = sum(st in ("queued", "running") for st in states)
            self.server.kill_group()
            t = time.monotonic()
            await asyncio.to_thread(self.server.start)
            return (f"server and workers SIGKILLed with {pending} of a burst of 10 jobs unfinished; back in "
                    f"{time.monotonic() - t:.1f} s")
        raise ValueError(kind)

    async def _bad(self, c, kind: str, body: dict) -> None:
        r = await self._send(c, body)
        status = "transport" if r is None else r.status_code
        self.tally.bad.setdefault(kind, {}).setdefault(status, 0)
        self.tally.bad[kind][status] += 1

    async def _bad_raw(self, c, kind: str, data: bytes) -> None:
        try:
            r = await c.post(self.server.url + "/v1/images/generations", content=data,
                             headers={"Content-Type": "application/json"})
            status = r.status_code
        except httpx.TransportError:
            status = "transport"
        self.tally.bad.setdefault(kind, {}).setdefault(status, 0)
        self.tally.bad[kind][status] += 1

    async def _disconnect(self) -> None:
        body = b'{"prompt": "abandoned", "num_inference_steps": 20}'
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.server.port)
            writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            await asyncio.sleep(self.rng.uniform(0.05, 1.0))
            writer.close()
            self.tally.disconnects += 1
        except OSError:
            pass

    async def fault_loop(self, c: httpx.AsyncClient) -> None:
        schedule, n = [], max(1, int(self.cfg.fault_s // self.cfg.fault_every_s) - 1)
        for i in range(n):  # every kind in turn; the server SIGKILL once, in the middle
            schedule.append(FAULTS[i % (len(FAULTS) - 1)])
        schedule.insert(n // 2, "server_sigkill")
        start = time.monotonic()
        for i, kind in enumerate(schedule):
            await asyncio.sleep(max(0.0, start + (i + 1) * self.cfg.fault_s / (len(schedule) + 1) - time.monotonic()))
            if self.stop:
                return
            detail = await self.fault(kind, c)
            t = time.monotonic() - self.t0
            self.tally.faults.append((round(t, 1), kind, detail))
            self.cfg.on_progress(f"[{t:6.1f} s] fault {kind}: {detail}")

    # ---- the run -------------------------------------------------------------------------------------------
    async def run(self) -> dict:
        await asyncio.to_thread(self.server.start)
        self.t0 = time.monotonic()
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=5), limits=limits) as c:
            load = [asyncio.create_task(self.good_client(c, k)) for k in range(self.cfg.clients)]
            load.append(asyncio.create_task(self.job_client(c)))
            self.cfg.on_progress(f"calm phase: {self.cfg.calm_s:.0f} s")
            await asyncio.sleep(self.cfg.calm_s)
            self.phase = "faults"
            self.cfg.on_progress(f"fault phase: {self.cfg.fault_s:.0f} s")
            await self.fault_loop(c)
            await asyncio.sleep(max(0.0, self.t0 + self.cfg.calm_s + self.cfg.fault_s - time.monotonic()))
            self.stop = True
            self.cfg.on_progress("load stopped; waiting for every accepted job and good request")
            await asyncio.gather(*load, *self.background)
            jobs = await self.settle_jobs(c)
            metrics = (await c.get(self.server.url + "/metrics")).text
        self.server.stop()
        return self.result(jobs, metrics)

    async def settle_jobs(self, c: httpx.AsyncClient, limit_s: float = 600.0) -> dict:
        final, deadline = {}, time.monotonic() + limit_s
        for job_id in self.tally.jobs:
            while time.monotonic() < deadline:
                try:
                    s = (await c.get(f"{self.server.url}/v1/jobs/{job_id}")).json()
                except (httpx.HTTPError, ValueError):
                    await asyncio.sleep(1)
                    continue
                if s.get("status") in ("succeeded", "failed", "cancelled"):
                    final[job_id] = s["status"]
                    break
                if "status" not in s:  # 404: unknown to the server, i.e. lost (its TTL outlasts the run)
                    final[job_id] = "missing"
                    break
                await asyncio.sleep(0.2)
            else:
                final[job_id] = "unfinished"
        return final

    def result(self, jobs: dict, metrics: str) -> dict:
        t = self.tally

        def pct(phase: str) -> dict:
            done = sorted(lat for p, lat, _ in t.good if p == phase and lat is not None)
            q = statistics.quantiles(done, n=100) if len(done) >= 2 else [float("nan")] * 99
            return {"requests": sum(p == phase for p, _, _ in t.good), "answered": len(done),
                    "lost": sum(p == phase and lat is None for p, lat, _ in t.good),
                    "retried": sum(p == phase and a > 1 for p, _, a in t.good),
                    "p50_s": round(q[49], 3), "p99_s": round(q[98], 3)}

        outcome_lines = [ln for ln in metrics.splitlines() if ln.startswith(("qitrt_outcomes_total",
                                                                             "qitrt_watchdog_kills_total",
                                                                             "qitrt_isolated_total",
                                                                             "qitrt_jobs_restored_total"))]
        return {"config": {k: v for k, v in vars(self.cfg).items() if k != "on_progress"},
                "phases": {"calm": pct("calm"), "faults": pct("faults")},
                "http_attempts": {str(k): v for k, v in sorted(t.http.items(), key=lambda kv: str(kv[0]))},
                "bad_inputs": {k: {str(s): n for s, n in v.items()} for k, v in t.bad.items()},
                "jobs": {"accepted": len(jobs), "refused_submissions": t.job_refusals,
                         "final": {s: sum(v == s for v in jobs.values()) for s in sorted(set(jobs.values()))},
                         "lost": sum(v != "succeeded" for v in jobs.values())},
                "disconnects": t.disconnects, "faults": t.faults,
                "server_metrics_after_restart": outcome_lines,
                "lost_good_requests": sum(lat is None for _, lat, _ in t.good)}


def run_chaos(cfg: ChaosConfig) -> dict:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return asyncio.run(Chaos(cfg).run())


def render_markdown(r: dict, command: str, machine: str) -> str:
    c, jobs = r["config"], r["jobs"]

    def row(name: str, seconds: float, ph: dict) -> str:
        return (f"| {name} | {seconds:g} | {ph['requests']} | {ph['answered']} | {ph['lost']} | {ph['retried']} | "
                f"{ph['p50_s']} | {ph['p99_s']} |")

    lines = [
        "# Chaos run: `qitrt serve` at saturation with faults injected", "",
        (f"`{command}`, {machine}. Two CPU workers, tiny model, {c['size']} x {c['steps']} steps, {c['clients']} "
         f"closed-loop clients + one async job every {c['job_every_s']:g} s."), "",
        "| phase | seconds | good requests | answered | lost | retried by the client | p50 s | p99 s |",
        "|---|---|---|---|---|---|---|---|",
        row("no faults", c["calm_s"], r["phases"]["calm"]), row("faults", c["fault_s"], r["phases"]["faults"]), "",
        (f"Async jobs: {jobs['accepted']} accepted, final states {jobs['final']}, **lost {jobs['lost']}**; "
         f"{jobs['refused_submissions']} submissions refused (server down or draining; the client moved on)."), "",
        f"**Good requests lost: {r['lost_good_requests']}.**", "",
        "HTTP attempts by answer (every try, retries included): "
        + ", ".join(f"{k}: {v}" for k, v in r["http_attempts"].items()), "",
        "Bad inputs by answer: " + "; ".join(f"{k}: {v}" for k, v in r["bad_inputs"].items()), "",
        f"Client disconnects sent: {r['disconnects']}.", "",
        "| t (s) | fault | detail |", "|---|---|---|",
        *[f"| {t} | {k} | {d} |" for t, k, d in r["faults"]], "",
        "Server counters since its last start (the server SIGKILL resets them):", "", "```",
        *r["server_metrics_after_restart"], "```", ""]
    return "\n".join(lines)
