"""The asyncio HTTP/1.1 server core (nodemanager.http.server) on real sockets, with trivial
handlers: limits, keep-alive, long handlers, stopping, many idle connections."""

from __future__ import annotations

import asyncio
import resource
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nodemanager.http.framing import HttpError, Request, Response, parse_response_head
from nodemanager.http.server import HttpServer

WAIT = 10.0  # generous upper bound for anything that should happen "soon"


def listener_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    return sock


class Echo:
    """A handler that echoes, records peers, can be told to wait on an event or raise."""

    def __init__(self) -> None:
        self.peers: list[Any] = []
        self.gate: asyncio.Event | None = None
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.calls = 0

    async def __call__(self, request: Request, body: bytes, peer: Any) -> Response:
        self.calls += 1
        self.peers.append(peer)
        if request.path == "/raise":
            raise RuntimeError("handler bug")
        if request.path == "/teapot":
            raise HttpError(403, "no tea")
        if request.path == "/sleep":
            self.started.set()
            try:
                await asyncio.sleep(float(request.query.get("s", "2")))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return Response(200, b"%s %s %s" % (request.method.encode(), request.target.encode(), body),
                        headers=((b"X-Peer", str(peer).encode()),))


@contextmanager
def running(handler: Any = None, **options: Any) -> Iterator[tuple[HttpServer, int, Any]]:
    handler = handler or Echo()
    settings: dict[str, Any] = {"max_request_bytes": 1000, "read_timeout": 5.0, "max_connections": 64,
                                "methods": ("POST", "GET", "HEAD")}
    settings.update(options)
    server = HttpServer(handler, **settings)
    sock = listener_tcp()
    port = sock.getsockname()[1]
    server.add_listener(sock, "tcp")
    server.start()
    try:
        yield server, port, handler
    finally:
        server.stop(grace=1.0)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return sock


def read_response(sock: socket.socket, buffer: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    buffer = bytearray() if buffer is None else buffer
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {bytes(buffer)!r}")
        buffer += chunk
    head = parse_response_head(bytes(buffer[: end + 4]))
    del buffer[: end + 4]
    length = head.content_length or 0
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("body cut short")
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return head.status, dict(head.headers), body


def is_closed(sock: socket.socket) -> bool:
    sock.settimeout(WAIT)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def post(target: str, body: bytes = b"", extra: str = "") -> bytes:
    return f"POST {target} HTTP/1.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


# --------------------------------------------------------------------------- basics

def test_post_get_head_and_keep_alive() -> None:
    with running() as (_server, port, handler), connect(port) as sock:
        buffer = bytearray()
        sock.sendall(post("/a?x=1", b"hello"))
        status, _headers, body = read_response(sock, buffer)
        assert (status, body) == (200, b"POST /a?x=1 hello")
        sock.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = read_response(sock, buffer)
        assert (status, body, headers["x-peer"]) == (200, b"GET /b ", "tcp")
        sock.sendall(b"HEAD /c HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\nX-Peer: tcp\r\n\r\n")
        assert b"\r\nContent-Length: 8\r\n" in data
        assert handler.calls == 3


def test_pipelined_requests_are_answered_in_order() -> None:
    with running() as (_server, port, _handler), connect(port) as sock:
        sock.sendall(post("/1", b"a") + post("/2", b"b") + post("/3", b"c", "Connection: close\r\n"))
        buffer = bytearray()
        bodies = [read_response(sock, buffer)[2] for _ in range(3)]
        assert bodies == [b"POST /1 a", b"POST /2 b", b"POST /3 c"]
        assert is_closed(sock)


def test_http10_closes_unless_keep_alive() -> None:
    with running() as (_server, port, _handler):
        with connect(port) as sock:
            sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
            status, headers, _ = read_response(sock)
            assert status == 200 and headers["connection"] == "close" and is_closed(sock)
        with connect(port) as sock:
            sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n" * 2)
            buffer = bytearray()
            assert read_response(sock, buffer)[1]["connection"] == "keep-alive"
            assert read_response(sock, buffer)[0] == 200


def test_body_in_pieces_and_expect_continue() -> None:
    with running() as (_server, port, _handler), connect(port) as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n")
        buffer = bytearray()
        assert read_response(sock, buffer)[0] == 100
        for piece in (b"ab", b"cd", b"ef"):
            sock.sendall(piece)
            time.sleep(0.01)
        assert read_response(sock, buffer)[2] == b"POST /e abcdef"


def test_a_half_closed_client_counts_as_gone() -> None:
    with running() as (_server, port, handler), connect(port) as sock:
        sock.sendall(post("/sleep?s=60", b"x"))
        assert handler.started.wait(WAIT)
        sock.shutdown(socket.SHUT_WR)
        assert handler.cancelled.wait(WAIT)
        assert is_closed(sock)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"PUT / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nX: " + b"a" * 20000, 431),
        (b"POST / HTTP/3.0\r\nContent-Length: 0\r\n\r\n", 505),
        (b"nonsense\r\n\r\n", 400),
    ],
)
def test_framing_errors_get_a_status_and_a_close(request_bytes: bytes, status: int) -> None:
    with running() as (_server, port, handler):
        with connect(port) as sock:
            sock.sendall(request_bytes)
            got, headers, _ = read_response(sock)
            assert got == status and headers["connection"] == "close"
            if status == 405:
                assert headers["allow"] == "POST, GET, HEAD"
            assert is_closed(sock)
        assert handler.calls == 0
        with connect(port) as sock:  # the server is fine afterwards
            sock.sendall(post("/", b"ok"))
            assert read_response(sock)[0] == 200


