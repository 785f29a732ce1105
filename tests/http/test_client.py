"""The blocking and asyncio HTTP clients (nodemanager.http.client / .aclient) against the real
server core and against hostile raw servers: truncated, oversized, garbage, dripping answers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nodemanager.http.aclient import arequest
from nodemanager.http.client import (
    ClientTimeout,
    Connection,
    ConnectionFailed,
    HttpClientError,
    MalformedResponse,
    ResponseTooLarge,
    TlsVerificationFailed,
    request,
)
from nodemanager.http.framing import Request, Response
from nodemanager.http.server import HttpServer

Script = Callable[[socket.socket], None]


async def echo(request_: Request, body: bytes, peer: Any) -> Response:
    return Response(200, b"%s %s|%s|%s" % (request_.method.encode(), request_.target.encode(), body,
                                          request_.headers.get("x-token", "").encode()))


@contextmanager
def our_server(unix_path: str | None = None) -> Iterator[str]:
    server = HttpServer(echo, methods=("POST", "GET"), max_request_bytes=1 << 20, read_timeout=5,
                        max_connections=128)
    if unix_path is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_path)
    sock.listen()
    address = sock.getsockname()
    server.add_listener(sock, "l")
    server.start()
    try:
        yield f"http://127.0.0.1:{address[1]}" if unix_path is None else "http://localhost"
    finally:
        server.stop(1.0)


@contextmanager
def raw_server(script: Script, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Accepts connections and runs ``script`` on each, in a thread."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(10)
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True)
                conn.recv(65536)  # the request
                script(conn)
            except OSError:
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join(5)
        listener.close()


def sends(*parts: bytes, pause: float = 0.0) -> Script:
    def script(conn: socket.socket) -> None:
        for part in parts:
            conn.sendall(part)
            if pause:
                time.sleep(pause)
    return script


# --------------------------------------------------------------------------- against our server

def test_post_and_get_against_the_server() -> None:
    with our_server() as url:
        answer = request(url + "/RPC2?a=1", body=b"<x/>", headers=[("X-Token", "t")], timeout=5, max_body=1000)
        assert (answer.status, answer.body) == (200, b"POST /RPC2?a=1|<x/>|t")
        assert answer.headers["content-type"] == "text/xml"
        got = request(url + "/doc", method="GET", timeout=5, max_body=1000)
        assert got.body == b"GET /doc||"
        refused = request(url + "/", method="PUT", timeout=5, max_body=1000)
        assert refused.status == 405 and refused.headers["allow"] == "POST, GET"


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    with our_server(path) as url:
        answer = request(url + "/RPC2", body=b"u", timeout=5, max_body=100, unix_socket=path)
        assert answer.body == b"POST /RPC2|u|"


def test_async_client_many_at_once() -> None:
    with our_server() as url:
        async def many() -> list[bytes]:
            answers = await asyncio.gather(*(arequest(f"{url}/{i}", body=b"%d" % i, timeout=5, max_body=100)
                                             for i in range(50)))
            return [answer.body for answer in answers]

        assert asyncio.run(many()) == [b"POST /%d|%d|" % (i, i) for i in range(50)]


def test_refused_connection() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(ConnectionFailed, match="refused"):
        request(f"http://127.0.0.1:{port}/", timeout=2, max_body=10)
    with pytest.raises(ConnectionFailed, match="refused"):
        asyncio.run(arequest(f"http://127.0.0.1:{port}/", timeout=2, max_body=10))


# --------------------------------------------------------------------------- hostile servers

OK_HEAD = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    ("script", "error", "words"),
    [
        (sends(OK_HEAD + b"Content-Length: 10\r\n\r\nabc"), ConnectionFailed, "cut short"),
        (sends(OK_HEAD + b"Content-Length: 1000\r\n\r\n"), ResponseTooLarge, "over the 100-byte cap"),
        (sends(OK_HEAD + b"\r\n" + b"x" * 500), ResponseTooLarge, "cap"),
        (sends(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFF\r\n"), ResponseTooLarge, "over 100"),
        (sends(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"), ConnectionFailed, "chunked"),
        (sends(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"), MalformedResponse, "chunk size"),
        (sends(b"SSH-2.0-OpenSSH_9\r\n\r\n"), MalformedResponse, "status line"),
        (sends(OK_HEAD + b"X: " + b"a" * 70000), MalformedResponse, "head over"),
        (sends(b""), ConnectionFailed, "before answering"),
        (sends(OK_HEAD + b"Content-Length: 6\r\n\r\n", b"a", b"b", b"c", b"d", b"e", b"f", pause=0.3),
         ClientTimeout, "deadline"),
    ],
    ids=["truncated", "announced-too-large", "streamed-too-large", "chunk-too-large", "chunked-truncated",
         "chunk-garbage", "garbage-head", "endless-head", "closed", "slow-drip"],
)
def test_hostile_answers(script: Script, error: type[HttpClientError], words: str) -> None:
    with raw_server(script) as url:
        started = time.monotonic()
        with pytest.raises(error, match=words):
            request(url + "/", timeout=5, max_body=100, deadline=time.monotonic() + 1.0)
        with pytest.raises(error, match=words):
            asyncio.run(arequest(url + "/", timeout=5, max_body=100, deadline=time.monotonic() + 1.0))
        assert time.monotonic() - started < 30  # sanity only: the deadline is what ends a drip


def test_good_answers_of_every_framing() -> None:
    cases = [
        (sends(OK_HEAD + b"Content-Length: 3\r\n\r\nabc"), b"abc"),
        (sends(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", b"2\r\nde\r\n0\r\n\r\n"), b"abcde"),
        (sends(b"HTTP/1.0 200 OK\r\n\r\nuntil", b" the close"), b"until the close"),
        (sends(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + b"Content-Length: 2\r\n\r\nok"), b"ok"),
    ]
    for script, body in cases:
        with raw_server(script) as url:
            assert request(url + "/", timeout=5, max_body=100).body == body
            assert asyncio.run(arequest(url + "/", timeout=5, max_body=100)).body == body


def test_a_silent_server_times_out() -> None:
    with raw_server(lambda conn: time.sleep(1.5)) as url:
        with pytest.raises(ClientTimeout):
            request(url + "/", timeout=0.3, max_body=100)


# --------------------------------------------------------------------------- TLS

def test_tls_is_verified(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    with raw_server(sends(OK_HEAD + b"Content-Length: 2\r\n\r\nok"), tls=server_context) as url:
        https = url.replace("http://", "https://") + "/"
        trusted = ssl.create_default_context(cafile=str(cert))
        assert request(https, timeout=5, max_body=10, ssl_context=trusted).body == b"ok"
        assert asyncio.run(arequest(https, timeout=5, max_body=10, ssl_context=trusted)).body == b"ok"
        with pytest.raises(TlsVerificationFailed, match="verification failed"):
            request(https, timeout=5, max_body=10, ssl_context=ssl.create_default_context())


def test_on_connect_lets_another_thread_end_a_long_exchange() -> None:
    sockets: list[socket.socket] = []
    with raw_server(lambda conn: time.sleep(3)) as url:
        ender = threading.Timer(0.3, lambda: sockets[0].shutdown(socket.SHUT_RDWR))
        ender.start()
        try:
            with pytest.raises(ConnectionFailed, match="closed the connection"):
                request(url + "/", timeout=30, max_body=10, on_connect=sockets.append)
        finally:
            ender.cancel()


def test_a_connection_is_kept_and_reopened_after_an_idle_close() -> None:
    accepted: list[str] = []

    def identify(sock: socket.socket, label: str) -> str:
        accepted.append(label)
        return label

    server = HttpServer(echo, max_request_bytes=1000, read_timeout=0.3, max_connections=8, identify=identify)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server.add_listener(listener, "l")
    server.start()
    connection = Connection(f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=5, max_body=100)
    try:
        assert connection.request("POST", "/a", body=b"1").body == b"POST /a|1|"
        assert connection.request("POST", "/b", body=b"2").body == b"POST /b|2|"
        assert len(accepted) == 1  # one connection for both
        time.sleep(1.0)  # the server closes the idle connection (read_timeout)
        assert connection.request("POST", "/c", body=b"3").body == b"POST /c|3|"
        assert len(accepted) == 2  # reopened once, transparently
    finally:
        connection.close()
        server.stop(1.0)


def test_a_connection_reports_a_server_that_never_answers() -> None:
    with raw_server(sends(b"")) as url:
        connection = Connection(url + "/", timeout=5, max_body=100)
        with pytest.raises(ConnectionFailed):
            connection.request("POST", "/", body=b"x")
        connection.close()
