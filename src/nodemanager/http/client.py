"""A blocking HTTP/1.1 client: one request on a fresh connection (TCP, TLS or a Unix socket).

The node's authority client and the conf-files fetch use it. Why not ``http.client``: the things
that matter here are a cap on the body (announced or streamed), a deadline for the whole
exchange so a server trickling bytes cannot hold a poll forever, no redirects, no proxy
environment variables, and one framing implementation for the whole project (:mod:`.framing`).

Every failure is an :class:`HttpClientError` whose message says what happened; the subclasses
let a caller treat them differently (the authority client retries a timeout, never an oversized
answer).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

from .framing import BodyTooLarge, ProtocolError, encode_request
from .responses import ResponseCutShort, ResponseReader

__all__ = [
    "ClientResponse", "ClientTimeout", "Connection", "ConnectionFailed", "HttpClientError", "MalformedResponse",
    "ResponseTooLarge", "TlsVerificationFailed", "request", "host_header", "split_url", "step_timeout", "translated_errors",
]

_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """A complete response: status, headers (lower-case names) and the decoded body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class HttpClientError(Exception):
    """The exchange failed: refused, reset, timed out, too large, malformed (the message says)."""


class ConnectionFailed(HttpClientError):
    """The server could not be reached, or the connection broke (refused, reset, closed early)."""


class ClientTimeout(HttpClientError):
    """No complete answer within the timeout or the deadline."""


class ResponseTooLarge(HttpClientError):
    """The body is (or was announced to be) over ``max_body``."""


class MalformedResponse(HttpClientError):
    """The answer is not a usable HTTP/1.x response."""


class TlsVerificationFailed(HttpClientError):
    """The server's certificate did not verify against the context's CAs."""


def split_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, target)`` of an http(s) URL; ValueError for anything else."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url[:80]!r}")
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port, target


def step_timeout(timeout: float, deadline: float) -> float:
    """Seconds the next step of an exchange may take: ``timeout``, or less as the deadline
    (``time.monotonic``) nears; :class:`ClientTimeout` once it has passed."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ClientTimeout("no complete answer before the deadline")
    return min(timeout, remaining)


def host_header(host: str, port: int) -> str:
    """The Host header's value for ``host:port`` (the port left out when it is the scheme's)."""
    return host if port in (80, 443) else f"{host}:{port}"


def _recv(sock: socket.socket, timeout: float, deadline: float) -> bytes:
    """The next bytes from ``sock`` (b"" at end of stream), within ``timeout`` and the deadline."""
    sock.settimeout(step_timeout(timeout, deadline))
    return sock.recv(_CHUNK)


def request(
    url: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float,
    max_body: int,
    ssl_context: ssl.SSLContext | None = None,
    unix_socket: str | None = None,
    deadline: float | None = None,
    on_connect: Callable[[socket.socket], None] | None = None,
) -> ClientResponse:
    """One request on a fresh connection; the whole response, whatever its status.

    ``timeout`` bounds each socket operation, ``deadline`` (``time.monotonic``; default: now +
    ``timeout``) the whole exchange. HTTPS is verified with ``ssl_context`` (the system CAs when
    None). ``unix_socket`` connects there instead of the URL's host (which still names the
    Host header). ``on_connect`` receives the connected socket before the request is sent: a
    caller on another thread may ``shutdown()`` it to abort a long exchange at once (the node's
    blocking query on stop); the exchange then fails with :class:`ConnectionFailed`. Raises
    :class:`HttpClientError` (a subclass saying which failure)."""
    scheme, host, port, target = split_url(url)
    if deadline is None:
        deadline = time.monotonic() + timeout
    data = encode_request(method, target, host=host_header(host, port), body=body, headers=headers,
                          keep_alive=False)
    where = unix_socket or f"{host}:{port}"
    sock: socket.socket | None = None
    try:
        with translated_errors(where, timeout, deadline):
            sock = _connect(scheme, host, port, unix_socket, ssl_context, timeout, deadline)
            if on_connect is not None:
                on_connect(sock)
            sock.sendall(data)
            reader = _receive(sock, method, timeout, deadline, max_body)
            return _response(reader)
    finally:
        if sock is not None:
            sock.close()


class Connection:
    """Requests one after the other on one kept-alive connection to ``url``'s server (TCP, TLS
    or ``unix_socket``); what the node API's XML-RPC client uses. Not thread-safe.

    A connection the server closed between two requests is reopened once, transparently, when
    the failure happened before any of the answer arrived (as ``xmlrpc.client``'s transport
    does); any other failure closes it and raises :class:`HttpClientError`."""

    def __init__(self, url: str, *, timeout: float, max_body: int, ssl_context: ssl.SSLContext | None = None,
                 unix_socket: str | None = None) -> None:
        self.scheme, self.host, self.port, _target = split_url(url)
        self.timeout = timeout
        self.max_body = max_body
        self.ssl_context = ssl_context
        self.unix_socket = unix_socket
        self.where = unix_socket or f"{self.host}:{self.port}"
        self._sock: socket.socket | None = None

    def request(self, method: str, target: str, *, body: bytes = b"", headers: Sequence[tuple[str, str]] = (),
                deadline: float | None = None) -> ClientResponse:
        """One request on the kept connection (opened when needed); the whole response."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        data = encode_request(method, target, host=host_header(self.host, self.port), body=body, headers=headers)
        for attempt in (1, 2):
            reused = self._sock is not None
            try:
                with translated_errors(self.where, self.timeout, deadline):
                    if self._sock is None:
                        self._sock = _connect(self.scheme, self.host, self.port, self.unix_socket,
                                              self.ssl_context, self.timeout, deadline)
                    try:
                        self._sock.sendall(data)
                        reader = _receive(self._sock, method, self.timeout, deadline, self.max_body)
                    except (BrokenPipeError, _Unanswered):  # nothing of an answer arrived
                        if reused and attempt == 1:
                            self.close()
                            continue  # the server closed the idle connection: once more, afresh
                        raise
            except BaseException:
                self.close()
                raise
            assert reader.head is not None
            if not reader.head.keep_alive or reader.unused:
                self.close()  # the server closes, or sent more than asked: start afresh next time
            return _response(reader)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection (idempotent); the next request opens a new one."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _response(reader: ResponseReader) -> ClientResponse:
    assert reader.head is not None
    return ClientResponse(reader.head.status, reader.head.headers, reader.body)


