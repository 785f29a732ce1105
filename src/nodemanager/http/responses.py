"""Reading one HTTP/1.x response, without I/O: bytes in, a complete response out.

Three readers take responses from three kinds of transport -- the blocking client (a socket with
timeouts and a deadline), the asyncio client (a stream in a loop) and ``forward_api_calls`` (the
daemon's Unix socket, in a process started once per SSH call). The framing rules -- interim 1xx
answers, no body after HEAD or a 204/304, Content-Length, chunked or close-delimited bodies, the
head and body caps -- live once, here, and each reader only moves bytes (the idea of h11, the
parser under httpx). Stdlib-only and cheap to import, like :mod:`.framing`.
"""

from __future__ import annotations

from .framing import MAX_RESPONSE_HEAD_BYTES, BodyTooLarge, ChunkedDecoder, ProtocolError, ResponseHead, \
    parse_response_head

__all__ = ["ResponseCutShort", "ResponseReader"]


class ResponseCutShort(ProtocolError):
    """The connection ended before the response was complete. ``answered`` tells whether any
    byte of it had arrived: a kept-alive connection the server closed while idle answers
    nothing, and only then may a client send its request again on a new one."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered


class ResponseReader:
    """One response, fed as it arrives: :meth:`feed` the bytes read, :meth:`end_of_stream` when
    the peer closed; :attr:`done` turns True when the response is complete, and then
    :attr:`head`, :attr:`body` and :attr:`unused` (bytes after it) are final.

    Raises :class:`ProtocolError` for a malformed head or body framing, :class:`BodyTooLarge`
    for a body over ``max_body`` (an announced length is refused before any of it is awaited),
    and :class:`ResponseCutShort` from :meth:`end_of_stream` when the response is incomplete.
    ``head_only``: the request was a HEAD, so no body follows whatever the head announces.
    """

    def __init__(self, *, max_body: int, head_only: bool = False, max_head: int = MAX_RESPONSE_HEAD_BYTES) -> None:
        self.max_body = max_body
        self.head: ResponseHead | None = None
        self.done = False
        self.unused = b""
        #: Whether any byte of the response arrived (see :class:`ResponseCutShort`).
        self.received = False
        self._head_only = head_only
        self._max_head = max_head
        self._buffer = b""
        self._decoder: ChunkedDecoder | None = None
        self._length: int | None = None
        self._parts: list[bytes] = []
        self._total = 0

    @property
    def body(self) -> bytes:
        return b"".join(self._parts)

    def feed(self, data: bytes) -> None:
        if self.done:
            self.unused += data
            return
        self.received = self.received or bool(data)
        if self.head is None:
            self._buffer += data
            self._read_heads()
        else:
            self._feed_body(data)

    def end_of_stream(self) -> None:
        """The peer closed: completes a close-delimited body, else the response is cut short."""
        if self.done:
            return
        if self.head is None:
            raise ResponseCutShort(
                "the server closed the connection mid-head" if self._buffer
                else "the server closed the connection before answering", answered=self.received)
        if self._decoder is not None:
            raise ResponseCutShort("the response was cut short (chunked body incomplete)", answered=True)
        if self._length is not None:
            raise ResponseCutShort(f"the response was cut short ({self._total} of {self._length} bytes)",
                                   answered=True)
        self.done = True

    def _read_heads(self) -> None:
        while self.head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > self._max_head:
                    raise ProtocolError(f"response head over {self._max_head} bytes")
                return
            head = parse_response_head(self._buffer[: end + 4])
            rest, self._buffer = self._buffer[end + 4:], b""
            if 100 <= head.status < 200:  # an interim answer (100 Continue): the real one follows
                self._buffer = rest
                continue
            self.head = head
            self._start_body(head, rest)

    def _start_body(self, head: ResponseHead, rest: bytes) -> None:
        if self._head_only or head.status in (204, 304):
            self.done, self.unused = True, rest
            return
        if head.chunked:
            self._decoder = ChunkedDecoder(self.max_body)
        elif head.content_length is not None:
            if head.content_length > self.max_body:
                raise BodyTooLarge(f"the body is {head.content_length} bytes, over the {self.max_body}-byte cap")
            self._length = head.content_length
        self._feed_body(rest)

    def _feed_body(self, data: bytes) -> None:
        if self._decoder is not None:
            self._parts.append(self._decoder.feed(data))
            if self._decoder.done:
                self.done, self.unused = True, self._decoder.unused
        elif self._length is not None:
            need = self._length - self._total
            piece = data[:need]
            self._parts.append(piece)
            self._total += len(piece)
            if self._total == self._length:
                self.done, self.unused = True, data[need:]
        else:
            self._parts.append(data)
            self._total += len(data)
            if self._total > self.max_body:
                raise BodyTooLarge(f"the body is over the {self.max_body}-byte cap")
