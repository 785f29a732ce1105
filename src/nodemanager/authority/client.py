"""Fetching the authority document: node authentication, timeouts, size caps, retries.

One :class:`AuthorityClient` per daemon. :meth:`AuthorityClient.fetch` returns the validated
document and its protected names (see :mod:`.parse`), or raises one of:

* :class:`AuthorityUnavailable` -- the authority could not be reached, timed out, answered HTTP
  5xx on every try, or answered another non-200 status (not retried): keep the last good state;
* :class:`DocumentRejected` -- an answer arrived but is garbage (never retried: asking again
  quickly would get the same garbage);
* :class:`AuthorityError` -- the authority answered with an XML-RPC Fault (e.g. bad node key).

Blocking queries (authority.md "Blocking queries", :mod:`.blocking`): when the authority sent an
index with its document (the bundled authority does; a real PLCAPI, a static web server or a file
never do), :attr:`AuthorityClient.index` holds it and :meth:`AuthorityClient.wait_for_change`
asks the authority to answer when that document changes. A changed document is kept and returned
by the next :meth:`AuthorityClient.fetch` without another request, through the same parse and
validation path as any other: a blocking query only decides *when* the node syncs, never what.

Only transport failures are retried, with exponential backoff and jitter through the injected
``sleep`` and ``rng`` so tests run instantly. HTTP is spoken with the project's own client
(:mod:`nodemanager.http.client`) so that this module controls the things
``xmlrpc.client.ServerProxy`` does not: the response size cap, a whole-response deadline (a server
trickling bytes cannot hold a poll forever), the TLS context built from ``authority.ca_file``, and
no redirects. Proxy environment variables are not used.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from urllib.request import url2pathname

from ..core.errors import AuthorityUnavailable, ConfigError, DocumentRejected
from ..core.records import AuthorityDocument, parse_node_id
from ..core.retry import backoff_delay
from ..http.client import ClientTimeout, HttpClientError, ResponseTooLarge, TlsVerificationFailed
from ..http.client import request as http_request
from .auth import hmac_auth, session_auth
from .blocking import Changed, WaitRequest, index_of_document, offers_blocking, wait_call, wait_outcome
from .parse import (
    KIND_SLICES_XML,
    KIND_XMLRPC,
    MIB,
    document_kind,
    load_document,
    loads_xmlrpc_response,
    parse_getslivers_with_protection,
)

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * MIB
MAX_BACKOFF = 300.0
USER_AGENT = "nodemanager"


class _TransientError(AuthorityUnavailable):
    """A failure worth retrying (connection, timeout, HTTP 5xx)."""


def next_poll_delay(poll_interval: float, poll_jitter: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds until the next poll: the period plus 0..jitter, so a fleet restarted together
    spreads its polls."""
    return poll_interval + rng() * poll_jitter


