"""Blocking queries, the node's side: build one wait request, interpret its answer (no I/O).

The bundled authority versions each node's document with an *index* (``nm_index`` in a
``GetSlivers`` answer, the ``NM-Index`` header of a ``slices.xml`` answer). A node that holds the
document of index ``I`` asks "answer when my document is no longer ``I``, or after ``wait``
seconds" (authority.md "Blocking queries"):

* XML-RPC: ``GetSliversWait(auth, index, wait)``, BootAuth over ``[index, wait]`` (session auth
  as for ``GetSlivers``). The answer is the full ``GetSlivers`` struct when the document changed,
  else ``{"nm_index": index, "nm_not_modified": True}``;
* ``slices.xml``: ``GET <url>&wait=S`` with ``If-None-Match: "<index>"``; ``304 Not Modified``
  (with ``NM-Index``, no body) when unchanged, ``200`` with the new document and its
  ``NM-Index`` when changed.

This module only turns values into a :class:`WaitRequest` (:func:`wait_call`) and an answer into
:class:`Changed` or :class:`NotModified` (:func:`wait_outcome`), so that the node's blocking
client (``authority.client``) and the fleet simulator's asyncio transport share one reading of
the protocol. Why it is this strict: a wait answer is what wakes a sync, so an answer that does
not follow the protocol (a not-modified answer naming another index, a full answer for the index
the node already holds, an index that breaks the pattern) raises :class:`DocumentRejected` and
the caller backs off, instead of spinning on a server that answers at once forever. Only
``NM-Index`` (never a bare ``ETag``, which any static web server sends) says that an authority
offers blocking queries.
"""

from __future__ import annotations

import re
import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..core.errors import AuthorityUnavailable, ConfigError, DocumentRejected
from .auth import hmac_auth, session_auth
from .parse import DEFAULT_XML_MAX_BYTES, KIND_SLICES_XML, KIND_XMLRPC, document_kind, loads_xmlrpc_response

__all__ = [
    "Changed",
    "INDEX_HEADER",
    "INDEX_MEMBER",
    "MAX_WAIT",
    "METHOD",
    "MIN_WAIT",
    "NOT_MODIFIED_MEMBER",
    "NotModified",
    "WaitRequest",
    "index_of_document",
    "is_index",
    "offers_blocking",
    "wait_call",
    "wait_outcome",
]

#: The XML-RPC method of a blocking query.
METHOD = "GetSliversWait"
#: Top-level members of a GetSlivers / GetSliversWait answer.
INDEX_MEMBER = "nm_index"
NOT_MODIFIED_MEMBER = "nm_not_modified"
#: The HTTP header that carries the index of a slices.xml answer (lower case: HTTP names are
#: case-insensitive and the project's HTTP client gives them in lower case).
INDEX_HEADER = "nm-index"
#: The waits the protocol allows, in seconds.
MIN_WAIT = 1
MAX_WAIT = 600
#: An index: 1..64 characters of ``[A-Za-z0-9_-]`` (it is echoed in a header and a query).
INDEX_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: The transient HTTP statuses (worth a retry after a backoff).
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

_index_match = INDEX_PATTERN.fullmatch


def is_index(value: object) -> bool:
    """True for a well-formed index (a ``str`` matching :data:`INDEX_PATTERN`)."""
    return type(value) is str and _index_match(value) is not None


def offers_blocking(url: str) -> bool:
    """Whether an authority URL can offer blocking queries at all: XML-RPC or slices.xml over
    http(s). A ``file://`` source or a ``slivers.json`` never does (the node polls it)."""
    scheme = urlsplit(url).scheme.lower()
    return scheme in ("http", "https") and document_kind(url) in (KIND_XMLRPC, KIND_SLICES_XML)


