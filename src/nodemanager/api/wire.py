"""The API's bytes on the wire: HTTP/1.x request heads and XML-RPC bodies in, responses out.

Everything here is pure (no I/O) so the framing rules are unit-testable without a socket; the
server (:mod:`.server`) does the reading and writing.

Bodies, and why not ``xmlrpc.client.loads``: the stdlib expat parser expands internal entities (a billion-laughs
body burns 90-150 ms of CPU per request) and silently replaces external entities with "", and the
stdlib ``Unmarshaller`` gladly accepts bogus XML-RPC (unknown elements are ignored, ``<nil/>`` and
``<bigdecimal>`` always decode). Here a request is parsed by defusedxml's expat parser with every
DTD refused (so no entity can be declared at all), feeding a stricter ``Unmarshaller`` that accepts
only the elements of a ``methodCall``, bounds the nesting depth and rejects values the API never
takes. Nothing is monkey-patched: the stdlib's global parser stays as it was.

Contract of :func:`parse_request`: every problem with a body -- not XML, not UTF-8 (nor another
encoding the XML declaration names and expat knows), a DTD or entity, not a ``methodCall``, a bad
value -- raises :class:`InvalidArgument` whose message starts with ``malformed XML-RPC request:``,
which the server answers with Fault 102 on a connection that stays usable. Values decode to
``bool``, ``int``, ``float``, ``str``, ``bytes`` (base64), ``datetime`` (dateTime.iso8601),
``list`` and ``dict`` with ``str`` keys.

The size cap is checked on the head (:func:`parse_head`): a body over ``api.max_request_bytes``
is never read.
"""

from __future__ import annotations

import binascii
import re
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.utils import formatdate
from typing import Any, ClassVar
from xml.parsers import expat

from defusedxml.common import DefusedXmlException
from defusedxml.xmlrpc import DefusedExpatParser

from ..core.errors import InvalidArgument

__all__ = [
    "MAX_DEPTH", "MAX_HEAD_BYTES", "HttpError", "RequestHead", "dump_fault", "dump_response",
    "error_response", "parse_head", "parse_request", "response_head",
]

#: Deepest element nesting accepted. A methodCall with a value nested 10 arrays deep is about 40
#: levels; the cap stops a body made of nothing but ``<array><data><value>`` from building a
#: structure that later recursion (validation, marshalling back) would choke on.
MAX_DEPTH = 100

_MAX_METHOD_NAME = 128
_METHOD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:]*", re.ASCII)

# The elements a methodCall may contain. ``nil``, ``bigdecimal`` and ``fault`` are decoded by the
# stdlib but are never valid in a request to this API.
_ALLOWED_TAGS = frozenset(
    {
        "methodCall", "methodName", "params", "param", "value",
        "i1", "i2", "i4", "i8", "int", "biginteger", "boolean", "string", "double", "float",
        "dateTime.iso8601", "base64", "array", "data", "struct", "member", "name",
    }
)
_SCALARS = (bool, int, float, str, bytes, datetime)

# Everything the parser and the stdlib decoders raise on a bad body. ValueError covers int(),
# float(), base64 (binascii.Error) and datetime errors; TypeError a bad boolean or an unhashable
# struct key; IndexError a struct member without a value.
_PARSE_ERRORS = (
    expat.ExpatError,
    DefusedXmlException,
    xmlrpc.client.ResponseError,
    ValueError,
    TypeError,
    IndexError,
    UnicodeError,
)


class _Malformed(Exception):
    """A structural problem found by :class:`_StrictUnmarshaller` (turned into InvalidArgument)."""


class _StrictUnmarshaller(xmlrpc.client.Unmarshaller):
    """The stdlib unmarshaller, refusing what a methodCall may not contain."""

    def __init__(self) -> None:
        super().__init__(use_builtin_types=True)
        self._depth = 0
        self.root: str | None = None

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        local = tag.rpartition(":")[2]
        if self.root is None:
            self.root = local
            if local != "methodCall":
                raise _Malformed(f"root element is <{local[:40]}>, not <methodCall>")
        if local not in _ALLOWED_TAGS:
            raise _Malformed(f"unexpected element <{local[:40]}>")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _Malformed(f"elements nested deeper than {MAX_DEPTH}")
        super().start(tag, attrs)

    def end(self, tag: str) -> None:
        self._depth -= 1
        super().end(tag)

    def end_base64(self, data: str) -> None:
        # The stdlib decoder silently skips characters outside the alphabet; be strict (line
        # breaks, which encoders insert, are fine).
        self.append(binascii.a2b_base64("".join(data.split()), strict_mode=True))
        self._value = False

    dispatch: ClassVar[dict[str, Callable[..., None]]] = {
        **xmlrpc.client.Unmarshaller.dispatch, "base64": end_base64,
    }


