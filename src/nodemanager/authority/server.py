"""The bundled authority: a small HTTP server for demos, tests and small sites (authority.md).

It serves, from a TOML data file (format in :mod:`.model` and ``examples/demo-slices.toml``):

* ``POST /PLCAPI/`` -- XML-RPC. ``GetSlivers(auth)`` answers the GetSlivers struct of the node
  that the HMAC BootAuth struct authenticates (bad auth -> Fault 108). ``GetSliceTicket(auth,
  slice_name)`` answers a signed ticket for a delegated slice to a user of the data file's
  ``[[users]]`` who authenticates with PLCAPI's password auth struct (:mod:`.issue`; the signing
  key and certificate are :mod:`.signing`'s, generated on first use). Methods come from a table
  name -> handler (:attr:`AuthorityServer.methods`); other features plug in with
  :meth:`AuthorityServer.register_method` without touching the transport.
* ``GET /slices.xml?node_id=N`` and ``GET /nodes/N/slices.xml`` -- the node's slices.xml. Like the
  original's slices.xml it is not authenticated: it holds public keys and resource settings only.
* ``GET /conf_files/<source>`` -- the content of a ``[[conf_files]]`` entry (:mod:`.conffiledata`),
  public too: GetSlivers names them, nodes fetch them with ``conf_files.base_url`` = this root.

Documents are computed from the data on every request; the file is re-read when its stat
signature changes, so an edit is visible at every node's next poll. With ``timestamp = "mtime"``
(the default) the document timestamp is the file's modification time, forced to increase by at
least one on every reload so that two edits within a second still produce a newer document. An
edit that does not validate is logged and the last good data keeps being served.

Request bodies are capped at 1 MiB and parsed with the hardened parser of :mod:`.parse`. The
server is ``http.server.ThreadingHTTPServer`` (a thread per connection): fine for a demo or a small
site, not meant to face the Internet without a TLS-terminating proxy in front.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..core.errors import (
    ConfigError,
    DocumentRejected,
    NodeManagerError,
    PermissionDenied,
    UnknownMethod,
    WrongArgumentCount,
)
from .auth import verify_hmac_auth
from .conffiledata import URL_PREFIX as CONF_FILES_PREFIX
from .conffiledata import read_served_file
from .issue import TicketIssuer, get_slice_ticket
from .model import AuthorityData, getslivers_struct, load_authority_text, slices_xml
from .parse import MIB, loads_xmlrpc_call

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 * MIB
REQUEST_TIMEOUT = 10.0
XMLRPC_PATHS = frozenset({"/PLCAPI/", "/PLCAPI"})
_NODE_PATH = re.compile(r"/nodes/([0-9]{1,10})/slices\.xml")

#: A method handler: (the server, the call's parameters) -> the XML-RPC result. Raise a
#: NodeManagerError to answer a Fault with its code.
MethodHandler = Callable[["AuthorityServer", Sequence[Any]], Any]


class AuthorityDataFile:
    """The data file, re-read when it changes. Thread-safe; :meth:`current` is cheap (a stat)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._data: AuthorityData | None = None
        self._last_mtime_timestamp = 0
        self.current()  # the first load must succeed: ConfigError otherwise

    def current(self) -> AuthorityData:
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                if self._data is None:
                    raise ConfigError(f"cannot read authority data {self.path}: {exc.strerror}") from exc
                log.error("authority data unreadable, serving the last good data path=%s error=%s",
                          self.path, exc.strerror)
                return self._data
            signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            if signature != self._signature:
                self._reload(signature, int(st.st_mtime))
            assert self._data is not None
            return self._data

    def _reload(self, signature: tuple[int, ...], mtime: int) -> None:
        timestamp = max(mtime, self._last_mtime_timestamp + 1)
        try:
            text = self.path.read_text(encoding="utf-8")
            data = load_authority_text(text, timestamp=timestamp, base_time=mtime, origin=str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            if self._data is None:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"cannot read authority data {self.path}: {exc}") from exc
            log.error("authority data invalid, serving the last good data path=%s error=%s", self.path, exc)
            self._signature = signature
            return
        if data.timestamp == timestamp:
            self._last_mtime_timestamp = timestamp
        self._data, self._signature = data, signature
        log.info("authority data loaded path=%s timestamp=%d nodes=%d slices=%d",
                 self.path, data.timestamp, len(data.nodes), len(data.slices))


def get_slivers(server: AuthorityServer, params: Sequence[Any]) -> Any:
    """GetSlivers(auth[, node_id]): the GetSlivers struct of the authenticated node."""
    if not 1 <= len(params) <= 2:
        raise WrongArgumentCount("GetSlivers takes (auth) or (auth, node_id)")
    data = server.data()
    node_id = verify_hmac_auth(params[0], data.node_keys, params[1:])
    if len(params) == 2 and params[1] not in (node_id, data.node(node_id).hostname):
        raise PermissionDenied(f"node {node_id} may only ask for its own slivers")
    return getslivers_struct(data, node_id)


