"""Test helpers for speaking HTTP to an ``ApiServer`` over raw sockets.

The transport tests control every byte (and every silence) a client sends, so they cannot use
``http.client``; these read back exactly one response the way a strict client would.
"""

from __future__ import annotations

import socket

from ..api.server import ApiServer


def connect_tcp(server: ApiServer) -> socket.socket:
    """A client socket connected to the server's TCP listener (10 s timeout)."""
    assert server.tcp_address is not None
    return socket.create_connection(server.tcp_address, timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response: status, lower-cased headers and the ``Content-Length`` body.
    Fails (``AssertionError``) if the server closes the connection before it is complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed in the middle of a response body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]
