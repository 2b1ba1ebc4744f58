"""Load generator for `qitrt serve` (OpenAI-compatible POST /v1/images/generations), httpx async.

Phases:
- closed loop: `concurrency` clients, each sending its next request as soon as the last one returns;
- open loop: Poisson arrivals at `rate` requests/s (exponential gaps, seeded), sent whether or not earlier
  requests have returned, so queueing shows up in the latency instead of slowing the arrivals.
Per phase: requests/s and images/s over the phase's wall time, latency p50/p90/p99, queue and compute time
(the server's X-Queue-Time-Ms / X-Compute-Time-Ms headers), achieved batch sizes (per request from the
X-Batch-Images header, per pipeline call from the /metrics histogram's change over the phase), errors by kind.

`ServerProcess` starts `qitrt serve` itself for a one-command run. Every phase is handed to `on_update` as it
finishes; a server that stops answering ends the run early with what was measured so far.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen_image_trt.bench.devices import machine_info
from qwen_image_trt.core.errors import InputError, QitrtError

log = logging.getLogger(__name__)

GENERATIONS = "/v1/images/generations"
DEFAULT_PROMPT = "a red cat sitting on a window, neon sign reads WELCOME, cinematic, detailed"
ABORT_AFTER_CONNECT_ERRORS = 20  # consecutive connection failures: the server is gone, stop the run


class ServerUnreachable(QitrtError):
    """The server did not answer (or never became ready)."""


@dataclass
class LoadConfig:
    url: str
    concurrency: list[int] = field(default_factory=list)  # closed-loop phases
    rates: list[float] = field(default_factory=list)  # open-loop phases, requests/s
    duration_s: float = 30.0
    requests: int | None = None  # closed loop: stop after this many requests per phase instead of duration
    size: str = "1024x1024"
    steps: int | None = None
    n: int = 1
    cfg: bool = True
    true_cfg_scale: float = 4.0
    prompt: str = DEFAULT_PROMPT
    request_timeout_s: float = 600.0
    warmup_requests: int = 1
    api_key: str | None = None
    seed: int = 0
    progress: bool = True
    repeat: int = 1  # runs of each phase; the table shows the median run and the spread of all

    def check(self) -> None:
        if not re.match(r"^https?://", self.url or ""):
            raise InputError("url", self.url, "http://HOST:PORT of a running `qitrt serve` (or use --start)")
        if not self.concurrency and not self.rates:
            raise InputError("concurrency/rate", None, "at least one --concurrency level or --rate")
        if any(c < 1 for c in self.concurrency):
            raise InputError("concurrency", self.concurrency, "positive integers")
        if any(r <= 0 for r in self.rates):
            raise InputError("rate", self.rates, "positive requests per second")
        if self.repeat < 1:
            raise InputError("repeat", self.repeat, "an integer >= 1")
        if self.duration_s <= 0 and not self.requests:
            raise InputError("duration", self.duration_s, "positive seconds")
        if not re.match(r"^\d+x\d+$", self.size):
            raise InputError("size", self.size, "WIDTHxHEIGHT, e.g. 1024x1024")


def percentiles(values, qs=(50, 90, 99)) -> dict:
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return {f"p{q}": None for q in qs} | {"mean": None, "max": None}
    arr = np.asarray(values, dtype=float)
    out = {f"p{q}": float(np.percentile(arr, q)) for q in qs}
    return out | {"mean": float(arr.mean()), "max": float(arr.max())}


# -- /metrics -----------------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (e.g. every worker's, or one outcome's)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for (n, lab), v in parse_prometheus(text).items() if n == name and all(w in lab for w in want))


def histogram_delta(before: dict, after: dict, name: str) -> dict | None:
    """Change of a Prometheus histogram between two scrapes: count, mean, and per-bucket counts."""
    if (f"{name}_count", "") not in after:
        return None
    get = lambda d, k: d.get(k, 0.0)
    count = get(after, (f"{name}_count", "")) - get(before, (f"{name}_count", ""))
    total = get(after, (f"{name}_sum", "")) - get(before, (f"{name}_sum", ""))
    buckets, prev = {}, 0.0
    for (metric, labels), value in sorted(after.items(), key=lambda kv: _le(kv[0][1])):
        if metric != f"{name}_bucket":
            continue
        cum = value - get(before, (metric, labels))
        le = labels.split('le="')[1].split('"')[0] if 'le="' in labels else "?"
        buckets[le], prev = cum - prev, cum
    return {"metric": name, "count": count, "sum": total, "mean": total / count if count else None,
            "buckets": {k: v for k, v in buckets.items() if v}}


def _le(labels: str) -> float:
    m = re.search(r'le="([^"]+)"', labels)
    return float(m.group(1)) if m else float("inf")


def _find_histogram(after: dict, *needles) -> str | None:
    names = sorted({m[: -len("_count")] for m, _ in after if m.endswith("_count")})
    for n in names:
        if all(x in n for x in needles):
            return n
    return None


# -- the load loops -----------------------------------------------------------------------------------------------
class _Phase:
    def __init__(self, name: str, cfg: LoadConfig, bar):
        self.name, self.cfg, self.bar = name, cfg, bar
        self.records: list[dict] = []
        self.connect_failures = 0
        self.aborted: str | None = None
        self.t0 = time.perf_counter()

    def body(self, i: int) -> dict:
        c = self.cfg
        body = {"prompt": c.prompt, "n": c.n, "size": c.size, "response_format": "b64_json", "seed": c.seed + i}
        if c.steps is not None:
            body["num_inference_steps"] = c.steps
        if c.cfg:
            body.update(negative_prompt=" ", true_cfg_scale=c.true_cfg_scale)
        else:
            body["true_cfg_scale"] = 1.0
        return body

    async def send(self, client, i: int) -> dict:
        import httpx

        rec = {"i": i, "start_s": time.perf_counter() - self.t0}
        t0 = time.perf_counter()
        try:
            r = await client.post(GENERATIONS, json=self.body(i), timeout=self.cfg.request_timeout_s)
            rec["latency_s"] = time.perf_counter() - t0
            rec["status"] = r.status_code
            if r.status_code == 200:
                data = r.json().get("data") or []
                rec["images"] = len(data)
                if len(data) != self.cfg.n:
                    rec["error"] = "bad_response:image_count"
                for key, header in (("queue_s", "x-queue-time-ms"), ("compute_s", "x-compute-time-ms"),
                                    ("server_s", "x-server-time-ms")):
                    if header in r.headers:
                        rec[key] = float(r.headers[header]) / 1e3
                if "x-batch-images" in r.headers:
                    rec["batch_images"] = int(r.headers["x-batch-images"])
            else:
                kind = f"http_{r.status_code}"
                try:
                    err = r.json().get("error") or {}
                    kind += f":{err.get('code') or err.get('type')}" if (err.get("code") or err.get("type")) else ""
                except ValueError:
                    pass
                rec["error"] = kind
            self.connect_failures = 0
        except httpx.TimeoutException:
            rec["latency_s"], rec["error"] = time.perf_counter() - t0, "timeout"
        except httpx.ConnectError:
            rec["latency_s"], rec["error"] = time.perf_counter() - t0, "connect"
            self.connect_failures += 1
            if self.connect_failures >= ABORT_AFTER_CONNECT_ERRORS:
                self.aborted = f"server unreachable: {self.connect_failures} connection failures in a row"
        except httpx.TransportError as e:
            rec["latency_s"], rec["error"] = time.perf_counter() - t0, f"transport:{type(e).__name__}"
        except ValueError:
            rec["latency_s"], rec["error"] = time.perf_counter() - t0, "bad_response:not_json"
        rec["end_s"] = time.perf_counter() - self.t0
        self.records.append(rec)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(ok=sum(1 for x in self.records if "error" not in x),
                                 err=sum(1 for x in self.records if "error" in x))
        return rec


async def _closed_loop(client, phase: _Phase, concurrency: int, counter) -> None:
    cfg = phase.cfg
    deadline = phase.t0 + cfg.duration_s

    async def worker():
        while phase.aborted is None:
            if cfg.requests is not None:
                if counter[0] >= cfg.requests:
                    return
            elif time.perf_counter() >= deadline:
                return
            i = counter[0]
            counter[0] += 1
            await phase.send(client, i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(client, phase: _Phase, rate: float, counter) -> None:
    rng = random.Random(phase.cfg.seed)
    tasks, t = [], 0.0
    while phase.aborted is None:
        t += rng.expovariate(rate)
        if t >= phase.cfg.duration_s:
            break
        delay = phase.t0 + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(phase.send(client, counter[0])))
        counter[0] += 1
    await asyncio.gather(*tasks)


def compute_ceiling(ok: list[dict], workers: int | None) -> float | None:
    """The server's own limit in images/s: every worker busy all the time at the batch sizes it achieved,
    i.e. workers x median(images per batch / batch compute time). Above it only a faster engine helps;
    below it the gap is queueing, batching delay and HTTP (or too little load)."""
    rates = [r["batch_images"] / r["compute_s"] for r in ok if r.get("compute_s") and r.get("batch_images")]
    if not rates or not workers:
        return None
    return workers * float(statistics.median(rates))


def summarize(phase: _Phase, mode: str, level: float, metrics_before: dict, metrics_after: dict,
              workers: int | None = None) -> dict:
    recs = phase.records
    ok = [r for r in recs if "error" not in r]
    wall = max((r["end_s"] for r in recs), default=0.0)
    errors: dict[str, int] = {}
    for r in recs:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    by_request: dict[str, int] = {}
    for r in ok:
        if "batch_images" in r:
            by_request[str(r["batch_images"])] = by_request.get(str(r["batch_images"]), 0) + 1
    images = sum(r.get("images", 0) for r in ok)
    out = dict(phase=phase.name, mode=mode, level=level, wall_s=wall, sent=len(recs), ok=len(ok),
               failed=len(recs) - len(ok), errors=errors, images=images,
               requests_per_s=len(ok) / wall if wall else None, images_per_s=images / wall if wall else None,
               latency_s=percentiles(r["latency_s"] for r in ok),
               queue_s=percentiles(r.get("queue_s") for r in ok),
               compute_s=percentiles(r.get("compute_s") for r in ok),
               batch_images_by_request=by_request)
    out["ceiling_images_per_s"] = compute_ceiling(ok, workers)
    out["fraction_of_ceiling"] = (out["images_per_s"] / out["ceiling_images_per_s"]
                                  if out["ceiling_images_per_s"] and out["images_per_s"] else None)
    if mode == "open":
        out["offered_rate"] = level
    name = _find_histogram(metrics_after, "batch_images") or _find_histogram(metrics_after, "batch")
    out["batch_images_by_call"] = histogram_delta(metrics_before, metrics_after, name) if name else None
    qname = _find_histogram(metrics_after, "queue")
    out["queue_metric"] = histogram_delta(metrics_before, metrics_after, qname) if qname else None
    if phase.aborted:
        out["aborted"] = phase.aborted
    return out


async def _scrape(client) -> dict:
    try:
        r = await client.get("/metrics", timeout=10)
        return parse_prometheus(r.text) if r.status_code == 200 else {}
    except Exception:  # noqa: BLE001 (metrics are a bonus; a phase is still measured without them)
        return {}


async def check_server(client, url: str, wait_s: float = 0.0) -> dict:
    """GET /health; raise ServerUnreachable with what went wrong. Waits up to `wait_s` for readiness."""
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = await client.get("/health", timeout=10)
            if r.status_code == 200:
                return r.json()
            problem = f"GET {url}/health answered {r.status_code}: {r.text[:200]}"
        except httpx.TransportError as e:
            problem = f"cannot reach {url}: {type(e).__name__}: {e or 'no answer'}"
        if time.monotonic() >= deadline:
            raise ServerUnreachable(f"{problem}. Start the server (`qitrt serve CHECKPOINT --port P`) or let the "
                                    "benchmark start one: `qitrt bench serve --start CHECKPOINT ...`")
        await asyncio.sleep(0.5)


async def _run(cfg: LoadConfig, transport, on_update, result: dict) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), transport=transport, headers=headers,
                                 limits=limits) as client:
        result["server_health"] = await check_server(client, cfg.url)
        if cfg.warmup_requests:
            warm = _Phase("warmup", cfg, None)
            await asyncio.gather(*(warm.send(client, -1 - i) for i in range(cfg.warmup_requests)))
            result["warmup"] = {"sent": len(warm.records), "errors": [r["error"] for r in warm.records
                                                                       if "error" in r]}
        plan = [("closed", c) for c in cfg.concurrency] + [("open", r) for r in cfg.rates]
        for mode, level in plan:
            name = f"concurrency={level}" if mode == "closed" else f"rate={level:g}/s"
            runs = []
            for k in range(cfg.repeat):
                summary, aborted = await _one_phase(client, cfg, mode, level, name, result, k)
                runs.append(summary)
                if aborted:
                    result["phases"].append(median_run(runs))
                    result["errors"].append({"phase": name, "error": aborted})
                    return
            result["phases"].append(median_run(runs))
            on_update(result)


async def _one_phase(client, cfg: LoadConfig, mode: str, level, name: str, result: dict, k: int):
    from tqdm.auto import tqdm

    total = cfg.requests if (mode == "closed" and cfg.requests) else None
    desc = f"bench serve {name}" + (f" run {k + 1}/{cfg.repeat}" if cfg.repeat > 1 else "")
    bar = tqdm(total=total, desc=desc, unit="req", disable=not cfg.progress)
    before = await _scrape(client)
    phase, counter = _Phase(name, cfg, bar), [0]
    try:
        if mode == "closed":
            await _closed_loop(client, phase, int(level), counter)
        else:
            await _open_loop(client, phase, float(level), counter)
    finally:
        bar.close()
    after = await _scrape(client)
    workers = len((result.get("server_health") or {}).get("workers") or []) or None
    summary = summarize(phase, mode, level, before, after, workers=workers)
    bar.write(_progress_line(summary))
    return summary, phase.aborted


def median_run(runs: list[dict]) -> dict:
    """The run with the median images/s, carrying every run's images/s and p99 so the spread is visible."""
    ranked = sorted(runs, key=lambda r: r["images_per_s"] or 0.0)
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = [{"images_per_s": r["images_per_s"], "requests_per_s": r["requests_per_s"],
                       "p99_s": r["latency_s"]["p99"]} for r in runs]
    return chosen