DEFAULT_METHODS: Mapping[str, MethodHandler] = {"GetSlivers": get_slivers, "GetSliceTicket": get_slice_ticket}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    authority: AuthorityServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    timeout = REQUEST_TIMEOUT
    server_version = "nodemanager-authority"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log.info("authority http peer=%s %s", self.client_address[0] if self.client_address else "", format % args)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_text(self, status: int, text: str) -> None:
        self._send(status, "text/plain; charset=utf-8", (text + "\n").encode("utf-8"))

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        if urlsplit(self.path).path not in XMLRPC_PATHS:
            self._send_text(404, "not found: XML-RPC is served at /PLCAPI/")
            return
        length_header = self.headers.get("Content-Length", "")
        if not (length_header.strip().isascii() and length_header.strip().isdigit()):
            self.close_connection = True
            self._send_text(411, "a Content-Length is required")
            return
        length = int(length_header)
        if length > MAX_REQUEST_BYTES:
            self.close_connection = True
            self._send_text(413, f"request body over {MAX_REQUEST_BYTES} bytes")
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            self._send_text(400, "truncated request body")
            return
        try:
            method, params = loads_xmlrpc_call(body, MAX_REQUEST_BYTES)
        except DocumentRejected as exc:
            self._send_text(400, str(exc))
            return
        self._send(200, "text/xml", self.server.authority.dispatch(method, params))

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        parts = urlsplit(self.path)
        raw_id: str | None = None
        if parts.path.startswith(CONF_FILES_PREFIX):  # configuration files (conffiledata), public
            authority = self.server.authority
            content = read_served_file(authority.config_path.parent / authority.data().conf_files_dir, parts.path)
            if content is None:
                self._send_text(404, "no such configuration file")
            else:
                self._send(200, "application/octet-stream", content)
            return
        if parts.path == "/slices.xml":
            raw_id = (parse_qs(parts.query).get("node_id") or [None])[0]
        else:
            match = _NODE_PATH.fullmatch(parts.path)
            if match is None:
                self._send_text(404, "not found: try /slices.xml?node_id=N or /nodes/N/slices.xml")
                return
            raw_id = match.group(1)
        if raw_id is None or not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 10:
            self._send_text(400, "node_id must be given as a number")
            return
        data = self.server.authority.data()
        try:
            body = slices_xml(data, int(raw_id))
        except KeyError:
            self._send_text(404, f"unknown node {raw_id}")
            return
        self._send(200, "text/xml; charset=utf-8", body)


class AuthorityServer:
    """The bundled authority over HTTP. ``start()`` serves from a background thread and returns
    the bound port (``port=0`` picks a free one); ``stop()`` shuts it down. Usable as a context
    manager. The data file is validated in the constructor (ConfigError)."""

    def __init__(
        self,
        config_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        methods: Mapping[str, MethodHandler] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.source = AuthorityDataFile(self.config_path)
        #: Signs tickets; its key and certificate are loaded (or generated) on first use.
        self.tickets = TicketIssuer(self.config_path)
        #: Wall clock for ticket times (tests replace it).
        self.clock: Callable[[], float] = time.time
        self.methods: dict[str, MethodHandler] = dict(DEFAULT_METHODS)
        self.methods.update(methods or {})
        self.host = host
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def data(self) -> AuthorityData:
        """The current data (re-read if the file changed)."""
        return self.source.current()

    def register_method(self, name: str, handler: MethodHandler) -> None:
        """Add or replace an XML-RPC method (e.g. ``GetSliceTicket``)."""
        self.methods[name] = handler

    def dispatch(self, method: str, params: Sequence[Any]) -> bytes:
        """Run one XML-RPC call and marshal its answer (a Fault for any NodeManagerError)."""
        try:
            handler = self.methods.get(method)
            if handler is None:
                raise UnknownMethod(f"unknown method {method[:80]!r}")
            result = handler(self, params)
            return xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True).encode("utf-8")
        except NodeManagerError as exc:
            log.info("authority fault method=%s code=%d reason=%s", method[:80], exc.fault_code, exc)
            fault = xmlrpc.client.Fault(exc.fault_code, str(exc))
        except Exception:
            log.exception("authority method failed method=%s", method[:80])
            fault = xmlrpc.client.Fault(1, "internal error in the authority")
        return xmlrpc.client.dumps(fault, methodresponse=True).encode("utf-8")

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the authority server is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The XML-RPC endpoint (``…/PLCAPI/``) of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/PLCAPI/"

    def start(self) -> int:
        if self._httpd is not None:
            raise RuntimeError("the authority server is already started")
        server_class = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = server_class((self.host, self._requested_port), _Handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror}") from exc
        httpd.authority = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="authority-http", daemon=True
        )
        self._thread.start()
        log.info("authority serving url=%s data=%s", self.url, self.config_path)
        return self.port

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> AuthorityServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(
    config_path: Path,
    host: str,
    port: int,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (forever without one; the caller's signal handling ends it).
    ``ready`` is set once the socket is listening."""
    server = AuthorityServer(config_path, host, port)
    server.start()
    try:
        if ready is not None:
            ready.set()
        (stop if stop is not None else threading.Event()).wait()
    finally:
        server.stop()
