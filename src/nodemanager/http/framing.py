"""HTTP/1.x framing, both directions, as pure functions: the project's one HTTP parser.

Used by every HTTP speaker of the project -- the node API's server and the metrics endpoint
(through :mod:`.server`), the bundled authority, the node's authority client (:mod:`.client`),
the fleet simulator (:mod:`.aclient`) and ``forward_api_calls`` -- so a framing rule is written,
and tested, once. Nothing here does I/O; the callers read and write.

Why our own rather than ``h11``: the subset needed is small (no pipelining of requests with
bodies beyond what is read in order, no upgrades, no request trailers), the server's hot path
wants byte-level parsing with no per-event objects, and ``forward_api_calls`` imports this module
once per SSH call. For that last reason this module imports only ``sys``-level builtins: no
``dataclasses`` (23 ms with its ``inspect`` import on the reference machine), no ``re``, no
``typing``, no ``email``. The value classes below are therefore written by hand as frozen,
slotted classes (what ``@dataclass(frozen=True, slots=True)`` would generate).

Server side, :func:`parse_request_head` raises :class:`HttpError` (the status to answer, after
which the connection is closed): 400 malformed, 405 a method not served (with ``Allow``), 411 a
POST without Content-Length or with a Transfer-Encoding, 400 a GET/HEAD carrying a body, 413 a
body over the cap (never read), 415 a Content-Encoding, 431 a head over :data:`MAX_HEAD_BYTES`,
505 a version other than HTTP/1.0 and 1.1. Client side, :func:`parse_response_head` and
:class:`ChunkedDecoder` raise :class:`ProtocolError`.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False  # typing costs ~9 ms to import: only type checkers read this branch
if TYPE_CHECKING:
    from collections.abc import Collection, Mapping, Sequence

__all__ = [
    "MAX_HEAD_BYTES", "BodyTooLarge", "ChunkedDecoder", "HttpError", "ProtocolError", "Request", "Response", "ResponseHead",
    "encode_request", "encode_response", "error_response", "parse_request_head", "parse_response_head",
]

#: Largest request line + headers accepted by a server (431 beyond), and the unit of the
#: client's cap on a response head (:data:`MAX_RESPONSE_HEAD_BYTES`).
MAX_HEAD_BYTES = 16 * 1024
#: Largest response head a client reads: a server is trusted a little more than a client.
MAX_RESPONSE_HEAD_BYTES = 4 * MAX_HEAD_BYTES
#: Longest chunk-size line (size, extensions) a client accepts in a chunked body.
MAX_CHUNK_LINE = 1024

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 304: "Not Modified", 400: "Bad Request",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 "token" characters (method and header names).
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_HEX_CHARS = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


def _is_token(data: bytes) -> bool:
    return bool(data) and _TOKEN_CHARS.issuperset(data)


def _is_digits(data: bytes, longest: int = 18) -> bool:
    return 0 < len(data) <= longest and _DIGITS.issuperset(data)


class HttpError(Exception):
    """A request the server answers with ``status`` (and ``headers``), then closes the connection."""

    def __init__(self, status: int, message: str, *, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class ProtocolError(Exception):
    """A response (or a chunked body) a client cannot use: malformed or over a size cap."""


class BodyTooLarge(ProtocolError):
    """A response body over the caller's cap (announced or streamed)."""


class _Frozen:
    """Base of the hand-written value classes: frozen, slotted, compared and shown by fields."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(tuple(v if not isinstance(v, dict) else tuple(v.items()) for v in self._fields()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({inner})"


_set = object.__setattr__


class Request(_Frozen):
    """A checked request head: what a server needs to read the body and answer."""

    __slots__ = ("method", "target", "headers", "content_length", "keep_alive", "http11", "expect_continue")
    method: str
    target: str
    headers: Mapping[str, str]
    content_length: int
    keep_alive: bool
    http11: bool
    expect_continue: bool

    def __init__(self, method: str, target: str, headers: Mapping[str, str], content_length: int,
                 keep_alive: bool, http11: bool, expect_continue: bool) -> None:
        _set(self, "method", method)
        _set(self, "target", target)
        _set(self, "headers", headers)
        _set(self, "content_length", content_length)
        _set(self, "keep_alive", keep_alive)
        _set(self, "http11", http11)
        _set(self, "expect_continue", expect_continue)

    @property
    def path(self) -> str:
        """The target without its query (``/slices.xml`` of ``/slices.xml?node_id=7``)."""
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query's parameters, percent-decoded, the first value of each name."""
        query = self.target.partition("?")[2]
        if not query:
            return {}
        from urllib.parse import parse_qsl  # only the few servers reading a query pay for it

        params: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            params.setdefault(name, value)
        return params


