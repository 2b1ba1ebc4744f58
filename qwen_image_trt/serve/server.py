"""The process: uvicorn with the guarded connection protocol, and a drain on the first SIGTERM/SIGINT.

uvicorn's own shutdown closes the listening socket at once (new clients get "connection refused", which load
balancers read as a dead host) and gives in-flight requests `timeout_graceful_shutdown`. We drain first instead:
the socket stays open and new work gets 503 + Retry-After, running batches and waiting requests finish within
`--shutdown-grace-s`, async jobs that have not started stay queued in the job store for the next start; then
uvicorn's shutdown runs and stops the workers. A second signal skips the rest of the drain; a third forces exit.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from qwen_image_trt.serve.app import create_app
from qwen_image_trt.serve.config import ServerConfig
from qwen_image_trt.serve.connections import guarded_protocol

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s, self.signals_seen, self._loop = grace_s, 0, None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        self.signals_seen += 1
        if self.signals_seen > 1 or self._loop is None or not self.started:
            return super().handle_exit(sig, frame)
        self._captured_signals.append(sig)  # re-raised by uvicorn once it has shut down: exit status says why
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        engine = getattr(self.config.app.state, "engine", None)  # the FastAPI app (loaded, not an import string)
        if engine is not None:
            log.warning("draining: refusing new work, finishing running work for up to %.0f s", self.grace_s)
            await engine.drain(self.grace_s)
        self.should_exit = True


def run_server(cfg: ServerConfig) -> None:
    app = create_app(cfg)

    def on_connection_event(event: str, open_now: int) -> None:
        engine = getattr(app.state, "engine", None)
        if engine is None:
            return
        engine.metrics.connections.set(open_now)
        if event in ("header_timeout", "over_cap"):
            engine.metrics.dropped_connections.labels(event).inc()

    protocol = guarded_protocol(cfg.max_connections, cfg.header_timeout_s, on_connection_event)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", http=protocol,
                            timeout_keep_alive=cfg.keep_alive_s, timeout_graceful_shutdown=5,
                            backlog=min(2048, 2 * cfg.max_connections))
    DrainingServer(config, cfg.shutdown_grace_s).run()
