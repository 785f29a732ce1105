"""The fleet simulator's side of the node-authority protocol: requests out, answers in.

The protocol is the node's own: the first request is an ordinary ``GetSlivers(auth)`` (BootAuth,
``authority.auth``) or slices.xml GET; once the authority sent an index, each request is a
blocking query built by ``authority.blocking.wait_call`` and its answer read by
``authority.blocking.wait_outcome`` -- the same pure functions the daemon's client uses, so the
simulator cannot drift from the node. Only the transport differs: the project's asyncio client
(``http.aclient.arequest``), one coroutine per node instead of one thread.

Split in two on purpose: :meth:`NodeExchange.ask` (on the event loop) only sends and receives;
:meth:`NodeExchange.read` (on an applier thread) decodes the answer, because decoding an
XML-RPC document is CPU work the loop must not do for 10,000 nodes at once.
"""

from __future__ import annotations

import xmlrpc.client
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..authority.auth import hmac_auth
from ..authority.blocking import Changed, WaitRequest, index_of_document, offers_blocking, wait_call, wait_outcome
from ..authority.parse import KIND_SLICES_XML, KIND_XMLRPC, document_kind
from ..core.errors import AuthorityUnavailable, ConfigError, DocumentRejected
from .node import MAX_DOCUMENT_BYTES
from ..http.aclient import arequest
from ..http.client import HttpClientError, ResponseTooLarge

USER_AGENT = "nodemanager-fleet"


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer as received: what was asked (``request``: None for an ordinary fetch) and the
    raw status, headers (lower-case names) and body."""

    request: WaitRequest | None
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Reading:
    """An answer read: ``body`` (and the decoded XML-RPC ``data``) of a new document, or
    ``body`` None when the wait ended unchanged; ``index`` is the authority's index of the
    node's document (None: the authority offers no blocking queries)."""

    body: bytes | None
    index: str | None
    data: Mapping[str, Any] | None = None


def check_authority_url(url: str) -> None:
    """Raise :class:`ConfigError` unless ``url`` is an http(s) XML-RPC or slices.xml URL (the
    simulator fetches over HTTP only: a ``file://`` source has no per-node documents)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname \
            or document_kind(url) not in (KIND_XMLRPC, KIND_SLICES_XML):
        raise ConfigError(f"authority URL {url!r}: the simulator needs http(s)://HOST[:PORT]/PLCAPI/ "
                          "(XML-RPC) or an http(s) slices.xml URL")


class NodeExchange:
    """One node's requests to the authority at ``url`` (its credentials, its URL)."""

    __slots__ = ("url", "node_id", "key", "timeout", "kind", "_fetch_body", "_fetch_url", "blocking_ok")

    def __init__(self, url: str, node_id: int, key: str | None, *, timeout: float) -> None:
        """Raises :class:`ConfigError` for an XML-RPC authority without ``key`` (``url`` was
        checked by :func:`check_authority_url`)."""
        self.url = url
        self.node_id = node_id
        self.key = key
        self.timeout = timeout
        self.kind = document_kind(url)
        self.blocking_ok = offers_blocking(url)
        if self.kind == KIND_XMLRPC:
            if key is None:
                raise ConfigError(f"node {node_id}: no node key for the XML-RPC authority {url}")
            auth = hmac_auth(node_id, key)
            self._fetch_body = xmlrpc.client.dumps((auth,), "GetSlivers", allow_none=True).encode()
            self._fetch_url = url
        else:
            self._fetch_body = b""
            self._fetch_url = _with_node_id(url, node_id)

    async def ask(self, index: str | None, wait: int) -> Answer:
        """Send one request: a blocking query presenting ``index`` (the authority answers when
        the node's document changed, or when ``wait`` ends), or with ``index`` None an ordinary
        fetch. Transport failures raise :class:`AuthorityUnavailable`."""
        if index is not None and self.blocking_ok:
            request: WaitRequest | None = wait_call(
                self._fetch_url, index, wait, node_id=self.node_id, node_key=self.key,
                margin=self.timeout, max_bytes=MAX_DOCUMENT_BYTES)
            method, url, headers, body = request.method, request.url, request.headers, request.body
            timeout = request.timeout
        else:
            request = None
            method = "POST" if self.kind == KIND_XMLRPC else "GET"
            url, body, timeout = self._fetch_url, self._fetch_body, self.timeout
            headers = (("Content-Type", "text/xml"),) if body else ()
        if not any(name == "User-Agent" for name, _ in headers):
            headers = (*headers, ("User-Agent", USER_AGENT))
        try:
            response = await arequest(url, method=method, body=body, headers=headers, timeout=timeout,
                                      max_body=MAX_DOCUMENT_BYTES)
        except ResponseTooLarge as exc:
            raise DocumentRejected(str(exc)) from exc
        except HttpClientError as exc:
            raise AuthorityUnavailable(str(exc)) from exc
        return Answer(request, response.status, response.headers, response.body)

    def read(self, answer: Answer) -> Reading:
        """Interpret ``answer`` (CPU: run it off the event loop). Raises ``AuthorityError``
        subclasses: an HTTP error status, a fault (e.g. a wrong node key), a malformed answer."""
        if answer.request is not None:
            outcome = wait_outcome(answer.request, answer.status, answer.headers, answer.body)
            if isinstance(outcome, Changed):
                return Reading(outcome.body, outcome.index, outcome.data)
            return Reading(None, outcome.index)
        if answer.status != 200:
            raise AuthorityUnavailable(f"{self._fetch_url}: HTTP {answer.status}")
        if self.kind == KIND_SLICES_XML:
            return Reading(answer.body, _index_or_none(KIND_SLICES_XML, answer.headers, None))
        from ..authority.safe_xml import loads_xmlrpc_response

        data = loads_xmlrpc_response(answer.body, MAX_DOCUMENT_BYTES)
        if not isinstance(data, Mapping):
            raise DocumentRejected(f"GetSlivers answered a {type(data).__name__}, not a struct")
        return Reading(answer.body, _index_or_none(KIND_XMLRPC, None, data), data)


def _index_or_none(kind: str, headers: Mapping[str, str] | None, data: Mapping[str, Any] | None) -> str | None:
    """The document's index; a malformed one means "poll" (the document itself stays good)."""
    try:
        return index_of_document(kind, headers, data)
    except DocumentRejected:
        return None


def _with_node_id(url: str, node_id: int) -> str:
    """The slices.xml URL of node ``node_id`` (``?node_id=N``; a ``node_id`` in ``url`` is replaced:
    every simulated node asks for its own document)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query = [(name, value) for name, value in query if name != "node_id"]
    query.append(("node_id", str(node_id)))
    return urlunsplit(parts._replace(query=urlencode(query)))


__all__ = ["Answer", "NodeExchange", "Reading", "check_authority_url"]