def test_handler_errors() -> None:
    with running() as (_server, port, _handler):
        with connect(port) as sock:
            sock.sendall(post("/teapot"))
            status, headers, body = read_response(sock)
            assert (status, body) == (403, b"no tea\n") and is_closed(sock)
        with connect(port) as sock:
            sock.sendall(post("/raise"))
            assert read_response(sock)[0] == 500 and is_closed(sock)


def test_connection_cap_and_admission_hooks() -> None:
    admitted: list[Any] = []
    released: list[Any] = []

    def admit(peer: Any) -> str | None:
        if peer == "refuse-me":
            return "not you"
        admitted.append(peer)
        return None

    labels = iter(["ok", "refuse-me", None, "ok", "ok"])

    def identify(sock: socket.socket, label: str) -> Any:
        assert label == "tcp" and sock.fileno() >= 0
        return next(labels)

    with running(identify=identify, admit=admit, release=released.append, max_connections=2) as (server, port, _):
        one = connect(port)
        one.sendall(post("/"))
        assert read_response(one)[0] == 200
        with connect(port) as refused:  # refused by admit
            refused.sendall(post("/"))
            status, _, body = read_response(refused)
            assert (status, body) == (503, b"not you\n") and is_closed(refused)
        with connect(port) as anonymous:  # identify said None: closed, nothing written
            assert is_closed(anonymous)
        two = connect(port)
        two.sendall(post("/"))
        assert read_response(two)[0] == 200
        with connect(port) as extra:  # over max_connections
            status, _, body = read_response(extra)
            assert status == 503 and b"too many connections" in body
        assert server.open_connections == 2
        one.close()
        two.close()
        deadline = time.monotonic() + WAIT
        while len(released) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert admitted == ["ok", "ok"] and released == ["ok", "ok"]


# --------------------------------------------------------------------------- time

def test_a_slow_handler_is_not_cut_by_the_read_timeout() -> None:
    with running(read_timeout=0.3) as (_server, port, handler), connect(port) as sock:
        sock.sendall(post("/sleep?s=2", b"z"))
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"POST /sleep?s=2 z")
        sock.sendall(post("/again"))
        assert read_response(sock)[0] == 200
        assert not handler.cancelled.is_set()


def test_idle_and_trickling_clients_are_closed_after_the_read_timeout() -> None:
    with running(read_timeout=0.3) as (_server, port, handler):
        with connect(port) as idle:
            assert is_closed(idle)
        with connect(port) as trickle:
            trickle.sendall(b"POST / HTTP/1.1\r\n")
            assert is_closed(trickle)
        with connect(port) as half_body:
            half_body.sendall(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            assert is_closed(half_body)
        assert handler.calls == 0


def test_a_client_that_leaves_cancels_its_handler() -> None:
    with running() as (_server, port, handler):
        sock = connect(port)
        sock.sendall(post("/sleep?s=60"))
        assert handler.started.wait(WAIT)
        sock.close()
        assert handler.cancelled.wait(WAIT)


# --------------------------------------------------------------------------- stopping

def test_stop_closes_idle_connections_and_finishes_busy_ones() -> None:
    handler = Echo()
    server = HttpServer(handler, max_request_bytes=100, read_timeout=30, max_connections=10)
    sock = listener_tcp()
    port = sock.getsockname()[1]
    server.add_listener(sock, "tcp")
    server.start()
    idle, busy = connect(port), connect(port)
    busy.sendall(post("/sleep?s=0.5", b"b"))
    assert handler.started.wait(WAIT)
    stopper = threading.Thread(target=server.stop, kwargs={"grace": 10.0})
    stopper.start()
    assert is_closed(idle)
    status, headers, body = read_response(busy)
    assert (status, headers["connection"], body) == (200, "close", b"POST /sleep?s=0.5 b")
    stopper.join(WAIT)
    assert not stopper.is_alive()
    with pytest.raises(OSError):
        connect(port)  # listener closed: refused
    idle.close()
    busy.close()


def test_stop_cuts_handlers_past_the_grace() -> None:
    handler = Echo()
    server = HttpServer(handler, max_request_bytes=100, read_timeout=30, max_connections=10)
    sock = listener_tcp()
    server.add_listener(sock, "tcp")
    server.start()
    with connect(sock.getsockname()[1]) as busy:
        busy.sendall(post("/sleep?s=60"))
        assert handler.started.wait(WAIT)
        server.stop(grace=0.2)
        assert handler.cancelled.is_set()
        assert is_closed(busy)
    server.stop()  # idempotent


def test_serve_inside_a_running_loop_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    async def scenario() -> tuple[int, bytes]:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        server = HttpServer(Echo(), max_request_bytes=100, read_timeout=5, max_connections=4)
        server.add_listener(listener, "unix")
        await server.serve()
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(post("/u", b"1", "Connection: close\r\n"))
        data = await reader.read()
        writer.close()
        await server.shutdown(1.0)
        head, _, body = data.partition(b"\r\n\r\n")
        return parse_response_head(head).status, body

    assert asyncio.run(scenario()) == (200, b"POST /u 1")


# --------------------------------------------------------------------------- scale

def test_two_thousand_idle_connections_without_threads() -> None:
    wanted = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        with running(max_connections=wanted + 10, read_timeout=60) as (server, port, handler):
            threads_before = threading.active_count()
            clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(wanted)]
            try:
                deadline = time.monotonic() + 30
                while server.open_connections < wanted and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert server.open_connections == wanted
                assert threading.active_count() == threads_before
                for sock in clients[::100]:  # a sample of them is served normally
                    sock.sendall(post("/k", b"v"))
                    assert read_response(sock)[2] == b"POST /k v"
                assert handler.calls == wanted // 100
            finally:
                for sock in clients:
                    sock.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
