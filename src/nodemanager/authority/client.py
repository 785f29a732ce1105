"""Fetching the authority document: node authentication, timeouts, size caps, retries.

One :class:`AuthorityClient` per daemon. :meth:`AuthorityClient.fetch` returns the validated
document and its protected names (see :mod:`.parse`), or raises one of:

* :class:`AuthorityUnavailable` -- the authority could not be reached, timed out, answered HTTP
  5xx on every try, or answered another non-200 status (not retried): keep the last good state;
* :class:`DocumentRejected` -- an answer arrived but is garbage (never retried: asking again
  quickly would get the same garbage);
* :class:`AuthorityError` -- the authority answered with an XML-RPC Fault (e.g. bad node key).

Only transport failures are retried, with exponential backoff and jitter through the injected
``sleep`` and ``rng`` so tests run instantly. HTTP is spoken with ``http.client`` directly so that
this module controls the things ``xmlrpc.client.ServerProxy`` does not: the response size cap, a
whole-response deadline (a server trickling bytes cannot hold a poll forever), the TLS context
built from ``authority.ca_file``, and no redirects. Proxy environment variables are not used.
"""

from __future__ import annotations

import http.client
import logging
import random
import ssl
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from urllib.request import url2pathname

from ..core.errors import AuthorityUnavailable, ConfigError, DocumentRejected
from ..core.records import AuthorityDocument, parse_node_id
from ..core.retry import backoff_delay
from .auth import hmac_auth, session_auth
from .parse import KIND_SLICES_XML, KIND_XMLRPC, MIB, document_kind, load_document

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * MIB
MAX_BACKOFF = 300.0
USER_AGENT = "nodemanager"
_CHUNK = 256 * 1024


class _TransientError(AuthorityUnavailable):
    """A failure worth retrying (connection, timeout, HTTP 5xx)."""


def next_poll_delay(poll_interval: float, poll_jitter: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds until the next poll: the period plus 0..jitter, so a fleet restarted together
    spreads its polls."""
    return poll_interval + rng() * poll_jitter


class AuthorityClient:
    """Fetches and validates the authority document named by ``url`` (authority.md "Sources").

    ``retries`` is the number of extra attempts after the first one. Thread-compatible: one fetch
    at a time per instance (the sync loop's thread)."""

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
        """Fetch, parse and validate the document; see the module docstring for the errors."""
        body = self.fetch_body()
        return load_document(self.url, body, expected_node_id=self.node_id, max_bytes=self.max_bytes)

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
        deadline = time.monotonic() + self.timeout
        connection, target = http_connection(url, self.timeout, self._ssl_context)
        headers = {"User-Agent": USER_AGENT}
        if payload is not None:
            headers["Content-Type"] = "text/xml"
        response: http.client.HTTPResponse | None = None
        try:
            connection.connect()
            sock: Any = connection.sock
            connection.request(method, target, body=payload, headers=headers)
            response = connection.getresponse()
            if response.status >= 500:
                raise _TransientError(f"{url}: HTTP {response.status} {response.reason}")
            if response.status != 200:
                raise AuthorityUnavailable(f"{url}: HTTP {response.status} {response.reason}")
            return read_capped_body(response, sock, deadline, self.max_bytes, f"{url}: the answer")
        except ssl.SSLCertVerificationError as exc:
            raise AuthorityUnavailable(f"{url}: TLS certificate verification failed: {exc.verify_message}") from exc
        except TimeoutError as exc:
            raise _TransientError(f"{url}: no complete answer within {self.timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise _TransientError(f"{url}: {type(exc).__name__}: {exc}") from exc
        finally:
            if response is not None:
                response.close()
            connection.close()


def http_connection(url: str, timeout: float,
                    context: ssl.SSLContext | None) -> tuple[http.client.HTTPConnection, str]:
    """An unopened connection to ``url``'s host (HTTPS verified with ``context``) and the request
    target (path and query). Shared by the authority client and the conf-files fetch."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme.lower() == "https":
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=context), target
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout), target


def read_capped_body(response: http.client.HTTPResponse, sock: Any, deadline: float, max_bytes: int,
                     what: str) -> bytes:
    """The body of ``response``, at most ``max_bytes`` (an announced or a streamed excess is
    ``DocumentRejected`` naming ``what``), read in chunks with the socket's timeout set to what is
    left before ``deadline`` (``time.monotonic``): a server that trickles bytes cannot hold the
    caller beyond it (``TimeoutError``). Shared by the authority client and the conf-files fetch."""
    length = (response.getheader("Content-Length") or "").strip()
    if length.isascii() and length.isdigit() and int(length) > max_bytes:
        raise DocumentRejected(f"{what} is {int(length)} bytes, over the {max_bytes}-byte cap")
    chunks: list[bytes] = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        if sock.fileno() >= 0:  # http.client closes the socket once the body is complete
            sock.settimeout(remaining)
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise DocumentRejected(f"{what} is over the {max_bytes}-byte cap")
        chunks.append(chunk)


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