class _Unanswered(ConnectionFailed):
    """The connection ended before any byte of the answer arrived."""


def _connect(scheme: str, host: str, port: int, unix_socket: str | None, ssl_context: ssl.SSLContext | None,
             timeout: float, deadline: float) -> socket.socket:
    step = step_timeout(timeout, deadline)
    if unix_socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(step)
            sock.connect(unix_socket)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection((host, port), timeout=step)
    if scheme == "https":
        context = ssl_context if ssl_context is not None else ssl.create_default_context()
        try:
            sock = context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
    return sock


def _receive(sock: socket.socket, method: str, timeout: float, deadline: float,
             max_body: int) -> ResponseReader:
    """The complete response read from ``sock`` (framing: :class:`.responses.ResponseReader`).
    Raises :class:`_Unanswered` when the connection ended before any byte of it arrived."""
    reader = ResponseReader(max_body=max_body, head_only=method == "HEAD")
    try:
        while not reader.done:
            chunk = _recv(sock, timeout, deadline)
            if chunk:
                reader.feed(chunk)
            else:
                reader.end_of_stream()
    except ResponseCutShort as exc:
        raise (ConnectionFailed if exc.answered else _Unanswered)(str(exc)) from exc
    except ConnectionResetError as exc:
        if reader.received:
            raise
        raise _Unanswered("connection reset by the server before answering (ConnectionResetError)") from exc
    return reader


@contextmanager
def translated_errors(where: str, timeout: float, deadline: float) -> Iterator[None]:
    """Every failure of an exchange as an :class:`HttpClientError` naming ``where``."""
    try:
        yield
    except HttpClientError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except BodyTooLarge as exc:
        raise ResponseTooLarge(f"{where}: {exc}") from exc
    except ResponseCutShort as exc:
        raise ConnectionFailed(f"{where}: {exc}") from exc
    except ProtocolError as exc:
        raise MalformedResponse(f"{where}: malformed response: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TlsVerificationFailed(f"{where}: TLS certificate verification failed: {exc.verify_message}") from exc
    except TimeoutError as exc:
        if time.monotonic() >= deadline:
            raise ClientTimeout(f"{where}: no complete answer before the deadline") from exc
        raise ClientTimeout(f"{where}: no complete answer within {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise ConnectionFailed(f"{where}: connection refused (ConnectionRefusedError)") from exc
    except ConnectionResetError as exc:
        raise _Unanswered(f"{where}: connection reset by the server (ConnectionResetError)") from exc
    except BrokenPipeError as exc:
        raise _Unanswered(f"{where}: connection closed by the server (BrokenPipeError)") from exc
    except OSError as exc:  # DNS, unreachable, TLS handshake errors (ssl.SSLError is an OSError)
        raise ConnectionFailed(f"{where}: {type(exc).__name__}: {exc.strerror or exc}") from exc
