"""The one asyncio HTTP/1.1 server core: the node API, the metrics endpoint and the bundled
authority each give it a handler and their listening sockets.

Rules (every server of the project gets them; framing rules in :mod:`.framing`):

- **accepting by hand** (a reader callback on each listening socket) rather than
  ``asyncio.start_server`` or a ``sock_accept`` task: every accepted socket is handed over
  synchronously, so stopping never strands one (3.11's ``Server`` drops, unclosed, a connection
  accepted just before ``Server.close()``; cancelling ``sock_accept`` can lose one it just
  accepted). On EMFILE accepting pauses for 0.1 s instead of spinning.
- **identity in the accept callback**: ``identify(sock, label)`` runs on the just-accepted
  socket, before anything is read, while an honest peer is certainly connected; None refuses it
  (closed at once, nothing written). The peer it returns is passed to every request of the
  connection.
- **admission**: one connection beyond ``max_connections`` (or one ``admit`` refuses, or any
  while stopping) is answered 503 and closed at once, not queued, so an overload is visible to
  the client instead of a silent stall. Every admitted connection is released exactly once
  (``release``).
- **timeouts**: a request head and then its body must each arrive within ``read_timeout``, and a
  kept-alive connection may stay idle that long; a silent or trickling client is closed (nothing
  answered) and never holds up anyone else. The handler itself has NO timeout: it may hold a
  request for minutes (a blocking query). A response the client does not read within
  ``read_timeout`` gets the connection aborted.
- **framing errors** are answered with their status (431, 413 without reading the body, 411,
  405 with ``Allow``, 415, 505, 400) and the connection closed; a handler raising
  :class:`~.framing.HttpError` likewise; any other handler exception is logged and answered 500.
- **keep-alive** for HTTP/1.1 unless ``Connection: close``, for HTTP/1.0 with ``Connection:
  keep-alive``; ``Expect: 100-continue`` is honoured; pipelined requests are answered in order
  (reading pauses while more than a head's worth waits behind a request being handled).
- **a client that disconnects** while its request is being handled has the handler's task
  cancelled (a held blocking query is given up at once). A half-close (EOF right after the
  request) counts as leaving, as in uvicorn: over TCP it cannot be told from a close.
- **graceful stop**: stop accepting (listeners closed: new attempts are refused), close idle
  connections, let requests being handled finish for up to ``grace`` seconds, then abort the
  rest and cancel their handlers.

Each connection is a :class:`~.connection.Connection` (an ``asyncio.Protocol``). Why a protocol
rather than streams: no task, no ``StreamReader`` and no timeout
context manager per request -- a request arriving in one segment is parsed straight from
``data_received`` and a handler that returns a plain future (the API's dispatch pool) needs no
task either. Measured in ``bench/api_bench.py`` (``api_server_cpu_us_per_call``). Read timeouts
are one deadline per connection checked by at most one timer, not a timer per read. One file
descriptor and no thread per connection: 20,000 open connections cost memory only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from .connection import HEAD_STATE, Connection
from .framing import Request, Response

__all__ = ["Handler", "HttpServer"]

logger = logging.getLogger(__name__)

#: ``handler(request, body, peer) -> response``. A coroutine function, or a plain function
#: returning an awaitable (a future needs no task: the cheapest path).
Handler = Callable[[Request, bytes, Any], Awaitable[Response]]

_ACCEPTS_PER_WAKEUP = 64


class HttpServer:
    """Serves ``handler`` on the listeners given to :meth:`add_listener` (see the module doc).

    Two ways to run it: :meth:`start` / :meth:`stop` from a synchronous program (its own event
    loop in one daemon thread), or :meth:`serve` / :meth:`shutdown` inside a running loop.
    Everything else happens in the loop's thread."""

    def __init__(
        self,
        handler: Handler,
        *,
        methods: Collection[str] = ("POST",),
        max_request_bytes: int,
        read_timeout: float,
        max_connections: int,
        identify: Callable[[socket.socket, str], Any | None] | None = None,
        admit: Callable[[Any], str | None] | None = None,
        release: Callable[[Any], None] | None = None,
        name: str = "http",
    ) -> None:
        if max_request_bytes < 0 or read_timeout <= 0 or max_connections < 1 or not methods:
            raise ValueError("HTTP server limits must be positive")
        self.handler = handler
        self.methods = tuple(methods)
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.name = name
        self._identify = identify
        self._admit = admit
        self._release = release
        self._listeners: list[tuple[socket.socket, str]] = []
        self._accepting: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Setup tasks (connect_accepted_socket) -> the socket they may not have taken over yet.
        self._setups: dict[asyncio.Task[Any], socket.socket] = {}
        self._admitted: set[Connection] = set()
        self._every: set[Connection] = set()  # admitted, refused-and-closing too
        self.closing = False

    # --- public surface -------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop serving the connections (None before :meth:`start` / :meth:`serve`)."""
        return self._loop

    @property
    def open_connections(self) -> int:
        """Admitted connections currently open (loop thread)."""
        return len(self._admitted)

    def add_listener(self, sock: socket.socket, label: str) -> None:
        """Serve a bound, listening socket; ``label`` is passed to ``identify`` (default peer).
        Before :meth:`start` / :meth:`serve`; the server closes it when stopping."""
        if self._loop is not None:
            raise RuntimeError("add_listener() after the server started")
        sock.setblocking(False)
        self._listeners.append((sock, label))

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Serve from a new daemon thread running ``loop`` (a new default loop when None).
        Returns once accepting; raises what setting up raised (the loop is then closed)."""
        if self._thread is not None or self._loop is not None:
            raise RuntimeError("HttpServer.start() called twice")
        loop = asyncio.new_event_loop() if loop is None else loop
        outcome: list[BaseException | None] = []
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(loop, started, outcome), name=f"nm-{self.name}-loop", daemon=True
        )
        self._thread.start()
        started.wait()
        if outcome and outcome[0] is not None:
            self._thread.join()
            raise outcome[0]

    def stop(self, grace: float = 5.0) -> None:
        """Counterpart of :meth:`start`: :meth:`shutdown`, then end the thread. Idempotent;
        never raises (a failure while stopping is logged)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            self._close_listeners()
            return
        future = asyncio.run_coroutine_threadsafe(self.shutdown(grace), loop)
        try:
            future.result(grace + 5.0)
        except Exception:  # stopping must not fail half-way
            logger.exception("event=%s-stop-error", self.name)
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            pass
        thread.join(5.0)
        self._close_listeners()

    async def serve(self) -> None:
        """Start accepting in the running loop; returns at once (the loop does the rest)."""
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("HttpServer already serves another loop")
        self._loop = loop
        for sock, label in self._listeners:
            loop.add_reader(sock.fileno(), self._accept_ready, sock, label)
            self._accepting.append(sock)

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting, close idle connections, let handled requests finish for up to
        ``grace`` seconds, then abort what is left. In the serving loop."""
        loop = asyncio.get_running_loop()
        self.closing = True
        self._stop_accepting()
        deadline = loop.time() + grace
        while self._every or self._setups:
            for connection in list(self._every):
                if connection.state == HEAD_STATE:
                    connection.close()
            if loop.time() >= deadline:
                for connection in list(self._every):
                    connection.abort()
                for task in list(self._setups):
                    task.cancel()
                if self._setups:
                    await asyncio.wait(set(self._setups), timeout=1.0)
                await asyncio.sleep(0)  # let connection_lost run
                break
            await asyncio.sleep(0.02)

    # --- loop thread ----------------------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, started: threading.Event,
             outcome: list[BaseException | None]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
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

    def _stop_accepting(self) -> None:
        loop = self._loop
        for sock in self._accepting:
            if loop is not None and sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
        self._accepting.clear()
        self._close_listeners()

    def _close_listeners(self) -> None:
        for sock, _label in self._listeners:
            sock.close()  # connection attempts are refused from now on

    def _accept_ready(self, listener: socket.socket, label: str) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: pause accepting instead of spinning
                logger.warning("event=%s-accept-error listener=%s error=%s", self.name, label, exc)
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._resume_accepting, listener, label)
                return
            conn.setblocking(False)
            try:
                peer = label if self._identify is None else self._identify(conn, label)
            except Exception:  # noqa: BLE001 - a buggy identify refuses, never crashes the loop
                logger.exception("event=%s-identify-error listener=%s", self.name, label)
                peer = None
            if peer is None:
                conn.close()
                continue
            task = loop.create_task(self._set_up(conn, peer))
            self._setups[task] = conn
            task.add_done_callback(self._set_up_done)

    def _resume_accepting(self, listener: socket.socket, label: str) -> None:
        if not self.closing and self._loop is not None and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept_ready, listener, label)

    async def _set_up(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: Connection(self, peer), sock=conn)
        except Exception as exc:  # noqa: BLE001 - e.g. the peer reset before the setup
            logger.info("event=%s-connection-setup-failed error=%s", self.name, exc)
            conn.close()

    def _set_up_done(self, task: asyncio.Task[None]) -> None:
        conn = self._setups.pop(task, None)
        if conn is not None and task.cancelled():
            conn.close()  # cancelled before (or while) the transport took the socket: idempotent

    def _refusal(self, peer: Any) -> str | None:
        """Why a new connection is refused (503), or None when it is admitted."""
        if self.closing:
            return "the server is stopping; retry later"
        if len(self._admitted) >= self.max_connections:
            logger.warning("event=%s-refused reason=connection-limit limit=%d", self.name, self.max_connections)
            return "too many connections; retry later"
        if self._admit is not None:
            return self._admit(peer)
        return None

    def connection_opened(self, connection: Connection) -> str | None:
        """Count a new connection (from its ``connection_made``): why it is refused (answered
        503, then closed), or None when it is admitted."""
        self._every.add(connection)
        refusal = self._refusal(connection.peer)
        if refusal is None:
            self._admitted.add(connection)
        return refusal

    def connection_closed(self, connection: Connection, admitted: bool) -> None:
        """Forget a connection (from its ``connection_lost``); release it when it was admitted."""
        self._every.discard(connection)
        if admitted:
            self._released(connection)

    def _released(self, connection: Connection) -> None:
        self._admitted.discard(connection)
        if self._release is not None:
            try:
                self._release(connection.peer)
            except Exception:  # noqa: BLE001 - must not break connection_lost
                logger.exception("event=%s-release-error", self.name)
