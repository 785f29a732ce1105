"""One server-side HTTP/1.1 connection of :class:`~.server.HttpServer`: a small state machine
driven by the transport's callbacks (the rules are in :mod:`.server`'s module doc).

States: waiting for a head (``_HEAD``, the only "idle" one a stop closes at once), reading a
body, handling (the handler runs, no timeout), draining (the answer waits in the transport's
buffer for a slow reader), closing, closed. A request arriving in one segment is parsed straight
from ``data_received``; read timeouts are one deadline per connection checked by at most one
timer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .framing import CONTINUE, MAX_HEAD_BYTES, HttpError, Request, Response, encode_response, error_response, \
    parse_request_head

if TYPE_CHECKING:
    from .server import HttpServer

__all__ = ["HEAD_STATE", "Connection"]

logger = logging.getLogger("nodemanager.http.server")

_HEAD, _BODY, _HANDLING, _DRAINING, _CLOSING, _CLOSED = range(6)
#: The state of a connection waiting for a request head (idle, or mid-head).
HEAD_STATE = _HEAD


class Connection(asyncio.Protocol):
    """One client connection: a small state machine driven by the transport's callbacks."""

    __slots__ = (
        "server", "peer", "transport", "state", "buffer", "request", "deadline", "timer", "task",
        "admitted", "eof", "writing_paused", "reading_paused",
    )

    def __init__(self, server: HttpServer, peer: Any) -> None:
        self.server = server
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.state = _HEAD
        self.buffer: bytes | bytearray = b""
        self.request: Request | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Future[Response] | None = None
        self.admitted = False
        self.eof = False
        self.writing_paused = False
        self.reading_paused = False

    # --- transport callbacks ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        refusal = self.server.connection_opened(self)
        if refusal is not None:
            transport.write(error_response(HttpError(503, refusal)))
            self._close_after_write()
            return
        self.admitted = True
        self._await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.state = _CLOSED
        self.deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()  # the client is gone: give up its request (a held wait included)
        admitted, self.admitted = self.admitted, False
        self.server.connection_closed(self, admitted)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        if buffer:
            if type(buffer) is bytes:
                buffer = bytearray(buffer)
            buffer += data
        else:
            buffer = data
        self.buffer = buffer
        state = self.state
        if state == _HEAD or state == _BODY:
            self._process()
        elif state >= _CLOSING:
            self.buffer = b""  # nothing more is read from a connection being closed
        elif len(buffer) > MAX_HEAD_BYTES and not self.reading_paused:
            self.reading_paused = True  # pipelined data behind a request being handled
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # Between requests or mid-request: nothing to answer. While a request is handled: the
        # client is gone (as uvicorn decides; a full close and a half-close look the same
        # here), so connection_lost cancels its handler. Returning False closes the transport.
        self.eof = True
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.state == _DRAINING:
            self._await_head()

    # --- the request cycle --------------------------------------------------------------------
    def _arm(self) -> None:
        """Start the read/write clock: ``read_timeout`` from now."""
        server = self.server
        loop = server.loop
        assert loop is not None
        self.deadline = deadline = loop.time() + server.read_timeout
        if self.timer is None:
            self.timer = loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.state == _CLOSED:
            return
        loop = self.server.loop
        assert loop is not None
        if loop.time() < deadline:
            self.timer = loop.call_at(deadline, self._check_deadline)
            return
        if self.state in (_HEAD, _BODY):
            self.close()  # silent, trickling or idle client: nothing to answer
        else:
            self.abort()  # the client is not reading its answer: do not keep its data

    def _await_head(self) -> None:
        self.state = _HEAD
        self.request = None
        self._arm()
        if self.reading_paused:
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        if self.buffer:
            self._process()

    def _process(self) -> None:
        server = self.server
        buffer = self.buffer
        try:
            if self.state == _HEAD:
                end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
                if end < 0:
                    if len(buffer) >= MAX_HEAD_BYTES:
                        raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
                    if self.eof:
                        self.close()
                    return
                head = buffer[: end + 4]
                request = parse_request_head(
                    head if type(head) is bytes else bytes(head),
                    max_body=server.max_request_bytes, methods=server.methods,
                )
                buffer = buffer[end + 4:]
                self.request = request
                if request.expect_continue:
                    assert self.transport is not None
                    self.transport.write(CONTINUE)
                if request.content_length:
                    self.state = _BODY
                    self._arm()  # a new read_timeout for the body
            request = self.request
            assert request is not None
            length = request.content_length
            if len(buffer) < length:
                self.buffer = buffer
                if self.eof:
                    self.close()
                return
            if length:
                body = bytes(buffer[:length]) if type(buffer) is not bytes or len(buffer) != length else buffer
                buffer = buffer[length:]
            else:
                body = b""
            self.buffer = buffer if buffer else b""
        except HttpError as error:
            self._refuse(error)
            return
        self._handle(request, body)

    def _handle(self, request: Request, body: bytes) -> None:
        self.state = _HANDLING
        self.deadline = None  # the handler has no time limit
        server = self.server
        try:
            awaitable = server.handler(request, body, self.peer)
            future = awaitable if asyncio.isfuture(awaitable) else asyncio.ensure_future(awaitable, loop=server.loop)
        except Exception as exc:  # noqa: BLE001 - a handler bug answers 500, never kills the loop
            self._handler_failed(exc)
            return
        self.task = future  # type: ignore[assignment]
        future.add_done_callback(self._handled)

    def _handled(self, future: asyncio.Future[Response]) -> None:
        if self.task is not future:
            return  # the connection was lost meanwhile
        self.task = None
        if future.cancelled():
            self.abort()
            return
        error = future.exception()
        if error is not None:
            self._handler_failed(error)
            return
        self._answer(future.result())

    def _handler_failed(self, error: BaseException) -> None:
        if isinstance(error, HttpError):
            self._refuse(error)
            return
        logger.error("event=%s-handler-error error=%r", self.server.name, error, exc_info=error)
        self._refuse(HttpError(500, "internal error"), log=False)

    def _answer(self, response: Response) -> None:
        request = self.request
        transport = self.transport
        assert request is not None and transport is not None
        keep_alive = request.keep_alive and not self.server.closing and not self.eof
        try:
            data = encode_response(response, keep_alive=keep_alive, http11=request.http11,
                                   head_only=request.method == "HEAD")
        except (ValueError, TypeError) as exc:
            self._handler_failed(exc)
            return
        transport.write(data)
        if not keep_alive:
            self._close_after_write()
        elif self.writing_paused:
            self.state = _DRAINING
            self._arm()
        else:
            self._await_head()

    # --- endings ----------------------------------------------------------------------------
    def _refuse(self, error: HttpError, *, log: bool = True) -> None:
        if log:
            logger.info("event=%s-http-error status=%d reason=%s", self.server.name, error.status, error.message)
        if self.transport is not None and self.state != _CLOSED:
            self.transport.write(error_response(error))
        self._close_after_write()

    def _close_after_write(self) -> None:
        """Close once the written data is flushed, or abort if that takes ``read_timeout``."""
        if self.state == _CLOSED:
            return
        self.state = _CLOSING
        self.buffer = b""
        transport = self.transport
        assert transport is not None
        if transport.get_write_buffer_size():
            self._arm()
        transport.close()

    def close(self) -> None:
        """Close without answering (idle, silent or stopping)."""
        if self.transport is not None:
            self._close_after_write()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
