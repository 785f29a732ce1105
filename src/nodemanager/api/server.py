"""The API's transports: HTTP XML-RPC on TCP and on a Unix stream socket (api.md, "Transports").

Why not the stdlib ``SimpleXMLRPCServer`` the original used: a thread per connection tops out near
3,700 calls/s at 16 clients on this project's machines, it reads whatever Content-Length says with
no cap and no timeout, and it needs four patches to run on a Unix socket at all. Here the
project's one HTTP server core (:class:`nodemanager.http.server.HttpServer`: one asyncio event
loop in ONE background thread does all the socket I/O) serves the API, and the methods run in a
bounded thread pool because they may block (the store, a ticket's signature); an operation on the
per-sliver workers is awaited in the loop instead, holding no thread (:mod:`.calls`). The daemon
stays synchronous: it calls :meth:`ApiServer.start` and :meth:`ApiServer.stop`. The loop is the
standard asyncio one: uvloop is not used (an undeclared package never changes behaviour; the
server core accepts any loop should it ever be made an option).

The HTTP rules are the server core's (its module doc): request head of at most 16 KiB (431) and
head and body each within ``read_timeout`` seconds; POST only (405), with a Content-Length
(411) of at most ``max_request_bytes`` (413, the body never read); keep-alive; ``Expect:
100-continue``; at most ``max_connections`` open connections, one beyond is answered 503 and
closed at once; a graceful stop. Every well-framed POST is answered ``200 text/xml`` with a
result or a Fault (a malformed body is Fault 102 and the connection stays usable); a framing
error is answered with its HTTP status and the connection closed.

What is the API's own, given to the core as its hooks:

* **identity** (``identify``): computed once per connection from the kernel (:mod:`.peercred`),
  in the accept callback itself -- before anything is read, while an honest peer is certainly
  connected -- and kept for the connection: a peer that closes first has no identity, never
  root's. A TCP peer whose address is not loopback is refused (connection closed at once)
  unless the configured host itself is not loopback; such peers then have no identity.
* **fairness** (``admit``/``release``, :mod:`.fairness`): per caller, a cap on open connections
  (503 beyond it) and on calls in flight (a deferred operation keeps its call's slot until
  answered); a call over the latter waits in the loop, not in a thread, so one sliver cannot take
  every dispatch thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Self

from ..core.errors import ConfigError, OperationFailed
from ..http.framing import Request, Response
from ..http.server import HttpServer
from .calls import CallRunner, Dispatch, OnRequest
from .dispatchpool import DispatchPool
from .fairness import MAX_CALLS_PER_UID, MAX_CONNECTIONS_PER_UID, CallerLimits
from .identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity
from .listeners import TcpAddress, bind_tcp, bind_unix, parse_tcp_address, remove_unix_socket
from .peercred import is_loopback, tcp_peer, unix_peer

__all__ = ["ApiServer", "Dispatch", "OnRequest", "TcpAddress", "parse_tcp_address"]

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0


def _ok(payload: bytes) -> Response:
    return Response(200, payload)


class ApiServer:
    """Serves ``dispatch`` over HTTP XML-RPC on TCP and/or a Unix socket (see the module doc).

    ``start`` and ``stop`` are called from the daemon's thread; everything else runs in the
    server's own event-loop thread and its ``dispatch_threads`` pool threads.
    """

    def __init__(
        self,
        dispatch: Dispatch,
        *,
        tcp: str,
        unix_socket: str,
        max_request_bytes: int = 1024 * 1024,
        read_timeout: float = 10.0,
        max_connections: int = 512,
        dispatch_threads: int = 16,
        on_request: OnRequest | None = None,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
        max_calls_per_uid: int = MAX_CALLS_PER_UID,
    ) -> None:
        """Check the settings (ConfigError); nothing is bound until :meth:`start`. The per-uid
        caps default to :mod:`.fairness`'s constants (they are not configuration keys)."""
        limits = (max_connections, dispatch_threads, max_connections_per_uid, max_calls_per_uid)
        if max_request_bytes < 1 or read_timeout <= 0 or min(limits) < 1:
            raise ConfigError("API server limits must be positive")
        self._dispatch = dispatch
        self._tcp = parse_tcp_address(tcp)
        self._unix = Path(unix_socket) if unix_socket else None
        self._max_request_bytes = max_request_bytes
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._dispatch_threads = dispatch_threads
        self._on_request = on_request
        self._limits = CallerLimits(max_connections=max_connections_per_uid, max_calls=max_calls_per_uid)
        self._backlog = max(128, min(max_connections, 4096))
        self._tcp_sock: socket.socket | None = None
        self._unix_sock: socket.socket | None = None
        self._unix_ident: tuple[int, int] | None = None
        self._calls: CallRunner | None = None
        self._http: HttpServer | None = None
        self._started = False

    # --- public surface -------------------------------------------------------------------
    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """``(host, port)`` actually bound (the port is real even when configured as 0)."""
        if self._tcp_sock is None:
            return None
        host, port = self._tcp_sock.getsockname()[:2]
        return host, port

    @property
    def unix_path(self) -> Path | None:
        return self._unix if self._unix_sock is not None else None

    def start(self) -> None:
        """Bind the listeners and start serving. Raises OperationFailed with a clear message
        (address in use, a live or foreign file at the socket path, ...), leaving nothing bound."""
        if self._started:
            raise RuntimeError("ApiServer.start() called twice")
        self._started = True
        try:
            if self._tcp is not None:
                self._tcp_sock = bind_tcp(self._tcp, self._backlog)
            if self._unix is not None:
                self._unix_sock, self._unix_ident = bind_unix(self._unix, self._backlog)
            loop = asyncio.new_event_loop()
            self._calls = CallRunner(self._dispatch, DispatchPool(self._dispatch_threads, loop), self._on_request)
            http = self._http = HttpServer(
                self._handle,
                methods=("POST",),
                max_request_bytes=self._max_request_bytes,
                read_timeout=self._read_timeout,
                max_connections=self._max_connections,
                identify=self._identify,
                admit=self._admit,
                release=self._release_peer,
                name="api",
            )
            for sock, transport in ((self._tcp_sock, TRANSPORT_TCP), (self._unix_sock, TRANSPORT_UNIX)):
                if sock is not None:
                    http.add_listener(sock, transport)
            try:
                http.start(loop)
            except Exception as exc:
                raise OperationFailed(f"cannot start the API server: {exc}") from exc
        except BaseException:
            self._release()
            raise
        for kind, where in (("tcp", self.tcp_address), ("unix", self.unix_path)):
            if where is not None:
                logger.info("event=api-listening transport=%s address=%s", kind, where)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish for up to
        ``grace`` seconds (then cut them), and remove the Unix socket if it is still ours.
        Idempotent; a dispatch still running after that is abandoned (its thread finishes alone)."""
        if self._http is not None:
            self._http.stop(grace)
            logger.info("event=api-stopped")
        self._release()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- hooks of the HTTP server (loop thread) ---------------------------------------------
    def _identify(self, conn: socket.socket, transport: str) -> PeerIdentity | None:
        """The identity of the peer of a just-accepted socket, or None when the connection
        must be refused. Any doubt gives no identity, never a guessed one."""
        try:
            if transport == TRANSPORT_UNIX:
                return unix_peer(conn)
            remote = conn.getpeername()
            if not is_loopback(remote) and self._tcp is not None and self._tcp.loopback:
                logger.warning("event=api-refused reason=non-loopback-peer peer=%s", remote[0])
                return None
            return tcp_peer(conn.getsockname(), remote, connection=conn)
        except (OSError, ValueError, TypeError, IndexError) as exc:
            logger.warning("event=api-identity-unknown transport=%s error=%s", transport, exc)
            return PeerIdentity(transport, None)

    def _admit(self, peer: PeerIdentity) -> str | None:
        """Why a connection the global cap admitted is refused (503), or None -- and then it
        is counted against its caller's cap until :meth:`_release_peer`."""
        if not self._limits.admit(peer.uid):
            logger.warning(
                "event=api-refused reason=caller-connection-limit uid=%s limit=%d",
                peer.uid, self._limits.max_connections,
            )
            return "too many connections from this caller; retry later"
        return None

    def _release_peer(self, peer: PeerIdentity) -> None:
        self._limits.release(peer.uid)

    def _handle(self, request: Request, body: bytes, peer: PeerIdentity) -> Awaitable[Response]:
        """The HTTP server's handler: the call's answer, as a future (no task) when the caller
        waits for no call slot -- the common case, measured in ``bench/api_bench.py``."""
        calls = self._calls
        assert calls is not None
        slots = self._limits.call_slots(peer.uid)
        if slots is not None:
            return self._handle_in_turn(calls, body, peer, slots)
        response: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        calls.begin(body, peer, response, _ok)
        return response

    @staticmethod
    async def _handle_in_turn(calls: CallRunner, body: bytes, peer: PeerIdentity,
                              slots: asyncio.Semaphore) -> Response:
        async with slots:  # over the caller's cap: wait here, holding no thread
            return _ok(await calls.answer(body, peer))

    # --- cleanup ----------------------------------------------------------------------------
    def _release(self) -> None:
        """Close listeners, drop the executor, remove our socket file (same inode only)."""
        for sock in (self._tcp_sock, self._unix_sock):
            if sock is not None:
                sock.close()
        if self._calls is not None:
            self._calls.shutdown()
            self._calls = None
        if self._unix is not None and self._unix_ident is not None:
            remove_unix_socket(self._unix, self._unix_ident)
            self._unix_ident = None
        self._tcp_sock = self._unix_sock = None
