"""Fixtures for the authority adapter: scripted tiny servers (the bundled server: tests/conftest.py).

Every server binds 127.0.0.1 port 0 and is stopped (and its thread joined) at teardown.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

import pytest


class Reply(NamedTuple):
    """One scripted answer; tests pass plain tuples ``(status, body[, delay])``."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0  # seconds to stall before answering


@dataclass
class ScriptedServer:
    """Answers request N with ``replies[N]`` (the last one repeats); records request bodies."""

    replies: list[Reply]
    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    httpd: ThreadingHTTPServer | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # e.g. a TLS handshake the client refused: expected in tests


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedServer]]:
    started: list[tuple[ScriptedServer, threading.Thread]] = []

    def start(
        replies: list[tuple[int, bytes] | tuple[int, bytes, float]], tls: tuple[Path, Path] | None = None
    ) -> ScriptedServer:
        """``tls``: (certificate, key) PEM files to serve HTTPS instead of HTTP."""
        script = ScriptedServer([Reply(*reply) for reply in replies])

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                script.requests.append((self.command, self.path, body))
                reply = script.replies[min(len(script.requests), len(script.replies)) - 1]
                if reply.delay:
                    script.stopping.wait(reply.delay)
                    if script.stopping.is_set():
                        return
                self.send_response(reply.status)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _answer

        httpd = _QuietServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        script.httpd = httpd
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((script, thread))
        return script

    yield start
    for script, thread in started:
        script.stopping.set()
        assert script.httpd is not None
        script.httpd.shutdown()
        script.httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def trickling_server() -> Iterator[int]:
    """Sends valid headers, then one body byte every 0.1 s: only a whole-response deadline ends it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def run() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(0.1)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                    while not stop.is_set():
                        conn.sendall(b"<")
                        time.sleep(0.1)
                except OSError:
                    pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def stalled_port() -> Iterator[int]:
    """A listening socket that accepts connections (kernel backlog) but never answers."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
