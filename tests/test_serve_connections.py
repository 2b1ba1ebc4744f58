"""The guarded connection protocol on a real uvicorn, for both of uvicorn's HTTP parsers (httptools, h11), with a
trivial ASGI app: the limits belong to the connection layer, not to the model server."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn
from serve_helpers import connect, read_all
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen_image_trt.serve.connections import guarded_protocol

BASES = [pytest.param(H11Protocol, id="h11")]
try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    BASES.append(pytest.param(HttpToolsProtocol, id="httptools"))
except ImportError:  # pragma: no cover
    pass
CAP, TIMEOUT_S = 6, 0.6


async def hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture(params=BASES)
def server(request):
    events = []
    protocol = guarded_protocol(CAP, TIMEOUT_S, lambda event, n: events.append(event), base=request.param)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(hello, host="127.0.0.1", port=port, http=protocol, log_level="error",
                                        lifespan="off", timeout_keep_alive=30))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield port, events
    srv.should_exit = True
    thread.join(5)


GET = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_idle_half_sent_and_trickled_headers_are_closed(server):
    port, events = server
    idle = connect(port)
    half = connect(port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    trickle = connect(port, b"GET / HTTP/1.1\r\n")
    t0 = time.monotonic()
    for _ in range(4):  # a byte at a time does not extend the deadline
        time.sleep(TIMEOUT_S / 3)
        try:
            trickle.sendall(b"X")
        except OSError:
            break
    assert read_all(idle) == b""
    assert read_all(half).startswith(b"HTTP/1.1 408")
    assert read_all(trickle).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < TIMEOUT_S + 2
    assert events.count("header_timeout") == 3


def test_keep_alive_requests_in_time_are_served(server):
    port, _ = server
    s = connect(port, GET)
    assert s.recv(1000).startswith(b"HTTP/1.1 200")
    time.sleep(TIMEOUT_S / 2)
    s.sendall(GET)  # a second request on the same connection, headers in time
    assert s.recv(1000).startswith(b"HTTP/1.1 200")
    s.sendall(b"GET / HTTP/1.1\r\n")  # a third one that stalls: its own clock, started by its first bytes
    t0 = time.monotonic()
    assert read_all(s).startswith(b"HTTP/1.1 408")
    assert time.monotonic() - t0 < TIMEOUT_S + 1


def test_connections_over_the_cap_get_503_before_anything_is_read(server):
    port, events = server
    held = [connect(port) for _ in range(CAP)]
    time.sleep(0.1)
    extra = connect(port)
    reply = read_all(extra)
    assert reply.startswith(b"HTTP/1.1 503") and b"retry-after" in reply.lower()
    assert "over_cap" in events
    for s in held:
        s.close()
    time.sleep(0.2)
    s = connect(port, GET)  # room again
    assert s.recv(1000).startswith(b"HTTP/1.1 200")
    s.close()
