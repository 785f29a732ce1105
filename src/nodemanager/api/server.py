"""The API's transports: HTTP XML-RPC on TCP and on a Unix stream socket (api.md, "Transports").

Why not the stdlib ``SimpleXMLRPCServer`` the original used: a thread per connection tops out near
3,700 calls/s at 16 clients on this project's machines, it reads whatever Content-Length says with
no cap and no timeout, and it needs four patches to run on a Unix socket at all. Here one asyncio
event loop (uvloop when importable) in ONE background thread does all the socket I/O, and the
methods run in a bounded thread pool because they may block (the store, a ticket's signature);
an operation on the per-sliver workers is awaited in the loop instead, holding no thread
(:mod:`.calls`). The daemon stays synchronous: it calls :meth:`ApiServer.start` and
:meth:`ApiServer.stop`.

HTTP, written here on asyncio streams because the subset needed is small (framing rules in
:func:`.wire.parse_head`):
- request line + headers of at most 16 KiB (else 431), received within ``read_timeout`` seconds,
  and the body likewise: a silent or trickling client is closed after ``read_timeout`` and never
  holds up anyone else (each connection is its own task);
- POST with a Content-Length of at most ``max_request_bytes``; a larger one gets 413 and the
  connection is closed without the body being read; any request path is accepted;
- keep-alive for HTTP/1.1 (unless ``Connection: close``) and HTTP/1.0 with ``Connection:
  keep-alive``; an idle keep-alive connection is closed after ``read_timeout``;
- at most ``max_connections`` open connections: one beyond that is answered 503 and closed at
  once (not queued), so an overload is visible to the client instead of a silent stall; the same
  for one beyond its caller's own cap (:mod:`.fairness`);
- every well-framed POST is answered ``200 text/xml`` with a result or a Fault (a malformed body
  is Fault 102 and the connection stays usable); a framing error is answered with its HTTP status
  and the connection closed.

Caller identity is computed once per connection from the kernel (:mod:`.peercred`), in the
accept callback itself -- before anything is read, while an honest peer is certainly connected --
and kept for the connection: a peer that closes first has no identity, never root's. A TCP peer
whose address is not loopback is refused (connection closed at once) unless the configured host
itself is not loopback; such peers then have no identity.

Fairness (:mod:`.fairness`): per caller, a cap on open connections and on calls in flight (a
deferred operation keeps its call's slot until answered); a call over the latter waits in the
loop, not in a thread, so one sliver cannot take every dispatch thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ..core.errors import ConfigError, OperationFailed
from .calls import CallRunner, Dispatch, OnRequest
from .dispatchpool import DispatchPool
from .fairness import MAX_CALLS_PER_UID, MAX_CONNECTIONS_PER_UID, CallerLimits
from .identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity
from .listeners import TcpAddress, bind_tcp, bind_unix, parse_tcp_address, remove_unix_socket
from .peercred import is_loopback, tcp_peer, unix_peer
from .wire import (
    MAX_HEAD_BYTES,
    HttpError,
    error_response,
    parse_head,
    response_head,
)

try:  # optional accelerator; never a dependency
    import uvloop as _uvloop  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _uvloop = None

__all__ = ["ApiServer", "Dispatch", "OnRequest", "TcpAddress", "parse_tcp_address"]

logger = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(eq=False)
class _Connection:
    """One client connection, as seen by :meth:`ApiServer.stop` (loop thread only)."""

    writer: asyncio.StreamWriter
    idle: bool = field(default=True)


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._calls: CallRunner | None = None
        self._listening: list[socket.socket] = []
        # Connection tasks -> the raw socket they have not yet taken ownership of (then None).
        self._tasks: dict[asyncio.Task[Any], socket.socket | None] = {}
        self._connections: set[_Connection] = set()
        self._closing = False
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
            self._loop = _uvloop.new_event_loop() if _uvloop is not None else asyncio.new_event_loop()
            self._calls = CallRunner(
                self._dispatch, DispatchPool(self._dispatch_threads, self._loop), self._on_request
            )
            outcome: list[BaseException | None] = []
            started = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(started, outcome), name="nm-api-loop", daemon=True
            )
            self._thread.start()
            started.wait()
            if outcome and outcome[0] is not None:
                raise OperationFailed(f"cannot start the API server: {outcome[0]}") from outcome[0]
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
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            self._release()
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(grace), loop)
        try:
            future.result(grace + 5.0)
        except Exception:  # stopping must not fail half-way
            logger.exception("event=api-stop-error")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        self._release()
        logger.info("event=api-stopped")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- loop thread ----------------------------------------------------------------------
    def _run_loop(self, started: threading.Event, outcome: list[BaseException | None]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open_servers())
        except Exception as exc:  # noqa: BLE001 - reported to start()
            outcome.append(exc)
            started.set()
            loop.close()
            return
        outcome.append(None)
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _open_servers(self) -> None:
        # Accepting by hand (a reader callback) rather than asyncio.start_server or a
        # sock_accept task: every accepted socket is handed to a connection task synchronously,
        # so stopping can never strand one (3.11's Server drops, unclosed, a connection accepted
        # just before Server.close(), and cancelling sock_accept can lose one it just accepted).
        loop = asyncio.get_running_loop()
        for sock, transport in ((self._tcp_sock, TRANSPORT_TCP), (self._unix_sock, TRANSPORT_UNIX)):
            if sock is not None:
                loop.add_reader(sock.fileno(), self._accept_ready, sock, transport)
                self._listening.append(sock)

    def _accept_ready(self, listener: socket.socket, transport: str) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: pause accepting instead of spinning
                logger.warning("event=api-accept-error transport=%s error=%s", transport, exc)
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._resume_accepting, listener, transport)
                return
            conn.setblocking(False)
            peer = self._identify(conn, transport)  # now: before the peer can have gone
            if peer is None:
                conn.close()
                continue
            task = loop.create_task(self._accepted(conn, transport, peer))
            self._tasks[task] = conn
            task.add_done_callback(self._forget)

    def _resume_accepting(self, listener: socket.socket, transport: str) -> None:
        if not self._closing:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener, transport)

    def _forget(self, task: asyncio.Task[None]) -> None:
        conn = self._tasks.pop(task, None)
        if conn is not None:
            conn.close()  # cancelled before it could take ownership of the socket

    async def _accepted(self, conn: socket.socket, transport: str, peer: PeerIdentity) -> None:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        if me is not None:
            self._tasks[me] = None  # from here on, this coroutine closes the socket
        try:
            reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES)
            protocol = asyncio.StreamReaderProtocol(reader)
            stream, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except Exception as exc:  # noqa: BLE001 - e.g. the peer reset before the setup
            logger.info("event=api-connection-setup-failed transport=%s error=%s", transport, exc)
            conn.close()
            return
        except BaseException:
            conn.close()
            raise
        await self._connection(reader, asyncio.StreamWriter(stream, protocol, reader, loop), transport, peer)

    async def _shutdown(self, grace: float) -> None:
        """Stop accepting; close idle connections; wait for the others up to ``grace``, then
        cut them."""
        loop = asyncio.get_running_loop()
        self._closing = True
        for sock in self._listening:
            loop.remove_reader(sock.fileno())
            sock.close()  # connection attempts are refused from now on
        deadline = loop.time() + grace
        while self._tasks:
            for conn in list(self._connections):
                if conn.idle:
                    conn.writer.close()
            if loop.time() >= deadline:
                for conn in list(self._connections):
                    conn.writer.transport.abort()
                for task in self._tasks:
                    task.cancel()
                await asyncio.wait(set(self._tasks), timeout=1.0)
                break
            await asyncio.wait(set(self._tasks), timeout=0.05)

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

    def _refusal(self, peer: PeerIdentity) -> str | None:
        """Why a new connection is refused (503), or None when it is admitted -- and then
        counted against its caller's cap until :meth:`_connection` releases it."""
        if self._closing:
            return "the node manager is stopping; retry later"
        if len(self._connections) >= self._max_connections:
            logger.warning("event=api-refused reason=connection-limit limit=%d", self._max_connections)
            return "too many connections; retry later"
        if not self._limits.admit(peer.uid):
            logger.warning(
                "event=api-refused reason=caller-connection-limit uid=%s limit=%d",
                peer.uid, self._limits.max_connections,
            )
            return "too many connections from this caller; retry later"
        return None

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str, peer: PeerIdentity
    ) -> None:
        refusal = self._refusal(peer)
        if refusal is not None:
            writer.write(error_response(HttpError(503, refusal)))
            writer.close()
            return
        conn = _Connection(writer)
        self._connections.add(conn)
        try:
            await self._serve_requests(reader, writer, peer, conn)
        except HttpError as error:
            logger.info("event=api-http-error status=%d reason=%s", error.status, error.message)
            writer.write(error_response(error))
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away or was too slow: nothing to answer
        except Exception:  # one connection's bug must not stop the server
            logger.exception("event=api-connection-error transport=%s", transport)
        finally:
            self._connections.discard(conn)
            self._limits.release(peer.uid)
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()  # the client is not reading: do not keep its data
            else:
                writer.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: PeerIdentity, conn: _Connection
    ) -> None:
        timeout = self._read_timeout
        calls = self._calls
        assert calls is not None
        slots = self._limits.call_slots(peer.uid)
        while not self._closing:
            conn.idle = True
            try:
                async with asyncio.timeout(timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # closed between requests (or mid-head): nothing to answer
            except asyncio.LimitOverrunError as exc:
                raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes") from exc
            conn.idle = False
            request = parse_head(head, self._max_request_bytes)
            if request.expect_continue:
                writer.write(_CONTINUE)
            async with asyncio.timeout(timeout):
                body = await reader.readexactly(request.content_length)
            if slots is None:
                payload = await calls.answer(body, peer)
            else:
                async with slots:  # over the caller's cap: wait here, holding no thread
                    payload = await calls.answer(body, peer)
            keep_alive = request.keep_alive and not self._closing
            writer.write(
                response_head(200, len(payload), content_type=b"text/xml", keep_alive=keep_alive, http11=request.http11)
                + payload
            )
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeout):
                    await writer.drain()
            if not keep_alive:
                return

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