def _progress_line(s: dict) -> str:
    lat = s["latency_s"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    return (f"{s['phase']:18s} ok {s['ok']:4d} err {s['failed']:3d}  {fmt(s['requests_per_s'])} req/s "
            f"{fmt(s['images_per_s'])} img/s  p50 {fmt(lat['p50'])} s p99 {fmt(lat['p99'])} s")


def run_serve_load(cfg: LoadConfig, on_update=None, transport=None, server: dict | None = None) -> dict:
    """Run every phase of `cfg` against `cfg.url`; returns the result (also handed to `on_update` per phase)."""
    cfg.check()
    update = on_update or (lambda r: None)
    result = dict(kind="serve", started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  machine=machine_info("cpu"), config=asdict(cfg), server=server, phases=[], errors=[],
                  complete=False,
                  notes=["machine is the load generator's; the server's devices are in server_health"])
    try:
        asyncio.run(_run(cfg, transport, update, result))
        result["complete"] = not result["errors"]
    except ServerUnreachable as e:
        result["errors"].append({"phase": "health" if not result["phases"] else "run", "error": str(e)})
        raise
    finally:
        result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        update(result)
    return result


# -- starting the server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`qitrt serve CHECKPOINT ... --host 127.0.0.1 --port P` as a child process, ready when /health says so."""

    def __init__(self, checkpoint: str, serve_args: list[str] | None = None, port: int | None = None,
                 log_path: str | os.PathLike | None = None, start_timeout_s: float = 600.0):
        self.checkpoint = checkpoint
        self.serve_args = list(serve_args or [])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="qitrt-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def command(self) -> list[str]:
        # its own job store unless told otherwise: a benchmark's jobs are not worth keeping across runs
        jobs = [] if "--jobs-dir" in self.serve_args else ["--jobs-dir", str(self.log_path.with_suffix(".jobs"))]
        return [sys.executable, "-m", "qwen_image_trt.cli", "serve", str(self.checkpoint), "--host", "127.0.0.1",
                "--port", str(self.port), *jobs, *self.serve_args]

    def start(self) -> ServerProcess:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab" if self.proc else "wb")  # a restart appends
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnreachable(f"`{' '.join(self.command)}` exited with {self.proc.returncode} before it "
                                        f"was ready; its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerUnreachable(f"server did not become ready within {self.start_timeout_s:.0f}s; log ends:\n"
                                f"{self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    def kill_group(self) -> None:
        """SIGKILL the server and its workers at once (its own session): nothing of its shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def describe(self) -> dict:
        return {"started_by_bench": True, "command": self.command, "url": self.url, "log": str(self.log_path)}

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