class AuthorityClient:
    """Fetches and validates the authority document named by ``url`` (authority.md "Sources").

    ``retries`` is the number of extra attempts after the first one. Thread-compatible: one fetch
    at a time per instance (the sync loop's thread), and at most one :meth:`wait_for_change` at a
    time (the watcher's thread) beside it; :meth:`close_waits` from any thread."""

    def __init__(
        self,
        *,
        url: str,
        node_id: int | None,
        node_key: str | None,
        session: str | None,
        ca_file: str | None,
        timeout: float,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retries: int = 3,
        backoff_base: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.url = url
        self.kind = document_kind(url)
        self.node_id = node_id
        self._node_key = node_key
        self._session = session
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.retries = max(0, retries)
        self.backoff_base = backoff_base
        self._sleep = sleep
        self._rng = rng
        # blocking queries: the index of the last document received, the changed document a
        # wait brought (returned by the next fetch), the socket of the wait in flight
        self._lock = threading.Lock()
        self._index: str | None = None
        self._kept: Changed | None = None
        self._wait_socket: socket.socket | None = None
        self._waits_closed = False
        self._last_headers: dict[str, str] = {}
        if self.kind == KIND_XMLRPC and session is None and (node_id is None or node_key is None):
            raise ConfigError(f"authority URL {url}: GetSlivers needs the node id and node key, or a session")
        self._ssl_context: ssl.SSLContext | None = None
        if urlsplit(url).scheme.lower() == "https":
            try:
                self._ssl_context = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"authority.ca_file {ca_file}: cannot load CA certificates: {exc}") from exc

    @staticmethod
    def from_config(config: Config) -> AuthorityClient:
        """Build the client from ``[authority]``; the node id/key files are required only for
        XML-RPC without a session, but the node id is read whenever its file exists."""
        section = config.authority
        kind = document_kind(section.url)
        session = _read_secret(section.session_file, "authority.session_file") if section.session_file else None
        needs_node_auth = kind == KIND_XMLRPC and session is None
        node_id = _read_node_id(section.node_id_file, required=needs_node_auth)
        node_key = _read_secret(section.node_key_file, "authority.node_key_file") if needs_node_auth else None
        return AuthorityClient(
            url=section.url,
            node_id=node_id,
            node_key=node_key,
            session=session,
            ca_file=section.ca_file or None,
            timeout=float(section.timeout),
        )

    # ------------------------------------------------------------------ fetching

    def fetch(self) -> tuple[AuthorityDocument, frozenset[str]]:
        """Fetch, parse and validate the document; see the module docstring for the errors.

        When a blocking query brought a changed document since the last fetch, that document is
        taken instead of asking again (it is at most as old as the wake-up it caused)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            body, data = kept.body, kept.data
        else:
            self._last_headers = {}
            body, data = self.fetch_body(), None
        if self.kind != KIND_XMLRPC:
            if kept is None:
                self._note_index(self._last_headers)
            return load_document(self.url, body, expected_node_id=self.node_id, max_bytes=self.max_bytes)
        # load_document's XML-RPC path, split so that the index is read from the decoded struct
        if data is None:
            data = loads_xmlrpc_response(body, self.max_bytes)
            self._note_index(None, data)
        return parse_getslivers_with_protection(data, expected_node_id=self.node_id)

    # ------------------------------------------------------------------ blocking queries

    @property
    def index(self) -> str | None:
        """The index of the last document received from an authority that offers blocking
        queries; ``None`` when it offers none (then the node polls)."""
        return self._index

    def _note_index(self, headers: Mapping[str, str] | None, data: Mapping[str, Any] | None = None) -> None:
        """Remember the index an ordinary fetch brought (None: the authority offers none). It is
        taken whether or not the document then validates: waiting on the index of a rejected
        document is what wakes the node when the authority fixes it (and never spins)."""
        if not offers_blocking(self.url):
            return
        try:
            index = index_of_document(self.kind, headers, data)
        except DocumentRejected as exc:
            log.warning("event=authority-index-ignored url=%s reason=%s action=polling", self.url, exc)
            index = None
        with self._lock:
            self._index = index

    def wait_for_change(self, index: str, wait: int) -> bool:
        """One blocking query presenting ``index``, held by the authority up to ``wait`` seconds:
        True when the document changed (it is kept for the next :meth:`fetch`, and :attr:`index`
        is the new one), False when the wait ended unchanged.

        The socket timeout is ``wait`` plus ``authority.timeout``, so a dropped or hung connection
        is noticed within the wait period and that margin. Raises ``AuthorityUnavailable`` (no
        answer, a transport failure, another HTTP status, or :meth:`close_waits`),
        ``DocumentRejected`` (an answer that breaks the protocol) or ``AuthorityError`` (an
        XML-RPC fault). Never retries: the caller backs off."""
        request = wait_call(
            self._document_url(), index, wait, node_id=self.node_id, node_key=self._node_key,
            session=self._session, margin=self.timeout, max_bytes=self.max_bytes,
        )
        status, headers, body = self._wait_exchange(request)
        outcome = wait_outcome(request, status, headers, body)
        if not isinstance(outcome, Changed):
            return False
        with self._lock:
            self._kept, self._index = outcome, outcome.index
        return True

    def close_waits(self) -> None:
        """End the blocking query in flight at once and refuse later ones (the daemon is
        stopping). Idempotent; from any thread."""
        with self._lock:
            self._waits_closed = True
            sock = self._wait_socket
        if sock is not None:
            _shutdown(sock)

    def _document_url(self) -> str:
        return self._slices_xml_url() if self.kind == KIND_SLICES_XML else self.url

    def _wait_exchange(self, request: WaitRequest) -> tuple[int, dict[str, str], bytes]:
        """Send one wait through the project's HTTP client; transport failures ->
        AuthorityUnavailable, an oversized answer -> DocumentRejected."""

        def connected(sock: socket.socket) -> None:
            with self._lock:
                self._wait_socket = sock
                closed = self._waits_closed
            if closed:
                _shutdown(sock)

        if self._waits_closed:
            raise AuthorityUnavailable("blocking queries are closed (the node is stopping)")
        try:
            # the HTTP client types a body as text/xml, the only body a wait has
            response = http_request(
                request.url, method=request.method, body=request.body,
                headers=(*request.headers, ("User-Agent", USER_AGENT)), timeout=request.timeout,
                max_body=request.max_bytes, ssl_context=self._ssl_context, on_connect=connected,
            )
        except ResponseTooLarge as exc:
            raise DocumentRejected(f"blocking query: {exc}") from exc
        except HttpClientError as exc:
            if self._waits_closed:
                raise AuthorityUnavailable("blocking query ended: the node is stopping") from exc
            raise AuthorityUnavailable(f"blocking query failed: {exc}") from exc
        finally:
            with self._lock:
                self._wait_socket = None
        return response.status, dict(response.headers), response.body

    def fetch_body(self) -> bytes:
        """The raw document bytes (retries included), before any parsing."""
        if urlsplit(self.url).scheme.lower() == "file":
            return self._read_file()
        if self.kind == KIND_XMLRPC:
            auth = session_auth(self._session) if self._session is not None else hmac_auth(
                self.node_id, self._node_key or ""  # type: ignore[arg-type]  # checked in __init__
            )
            payload = xmlrpc.client.dumps((auth,), "GetSlivers", allow_none=True).encode("utf-8")
            return self._with_retries(lambda: self._http("POST", self.url, payload))
        url = self._slices_xml_url() if self.kind == KIND_SLICES_XML else self.url
        return self._with_retries(lambda: self._http("GET", url, None))

    def _slices_xml_url(self) -> str:
        parts = urlsplit(self.url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        if self.node_id is None or any(name == "node_id" for name, _ in query):
            return self.url
        query.append(("node_id", str(self.node_id)))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def _with_retries(self, attempt: Callable[[], bytes]) -> bytes:
        last: _TransientError | None = None
        for number in range(self.retries + 1):
            try:
                return attempt()
            except _TransientError as exc:
                last = exc
                if number == self.retries:
                    break
                delay = backoff_delay(number + 1, self.backoff_base, MAX_BACKOFF, self._rng)
                log.warning(
                    "authority fetch failed url=%s attempt=%d retry_in=%.1fs error=%s", self.url, number + 1, delay, exc
                )
                self._sleep(delay)
        raise AuthorityUnavailable(f"authority unavailable after {self.retries + 1} attempt(s): {last}") from last

    def _read_file(self) -> bytes:
        path = Path(url2pathname(urlsplit(self.url).path))
        try:
            with path.open("rb") as handle:
                data = handle.read(self.max_bytes + 1)
        except OSError as exc:
            raise AuthorityUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
        if len(data) > self.max_bytes:
            raise DocumentRejected(f"{path} is larger than the {self.max_bytes}-byte cap")
        return data

    def _http(self, method: str, url: str, payload: bytes | None) -> bytes:
        """One HTTP exchange with a whole-response deadline; transient failures -> _TransientError."""
        try:
            response = http_request(
                url, method=method, body=payload or b"", headers=(("User-Agent", USER_AGENT),),
                timeout=self.timeout, max_body=self.max_bytes, ssl_context=self._ssl_context,
            )
        except ResponseTooLarge as exc:
            raise DocumentRejected(f"{url}: the answer is over the {self.max_bytes}-byte cap ({exc})") from exc
        except TlsVerificationFailed as exc:
            raise AuthorityUnavailable(f"{url}: {exc}") from exc
        except ClientTimeout as exc:
            raise _TransientError(f"{url}: no complete answer within {self.timeout:g} s") from exc
        except HttpClientError as exc:
            raise _TransientError(f"{url}: {exc}") from exc
        if response.status >= 500:
            raise _TransientError(f"{url}: HTTP {response.status}")
        if response.status != 200:
            raise AuthorityUnavailable(f"{url}: HTTP {response.status}")
        self._last_headers = dict(response.headers)  # NM-Index
        return response.body


def _read_secret(path: str, key: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key} {path}: cannot read it: {reason}") from exc
    if not text:
        raise ConfigError(f"{key} {path}: the file is empty")
    return text


def _read_node_id(path: str, *, required: bool) -> int | None:
    if not path or (not required and not Path(path).exists()):
        if required:
            raise ConfigError("authority.node_id_file is not set but the authority URL needs a node id")
        return None
    node_id = parse_node_id(_read_secret(path, "authority.node_id_file"))
    if node_id is None:
        raise ConfigError(f"authority.node_id_file {path}: does not hold a node id (a positive integer)")
    return node_id


def _shutdown(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` (its recv returns end-of-file); the socket may already
    be closed by its owner."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