def _check_value(value: Any) -> None:
    """Reject decoded values outside the API's types (iteratively: depth is bounded anyway)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            for key, member in item.items():
                if not isinstance(key, str):
                    raise _Malformed(f"struct member name is {type(key).__name__}, not string")
                pending.append(member)
        elif not isinstance(item, _SCALARS):
            raise _Malformed(f"unsupported value type {type(item).__name__}")


def parse_request(body: bytes) -> tuple[str, tuple[Any, ...]]:
    """``(method name, params)`` of an XML-RPC ``methodCall`` body.

    Raises :class:`InvalidArgument` ("malformed XML-RPC request: <why>") for anything wrong.
    Pure CPU work; safe to call from any thread.
    """
    target = _StrictUnmarshaller()
    parser = DefusedExpatParser(target, forbid_dtd=True)
    try:
        parser.feed(body)
        parser.close()
        params = target.close()
        method = target.getmethodname()
        if target.root is None:
            raise _Malformed("empty body")
        if not isinstance(method, str):
            raise _Malformed("no <methodName>")
        method = method.strip()
        if len(method) > _MAX_METHOD_NAME or not _METHOD_NAME.fullmatch(method):
            raise _Malformed(f"invalid method name {method[:40]!r}")
        _check_value(list(params))
    except (_Malformed, *_PARSE_ERRORS) as exc:
        raise InvalidArgument(f"malformed XML-RPC request: {_why(exc)}") from exc
    return method, params


def _why(exc: BaseException) -> str:
    if isinstance(exc, DefusedXmlException):
        return "DTDs and entities are not allowed"
    if isinstance(exc, xmlrpc.client.ResponseError):
        return "incomplete or unbalanced XML-RPC structure"
    if isinstance(exc, IndexError):
        return "struct member without a value"
    text = str(exc) or type(exc).__name__
    return text[:200]


def dump_response(value: Any) -> bytes:
    """The UTF-8 ``methodResponse`` body carrying ``value`` (which must not contain None).

    Raises TypeError for a value XML-RPC cannot carry (a bug in the method, answered as Fault 1).
    """
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=False, encoding="utf-8").encode(
        "utf-8"
    )


def dump_fault(fault: xmlrpc.client.Fault) -> bytes:
    """The UTF-8 ``methodResponse`` body carrying ``fault``."""
    return xmlrpc.client.dumps(fault, methodresponse=True, allow_none=False, encoding="utf-8").encode("utf-8")


# --------------------------------------------------------------------------- HTTP/1.x framing

#: Largest request line + headers accepted (the server answers 431 beyond it).
MAX_HEAD_BYTES = 16 * 1024

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
    411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
    431: "Request Header Fields Too Large", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")


class HttpError(Exception):
    """A request the server answers with ``status`` and then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestHead:
    """What the server needs from a request's head, already checked for an XML-RPC POST."""

    content_length: int
    keep_alive: bool
    http11: bool
    expect_continue: bool


def parse_head(head: bytes, max_body: int) -> RequestHead:
    """Check the request line and headers (``head`` ends with the blank line) of an XML-RPC POST.

    Raises :class:`HttpError` for anything the server must refuse: 400 malformed, 405 not a POST,
    411 no Content-Length or a Transfer-Encoding, 413 a body over ``max_body`` bytes, 415 a
    Content-Encoding, 505 an HTTP version other than 1.0/1.1. Pure; any thread.
    """
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, _target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise HttpError(400, "malformed request line")
    if match.group(1) != b"1" or match.group(2) not in (b"0", b"1"):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(400, "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    if method != b"POST":
        raise HttpError(405, "POST XML-RPC requests here")
    if b"transfer-encoding" in headers:
        raise HttpError(411, "Transfer-Encoding is not supported; send a Content-Length")
    lengths = set(headers.get(b"content-length", []))
    if not lengths:
        raise HttpError(411, "a Content-Length is required")
    if len(lengths) != 1 or not (length := lengths.pop()).isdigit() or len(length) > 18:
        raise HttpError(400, "malformed Content-Length")
    content_length = int(length)
    if content_length > max_body:
        raise HttpError(413, f"request body over {max_body} bytes")
    encodings = {v.lower() for v in headers.get(b"content-encoding", [])} - {b"identity"}
    if encodings:
        raise HttpError(415, "Content-Encoding is not supported")
    http11 = match.group(2) == b"1"
    tokens = {t.strip().lower() for v in headers.get(b"connection", []) for t in v.split(b",")}
    keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
    expect = http11 and any(v.lower() == b"100-continue" for v in headers.get(b"expect", []))
    return RequestHead(content_length, keep_alive, http11, expect)


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def response_head(status: int, length: int, *, content_type: bytes, keep_alive: bool, http11: bool) -> bytes:
    """The status line and headers of a response with a ``length``-byte body."""
    connection = b"close" if not keep_alive else b"" if http11 else b"keep-alive"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, "Error").encode("ascii")),
            b"Date: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (_date(), content_type, length),
            b"Connection: %s\r\n" % connection if connection else b"",
            b"Allow: POST\r\n" if status == 405 else b"",
            b"\r\n",
        )
    )


def error_response(error: HttpError) -> bytes:
    """A complete plain-text response for ``error``; the connection is closed after it."""
    body = error.message.encode("utf-8", "replace") + b"\n"
    head = response_head(error.status, len(body), content_type=b"text/plain; charset=utf-8", keep_alive=False, http11=True)
    return head + body
