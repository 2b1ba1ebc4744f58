"""A real `qitrt serve` for the tests: a subprocess in its own session, on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from qwen_image_trt.bench.serve_load import metric_sum

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[1]
POISON, HANG = "POISON-PILL", "WEDGE-THE-GPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qitrt serve` in its own session (so a signal to its group reaches its workers, never pytest)."""

    def __init__(self, checkpoint, jobs_dir, *args: str, port: int | None = None, devices: str = "cpu,cpu",
                 key: str | None = KEY):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "QITRT_API_KEY": key or "", "QITRT_INJECT_FAULT_PROMPT": POISON, "QITRT_INJECT_HANG_PROMPT": HANG}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_image_trt.cli", "serve", str(checkpoint), "--devices", devices,
             "--port", str(self.port), "--default-size", "64x64", "--default-steps", "2", "--jobs-dir", str(jobs_dir),
             *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        self.wait_ready()

    def wait_ready(self, limit: float = 150) -> dict:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                h = httpx.get(self.url + "/health", timeout=2).json()
                if all(w["ready"] for w in h["workers"]):
                    return h
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail("server did not become ready: " + self.proc.stdout.read())

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def post(self, body, path="/v1/images/generations", **kw):
        return httpx.post(self.url + path, json=body, headers=AUTH, timeout=90, **kw)

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/v1/jobs/{job_id}", headers=AUTH, timeout=10).json()

    def metric(self, name: str, **labels) -> float:
        return metric_sum(httpx.get(self.url + "/metrics", headers=AUTH).text, name, **labels)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_until(what: str, check, limit: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"not within {limit:.0f} s: {what}")


def connect(port: int, data: bytes = b"", timeout: float = 10.0) -> socket.socket:
    """A raw loopback connection, optionally sending `data` (a request, or part of one)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes the connection."""
    chunks = []
    while chunk := s.recv(4096):
        chunks.append(chunk)
    s.close()
    return b"".join(chunks)