@dataclass(frozen=True, slots=True)
class WaitRequest:
    """One blocking query, ready for any HTTP transport.

    ``headers`` are the protocol's own headers (a transport adds Host, Content-Length,
    User-Agent, ...); ``content_type`` is the body's type (``""`` for a bodyless GET);
    ``timeout`` is the socket timeout to use: the wait plus a margin, so that a dropped or hung
    connection is noticed within the wait period plus that margin; ``max_bytes`` caps the
    answer's body. ``kind``, ``index`` and ``wait`` are kept for :func:`wait_outcome`."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content_type: str
    timeout: float
    max_bytes: int
    kind: str
    index: str
    wait: int


@dataclass(frozen=True, slots=True)
class Changed:
    """The node's document changed: ``body`` is the new document as received (to go through the
    normal parse and validation path) and ``index`` its index. ``data`` is the XML-RPC answer
    already decoded (``wait_outcome`` had to decode it to see which answer it is), so that the
    caller need not decode a large document twice; ``None`` for slices.xml."""

    body: bytes
    index: str
    data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class NotModified:
    """The wait ended without a change: the node's document is still ``index``."""

    index: str


def wait_call(
    url: str,
    index: str,
    wait: int,
    *,
    node_id: int | None = None,
    node_key: str | None = None,
    session: str | None = None,
    margin: float = 30.0,
    max_bytes: int = DEFAULT_XML_MAX_BYTES,
) -> WaitRequest:
    """The blocking query for the document at ``url`` (the URL the node fetches, node id query
    included for slices.xml), presenting ``index`` and waiting at most ``wait`` seconds.

    XML-RPC needs ``session`` or both ``node_id`` and ``node_key`` (BootAuth over
    ``[index, wait]``). Raises :class:`ConfigError` for a URL that cannot carry blocking queries,
    a malformed index, a wait outside ``MIN_WAIT..MAX_WAIT``, missing credentials or a margin
    that is not positive: these are the caller's mistakes, never the authority's."""
    if not offers_blocking(url):
        raise ConfigError(f"authority URL {url!r}: blocking queries need an http(s) XML-RPC or slices.xml URL")
    if not is_index(index):
        raise ConfigError(f"index {str(index)[:80]!r} is not 1..64 characters of [A-Za-z0-9_-]")
    if type(wait) is not int or not MIN_WAIT <= wait <= MAX_WAIT:
        raise ConfigError(f"wait must be an integer of {MIN_WAIT}..{MAX_WAIT} seconds, not {wait!r}")
    if not margin > 0:
        raise ConfigError(f"margin must be positive, not {margin!r}")
    kind = document_kind(url)
    timeout = float(wait) + float(margin)
    if kind == KIND_XMLRPC:
        if session is not None:
            auth = session_auth(session)
        elif node_id is not None and node_key is not None:
            auth = hmac_auth(node_id, node_key, [index, wait])
        else:
            raise ConfigError(f"authority URL {url}: {METHOD} needs the node id and node key, or a session")
        body = xmlrpc.client.dumps((auth, index, wait), METHOD, allow_none=True).encode("utf-8")
        return WaitRequest("POST", url, (), body, "text/xml", timeout, max_bytes, kind, index, wait)
    parts = urlsplit(url)
    query = [(name, value) for name, value in parse_qsl(parts.query, keep_blank_values=True) if name != "wait"]
    query.append(("wait", str(wait)))
    target = urlunsplit(parts._replace(query=urlencode(query)))
    headers = (("If-None-Match", f'"{index}"'),)
    return WaitRequest("GET", target, headers, b"", "", timeout, max_bytes, kind, index, wait)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Header ``name`` (lower case) from a mapping whose names may be in any case."""
    value = headers.get(name)
    if value is None:
        for key, item in headers.items():
            if key.lower() == name:
                return item
    return value


def index_of_document(kind: str, headers: Mapping[str, str] | None, data: Mapping[str, Any] | None) -> str | None:
    """The index of a document fetched the ordinary way (a ``GetSlivers`` answer already
    decoded into ``data``, or a slices.xml answer's ``headers``), or ``None`` when the authority
    sent none: then it offers no blocking queries and the node polls (a real PLCAPI, a static
    web server, a file). Raises :class:`DocumentRejected` for an index that breaks the pattern;
    the document itself stays good: the caller polls instead of watching."""
    if kind == KIND_XMLRPC:
        value = data.get(INDEX_MEMBER) if isinstance(data, Mapping) else None
        where = f"member {INDEX_MEMBER}"
    elif kind == KIND_SLICES_XML:
        value = _header(headers, INDEX_HEADER) if headers is not None else None
        where = "header NM-Index"
        if value is not None:
            value = value.strip()
    else:
        return None
    if value is None:
        return None
    if not is_index(value):
        raise DocumentRejected(f"{where} {_show(value)} is not 1..64 characters of [A-Za-z0-9_-]")
    return value  # type: ignore[return-value]  # checked by is_index


def wait_outcome(
    request: WaitRequest, status: int, headers: Mapping[str, str], body: bytes
) -> Changed | NotModified:
    """What the answer (``status``, ``headers`` -- names in any case --, ``body``) to ``request``
    says: :class:`Changed` or :class:`NotModified`.

    Raises :class:`AuthorityUnavailable` for an HTTP status other than the protocol's (the
    transient ones, 408/429/5xx, say so in the message: the caller backs off either way),
    :class:`DocumentRejected` for a malformed or inconsistent answer, and ``AuthorityError``
    when the authority answered an XML-RPC fault (e.g. it does not know ``GetSliversWait``)."""
    if request.kind == KIND_SLICES_XML:
        return _slices_xml_outcome(request, status, headers, body)
    _check_status(request, status, ok=(200,))
    data = loads_xmlrpc_response(body, request.max_bytes)
    if not isinstance(data, Mapping):
        raise DocumentRejected(f"{METHOD}: the answer must be a struct, not {type(data).__name__}")
    index = data.get(INDEX_MEMBER)
    if not is_index(index):
        raise DocumentRejected(f"{METHOD}: the answer's {INDEX_MEMBER} is {_show(index)}, not an index")
    if NOT_MODIFIED_MEMBER in data:  # even <nil/>: only ``true`` means anything
        flag = data[NOT_MODIFIED_MEMBER]
        if flag is not True:
            raise DocumentRejected(f"{METHOD}: {NOT_MODIFIED_MEMBER} must be true when present, not {_show(flag)}")
        if index != request.index:
            raise DocumentRejected(
                f"{METHOD}: a not-modified answer names index {index!r}, the node presented {request.index!r}"
            )
        return NotModified(index)  # type: ignore[arg-type]  # checked by is_index
    if index == request.index:
        raise DocumentRejected(f"{METHOD}: a full answer for index {index!r}, which the node already holds")
    return Changed(body, index, data)  # type: ignore[arg-type]


def _slices_xml_outcome(
    request: WaitRequest, status: int, headers: Mapping[str, str], body: bytes
) -> Changed | NotModified:
    _check_status(request, status, ok=(200, 304))
    index = _header(headers, INDEX_HEADER)
    index = index.strip() if index is not None else None
    if not is_index(index):
        raise DocumentRejected(f"slices.xml wait: header NM-Index is {_show(index)}, not an index")
    if status == 304:
        if index != request.index:
            raise DocumentRejected(
                f"slices.xml wait: a 304 names index {index!r}, the node presented {request.index!r}"
            )
        return NotModified(index)  # type: ignore[arg-type]
    if index == request.index:
        raise DocumentRejected(f"slices.xml wait: a full answer for index {index!r}, which the node already holds")
    if len(body) > request.max_bytes:
        raise DocumentRejected(
            f"slices.xml wait: the answer is {len(body)} bytes, over the {request.max_bytes}-byte cap"
        )
    return Changed(body, index)  # type: ignore[arg-type]


def _check_status(request: WaitRequest, status: int, *, ok: tuple[int, ...]) -> None:
    if status in ok:
        return
    what = "transient, " if status in TRANSIENT_STATUSES or status >= 500 else ""
    raise AuthorityUnavailable(f"{request.url}: blocking query answered HTTP {status} ({what}expected "
                               f"{' or '.join(map(str, ok))})")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