class Response(_Frozen):
    """What a server handler answers; the server frames it (:func:`encode_response`)."""

    __slots__ = ("status", "body", "content_type", "headers")
    status: int
    body: bytes
    content_type: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    def __init__(self, status: int = 200, body: bytes = b"", content_type: bytes = b"text/xml",
                 headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        _set(self, "status", status)
        _set(self, "body", body)
        _set(self, "content_type", content_type)
        _set(self, "headers", headers)


class ResponseHead(_Frozen):
    """A parsed response head (client side). ``content_length`` is None when the body is
    chunked or delimited by the close."""

    __slots__ = ("status", "reason", "headers", "content_length", "chunked", "keep_alive")
    status: int
    reason: str
    headers: Mapping[str, str]
    content_length: int | None
    chunked: bool
    keep_alive: bool

    def __init__(self, status: int, reason: str, headers: Mapping[str, str], content_length: int | None,
                 chunked: bool, keep_alive: bool) -> None:
        _set(self, "status", status)
        _set(self, "reason", reason)
        _set(self, "headers", headers)
        _set(self, "content_length", content_length)
        _set(self, "chunked", chunked)
        _set(self, "keep_alive", keep_alive)


# --------------------------------------------------------------------------- server side

def _split_head(head: bytes, error: type[Exception], status: int | None) -> tuple[bytes, dict[str, str]]:
    """First line and headers (lower-case names, repeated ones joined with ", ") of a head that
    may or may not end with its blank line."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            raise error(status, "malformed header line") if status else error("malformed header line")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous}, {text}"
    return lines[0], headers


def _tokens(value: str | None) -> set[str]:
    return {token.strip().lower() for token in value.split(",")} if value else set()


def parse_request_head(head: bytes, *, max_body: int, methods: Collection[str] = ("POST",)) -> Request:
    """Check a request line and headers (``head``, normally ending with the blank line).

    Raises :class:`HttpError` for anything a server must refuse (see the module doc). Pure;
    any thread."""
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
    line, headers = _split_head(head, HttpError, 400)
    parts = line.split(b" ")
    if len(parts) != 3 or not _is_token(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    raw_method, raw_target, version = parts
    if len(version) != 8 or not version.startswith(b"HTTP/") or version[6:7] != b"." \
            or not version[5:6].isdigit() or not version[7:8].isdigit():
        raise HttpError(400, "malformed request line")
    if version[5:6] != b"1" or version[7:8] not in (b"0", b"1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    method = raw_method.decode("ascii")
    if method not in methods:
        allow = ", ".join(methods)
        raise HttpError(405, f"only {allow} requests are served here", headers=((b"Allow", allow.encode("ascii")),))
    try:
        target = raw_target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "malformed request target") from None
    length_text = headers.get("content-length")
    bodyless = method in ("GET", "HEAD")
    if "transfer-encoding" in headers:
        if bodyless:
            raise HttpError(400, f"a {method} request carries no body")
        raise HttpError(411, "Transfer-Encoding is not supported; send a Content-Length")
    if length_text is None:
        if not bodyless:
            raise HttpError(411, "a Content-Length is required")
        content_length = 0
    else:
        raw_length = length_text.encode("latin-1")
        if not _is_digits(raw_length):
            raise HttpError(400, "malformed Content-Length")
        content_length = int(raw_length)
        if bodyless and content_length:
            raise HttpError(400, f"a {method} request carries no body")
        if content_length > max_body:
            raise HttpError(413, f"request body over {max_body} bytes")
    if _tokens(headers.get("content-encoding")) - {"identity", ""}:
        raise HttpError(415, "Content-Encoding is not supported")
    http11 = version[7:8] == b"1"
    connection = _tokens(headers.get("connection"))
    keep_alive = "close" not in connection if http11 else "keep-alive" in connection
    expect = http11 and headers.get("expect", "").lower() == "100-continue"
    return Request(method, target, headers, content_length, keep_alive, http11, expect)


_date_cache: list[object] = [0, b""]
_WEEKDAYS = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def http_date(now: float | None = None) -> bytes:
    """An IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``); cached per second when ``now`` is None."""
    seconds = int(time.time() if now is None else now)
    if now is None and _date_cache[0] == seconds:
        return _date_cache[1]  # type: ignore[return-value]
    t = time.gmtime(seconds)
    text = b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec,
    )
    if now is None:
        _date_cache[0], _date_cache[1] = seconds, text
    return text


# Status line + fixed headers, per (status, content type, connection header), built once.
_heads: dict[tuple[int, bytes, bytes], bytes] = {}


def _fixed_head(status: int, content_type: bytes, connection: bytes) -> bytes:
    key = (status, content_type, connection)
    fixed = _heads.get(key)
    if fixed is None:
        if b"\r" in content_type or b"\n" in content_type:
            raise ValueError("a header value may not contain a line break")
        reason = REASONS.get(status, "Error" if status >= 400 else "OK").encode("ascii")
        fixed = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s" % (
            status, reason, content_type, b"Connection: %s\r\n" % connection if connection else b"",
        )
        if len(_heads) < 256:
            _heads[key] = fixed
    return fixed


def encode_response(response: Response, *, keep_alive: bool, http11: bool, head_only: bool = False) -> bytes:
    """The bytes of ``response``: status line, Date, Content-Type, Content-Length, Connection
    when it differs from the version's default, the extra headers, then the body (not for
    ``head_only``, the answer to a HEAD)."""
    connection = b"close" if not keep_alive else b"" if http11 else b"keep-alive"
    extra = b""
    if response.headers:
        lines = []
        for name, value in response.headers:
            if b"\r" in name or b"\n" in name or b"\r" in value or b"\n" in value or not _is_token(name):
                raise ValueError(f"invalid response header {name[:40]!r}")
            lines.append(b"%s: %s\r\n" % (name, value))
        extra = b"".join(lines)
    body = response.body
    return b"%sDate: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        _fixed_head(response.status, response.content_type, connection), http_date(), len(body), extra,
        b"" if head_only else body,
    )


def error_response(error: HttpError) -> bytes:
    """A complete plain-text response for ``error``, announcing ``Connection: close``."""
    body = error.message.encode("utf-8", "replace") + b"\n"
    response = Response(error.status, body, b"text/plain; charset=utf-8", error.headers)
    return encode_response(response, keep_alive=False, http11=True)


# --------------------------------------------------------------------------- client side

def encode_request(method: str, target: str, *, host: str, body: bytes = b"", content_type: str = "text/xml",
                   headers: Sequence[tuple[str, str]] = (), keep_alive: bool = True) -> bytes:
    """The bytes of an HTTP/1.1 request. A body gets a Content-Length and ``content_type``; a
    bodyless GET/HEAD gets neither. Raises ValueError for a line break in any field."""
    fields = [(b"Host", host)]
    if body or method not in ("GET", "HEAD"):
        fields.append((b"Content-Type", content_type))
        fields.append((b"Content-Length", str(len(body))))
    if not keep_alive:
        fields.append((b"Connection", "close"))
    lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target.encode("ascii"))]
    if not _is_token(method.encode("ascii")) or not target or " " in target:
        raise ValueError(f"invalid request line {method[:20]!r} {target[:40]!r}")
    for name, value in (*fields, *((n.encode("ascii"), v) for n, v in headers)):
        raw = value.encode("latin-1")
        if not _is_token(name) or b"\r" in raw or b"\n" in raw:
            raise ValueError(f"invalid request header {name[:40]!r}")
        lines.append(b"%s: %s\r\n" % (name, raw))
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse a status line and headers (``head`` with or without its blank line).

    Raises :class:`ProtocolError` for a malformed line, a bad Content-Length (several
    different ones included) or a transfer coding other than chunked."""
    if len(head) > MAX_RESPONSE_HEAD_BYTES:
        raise ProtocolError(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
    try:
        line, headers = _split_head(head, ProtocolError, None)
    except UnicodeDecodeError:
        raise ProtocolError("malformed header line") from None
    parts = line.split(b" ", 2)
    version = parts[0]
    if len(parts) < 2 or version not in (b"HTTP/1.0", b"HTTP/1.1") or not _is_digits(parts[1], 3) \
            or len(parts[1]) != 3:
        raise ProtocolError(f"malformed HTTP status line {line[:80]!r}")
    status = int(parts[1])
    reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
    codings = [token for token in (t.strip().lower() for t in headers.get("transfer-encoding", "").split(",")) if token]
    chunked = False
    if codings:
        if codings != ["chunked"]:
            raise ProtocolError(f"unsupported Transfer-Encoding {headers['transfer-encoding'][:40]!r}")
        chunked = True
    content_length: int | None = None
    length_text = headers.get("content-length")
    if length_text is not None and not chunked:
        values = {value.strip() for value in length_text.split(",")}
        raw = values.pop().encode("latin-1") if len(values) == 1 else b""
        if not _is_digits(raw):
            raise ProtocolError(f"malformed Content-Length {length_text[:40]!r}")
        content_length = int(raw)
    connection = _tokens(headers.get("connection"))
    keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
    if content_length is None and not chunked and status not in (204, 304) and not 100 <= status < 200:
        keep_alive = False  # the body runs until the close
    return ResponseHead(status, reason, headers, content_length, chunked, keep_alive)


_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Incremental decoder of a chunked body, refusing more than ``max_body`` decoded bytes.

    :meth:`feed` takes whatever arrived and returns the body bytes decoded from it; :attr:`done`
    turns True after the last chunk and the trailer section, and :attr:`unused` then holds the
    bytes that followed (the next response on a kept-alive connection). Raises
    :class:`ProtocolError` for a malformed framing or a body over the cap (checked on each
    chunk's announced size, before its data is awaited)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.total = 0
        self.unused = b""
        self._buffer = b""
        self._state = _SIZE
        self._remaining = 0
        self._trailer_bytes = 0

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        if self._state == _DONE:
            self.unused += data
            return b""
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        while buffer:
            state = self._state
            if state == _DATA:
                piece = buffer[: self._remaining]
                out.append(piece)
                self._remaining -= len(piece)
                buffer = buffer[len(piece):]
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _DATA_END:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("malformed chunked body: chunk not followed by CRLF")
                buffer = buffer[2:]
                self._state = _SIZE
            elif state == _SIZE:
                end = buffer.find(b"\r\n", 0, MAX_CHUNK_LINE + 2)
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise ProtocolError("malformed chunked body: chunk-size line too long")
                    break
                size_text = buffer[:end].partition(b";")[0].strip(b" \t")
                buffer = buffer[end + 2:]
                if not size_text or len(size_text) > 16 or not _HEX_CHARS.issuperset(size_text):
                    raise ProtocolError(f"malformed chunked body: chunk size {size_text[:20]!r}")
                size = int(size_text, 16)
                if self.total + size > self.max_body:
                    raise BodyTooLarge(f"body over {self.max_body} bytes")
                self.total += size
                if size:
                    self._state, self._remaining = _DATA, size
                else:
                    self._state = _TRAILER
            elif state == _TRAILER:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if self._trailer_bytes + len(buffer) > MAX_HEAD_BYTES:
                        raise ProtocolError("malformed chunked body: trailer section too long")
                    break
                self._trailer_bytes += end + 2
                if self._trailer_bytes > MAX_HEAD_BYTES:
                    raise ProtocolError("malformed chunked body: trailer section too long")
                line, buffer = buffer[:end], buffer[end + 2:]
                if not line:
                    self._state = _DONE
                    self.unused = buffer
                    buffer = b""
            else:  # pragma: no cover - _DONE is handled above
                break
        self._buffer = buffer
        return b"".join(out)
