"""The bundled authority: a small HTTP server for demos, tests and small sites (authority.md).

It serves, from a TOML data file (format in :mod:`.model` and ``examples/demo-slices.toml``):

* ``POST /PLCAPI/`` -- XML-RPC. ``GetSlivers(auth)`` answers the GetSlivers struct of the node
  that the HMAC BootAuth struct authenticates (bad auth -> Fault 108), with its ``nm_index``;
  ``GetSliversWait(auth, index, wait)`` is its blocking variant (:mod:`.methods`,
  docs/blocking-queries.md). ``GetSliceTicket(auth, slice_name)`` answers a signed ticket for a
  delegated slice (:mod:`.issue`). Methods come from a table name -> handler
  (:attr:`AuthorityServer.methods`); other features plug in with
  :meth:`AuthorityServer.register_method` without touching the transport.
* ``GET /slices.xml?node_id=N`` and ``GET /nodes/N/slices.xml`` -- the node's slices.xml, with
  ``ETag: "<index>"`` and ``NM-Index: <index>``; ``If-None-Match`` -> 304, held first with
  ``&wait=S``. Like the original's slices.xml it is not authenticated: it holds public keys and
  resource settings only.
* ``GET /conf_files/<source>`` -- the content of a ``[[conf_files]]`` entry (:mod:`.conffiledata`),
  public too: GetSlivers names them, nodes fetch them with ``conf_files.base_url`` = this root.

The transport is the project's asyncio HTTP/1.1 server (:class:`nodemanager.http.server.HttpServer`):
one event-loop thread, no thread per connection, so 10,000 nodes can hold a blocking query at once.
Everything that costs CPU or touches the disk -- parsing a call, checking auth, stat-ing and
re-reading the data file, rendering a document, signing a ticket -- runs on a small worker pool
(:data:`WORKERS` threads); the loop only routes, registers waiters and writes answers. A change of
the data file is seen at the next request or by the watcher (a stat every
:data:`WATCH_INTERVAL` s), and wakes exactly the waiters whose node's document changed
(:mod:`.holds`, over the pure :mod:`.waits`); their answers are rendered in batches on the pool.

Request bodies are capped at 1 MiB and parsed with the hardened parser of
:mod:`nodemanager.authority.parse`. Not meant to face the Internet without a TLS-terminating proxy
in front.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import socket
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..authority.parse import MIB, loads_xmlrpc_call
from ..core.errors import (
    ConfigError,
    DocumentRejected,
    InvalidArgument,
    NodeManagerError,
    PermissionDenied,
    UnknownMethod,
)
from ..http.framing import Request, Response
from ..http.server import HttpServer
from .conffiledata import URL_PREFIX as CONF_FILES_PREFIX
from .conffiledata import read_served_file
from .datafile import AuthorityDataFile
from .documents import Snapshot
from .holds import HeldQueries, HoldRequest
from .issue import TicketIssuer
from .methods import DEFAULT_METHODS, WAIT_METHOD, MethodHandler, get_slivers_wait, not_modified, wait_request
from .model import AuthorityData, slices_xml
from .waits import WaitRegistry, wait_from_query

__all__ = ["AuthorityServer", "MethodHandler", "serve"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 * MIB
REQUEST_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 20_000
WORKERS = 4
WATCH_INTERVAL = 0.25
XMLRPC_PATHS = frozenset({"/PLCAPI/", "/PLCAPI"})
TEXT = b"text/plain; charset=utf-8"
XML = b"text/xml; charset=utf-8"

_KIND_XMLRPC, _KIND_SLICES_XML = "xmlrpc", "slices.xml"


def _text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode("utf-8"), TEXT)


def _xmlrpc_result(result: Any) -> bytes:
    return xmlrpc.client.dumps((result,), methodresponse=True, allow_none=True).encode("utf-8")


def _xmlrpc_fault(method: str, exc: NodeManagerError) -> bytes:
    log.info("event=authority-fault method=%s code=%d reason=%s", method[:80], exc.fault_code, exc)
    return xmlrpc.client.dumps(xmlrpc.client.Fault(exc.fault_code, str(exc)), methodresponse=True).encode("utf-8")


def _index_headers(index: str) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"ETag", b'"%s"' % index.encode("ascii")), (b"NM-Index", index.encode("ascii")))


def _etags(header: str) -> set[str]:
    """The entity tags of an ``If-None-Match`` header (weak ones compare equal, RFC 9110)."""
    tags = set()
    for item in header.split(","):
        item = item.strip()
        if item.startswith("W/"):
            item = item[2:]
        if len(item) >= 2 and item[0] == item[-1] == '"':
            tags.add(item[1:-1])
        elif item == "*":
            tags.add("*")
    return tags


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (at most the hard limit);
    returns the soft limit obtained (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("event=open-files-limit-unchanged wanted=%d error=%s", target, exc)
    log.info("event=open-files-limit soft=%d hard=%s", soft, "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft


class AuthorityServer:
    """The bundled authority over HTTP. ``start()`` serves from a background event-loop thread
    and returns the bound port (``port=0`` picks a free one); ``stop()`` shuts it down. Usable as
    a context manager. The data file is validated in the constructor (ConfigError)."""

    def __init__(
        self,
        config_path: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        methods: Mapping[str, MethodHandler] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.config_path = Path(config_path)
        self.source = AuthorityDataFile(self.config_path, on_reload=self._reloaded)
        #: Signs tickets; its key and certificate are loaded (or generated) on first use.
        self.tickets = TicketIssuer(self.config_path)
        #: Wall clock for ticket times (tests replace it).
        self.clock: Callable[[], float] = time.time
        self.methods: dict[str, MethodHandler] = dict(DEFAULT_METHODS)
        self.methods.update(methods or {})
        self.host = host
        self.max_connections = max_connections
        #: Draws the jitter of each wait (uniform in [0, 1]); tests pin it.
        self.rng = rng
        self._requested_port = port
        self._http: HttpServer | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._port = 0
        self._held: HeldQueries | None = None  # the event loop's side of blocking queries
        self._watcher: asyncio.Task[None] | None = None

    # --- the public surface ---------------------------------------------------------------
    def data(self) -> AuthorityData:
        """The current data (re-read if the file changed)."""
        return self.source.current()

    def snapshot(self) -> Snapshot:
        """The current data with every node's document index (re-read if the file changed)."""
        return self.source.snapshot()

    @property
    def waits(self) -> WaitRegistry:
        """Who waits for which node's document (read it from the event loop; tests peek)."""
        if self._held is None:
            raise RuntimeError("the authority server is not started")
        return self._held.registry

    def register_method(self, name: str, handler: MethodHandler) -> None:
        """Add or replace an XML-RPC method (e.g. ``GetSliceTicket``)."""
        self.methods[name] = handler

    def dispatch(self, method: str, params: Sequence[Any]) -> bytes:
        """Run one XML-RPC call and marshal its answer (a Fault for any NodeManagerError). Any
        thread but the event loop's (handlers may stat and re-read the file, or sign)."""
        try:
            handler = self.methods.get(method)
            if handler is None:
                raise UnknownMethod(f"unknown method {method[:80]!r}")
            return _xmlrpc_result(handler(self, params))
        except NodeManagerError as exc:
            return _xmlrpc_fault(method, exc)
        except Exception:
            log.exception("event=authority-method-failed method=%s", method[:80])
            return xmlrpc.client.dumps(xmlrpc.client.Fault(1, "internal error in the authority"),
                                       methodresponse=True).encode("utf-8")

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the authority server is not started")
        return self._port

    @property
    def url(self) -> str:
        """The XML-RPC endpoint (``…/PLCAPI/``) of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/PLCAPI/"

    def start(self) -> int:
        if self._http is not None:
            raise RuntimeError("the authority server is already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self._requested_port), family=family,
                                        backlog=min(self.max_connections, 4096))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror}") from exc
        self._port = int(sock.getsockname()[1])
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="nm-authority-worker")
        http = HttpServer(self._handle, methods=("GET", "HEAD", "POST"), max_request_bytes=MAX_REQUEST_BYTES,
                          read_timeout=REQUEST_TIMEOUT, max_connections=self.max_connections, name="authority")
        http.add_listener(sock, "tcp")
        self._held = HeldQueries(self.source.snapshot(), offload=self._offload, render_many=self._render_many,
                                 not_modified=self._not_modified, rng=lambda: self.rng())
        try:
            http.start()
        except BaseException:
            sock.close()
            self._pool.shutdown(wait=False)
            self._pool = None
            raise
        self._http = http
        assert http.loop is not None
        asyncio.run_coroutine_threadsafe(self._begin(), http.loop).result(10)
        log.info("event=authority-serving url=%s data=%s max_connections=%d", self.url, self.config_path,
                 self.max_connections)
        return self._port

    def stop(self) -> None:
        """Answer every held wait "not modified", stop serving, end the loop and the workers.
        Idempotent."""
        http, pool = self._http, self._pool
        if http is None:
            return
        loop = http.loop
        if loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._end(), loop).result(10)
            except Exception:  # stopping must not fail half-way
                log.exception("event=authority-stop-error")
        http.stop(grace=2.0)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._http = self._pool = None

    def __enter__(self) -> AuthorityServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- the event loop: lifecycle --------------------------------------------------------
    async def _begin(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _end(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._held is not None:
            self._held.release_all()

    async def _watch(self) -> None:
        """Stat the data file every WATCH_INTERVAL s (on the pool): a reload wakes the waiters."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                snapshot = await loop.run_in_executor(self._pool, self.source.snapshot)
                if self._held is not None:
                    self._held.adopt(snapshot)
            except RuntimeError:  # the pool is shutting down
                return
            except Exception:  # noqa: BLE001 - the watcher must survive a bad moment
                log.exception("event=authority-watch-error")

    def _offload(self, function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    # --- the event loop: requests ---------------------------------------------------------
    async def _handle(self, request: Request, body: bytes, peer: Any) -> Response:
        if request.method == "POST":
            if request.path not in XMLRPC_PATHS:
                return _text(404, "not found: XML-RPC is served at /PLCAPI/")
            outcome = await self._offload(self._call, body)
        else:
            outcome = await self._offload(self._get, request)
        if isinstance(outcome, HoldRequest):
            assert self._held is not None
            return await self._held.hold(outcome)  # type: ignore[no-any-return]
        assert isinstance(outcome, Response)
        return outcome

    def _call(self, body: bytes) -> Response | HoldRequest:
        """Worker thread: parse an XML-RPC call and answer it, or say which wait to hold."""
        try:
            method, params = loads_xmlrpc_call(body, MAX_REQUEST_BYTES)
        except DocumentRejected as exc:
            return _text(400, str(exc))
        if method == WAIT_METHOD and self.methods.get(WAIT_METHOD) is get_slivers_wait:
            snapshot = self.source.snapshot()
            try:
                wait = wait_request(snapshot, params)
            except NodeManagerError as exc:
                return Response(200, _xmlrpc_fault(method, exc))
            current = snapshot.indexes[wait.node_id]
            if current != wait.index:
                return Response(200, snapshot.getslivers_body(wait.node_id))
            return HoldRequest(_KIND_XMLRPC, wait.node_id, wait.index, wait.wait, snapshot)
        return Response(200, self.dispatch(method, params))

    def _get(self, request: Request) -> Response | HoldRequest:
        """Worker thread: a GET or HEAD (slices.xml, conf_files)."""
        path = request.path
        if path.startswith(CONF_FILES_PREFIX):  # configuration files (conffiledata), public
            content = read_served_file(self.config_path.parent / self.data().conf_files_dir, path)
            if content is None:
                return _text(404, "no such configuration file")
            return Response(200, content, b"application/octet-stream")
        query = request.query
        if path == "/slices.xml":
            raw_id: str | None = query.get("node_id")
        else:
            parts = path.split("/")
            if len(parts) != 4 or parts[0] or parts[1] != "nodes" or parts[3] != "slices.xml":
                return _text(404, "not found: try /slices.xml?node_id=N or /nodes/N/slices.xml")
            raw_id = parts[2]
        if raw_id is None or not (raw_id.isascii() and raw_id.isdigit()) or len(raw_id) > 10:
            return _text(400, "node_id must be given as a number")
        node_id = int(raw_id)
        wait = None
        if "wait" in query:
            try:
                wait = wait_from_query(query["wait"])
            except InvalidArgument as exc:
                return _text(400, str(exc))
        snapshot = self.source.snapshot()
        index = snapshot.indexes.get(node_id)
        if index is None:
            return _text(404, f"unknown node {raw_id}")
        tags = _etags(request.headers.get("if-none-match", ""))
        if index in tags or "*" in tags:
            if wait is not None:
                return HoldRequest(_KIND_SLICES_XML, node_id, index, wait, snapshot)
            return Response(304, b"", XML, _index_headers(index))
        return Response(200, slices_xml(snapshot.data, node_id), XML, _index_headers(index))

    def _not_modified(self, kind: str, index: str) -> Response:
        """The answer to a wait that ended without a change."""
        if kind == _KIND_XMLRPC:
            return Response(200, _xmlrpc_result(not_modified(index)))
        return Response(304, b"", XML, _index_headers(index))

    def _render_many(self, snapshot: Snapshot, wanted: Sequence[tuple[str, int]]) -> list[Response]:
        """Worker thread: the answers of woken waiters (or of a wait whose index was stale), from
        one snapshot. A node the data file no longer has gets what an unknown node gets."""
        out = []
        for kind, node_id in wanted:
            index = snapshot.indexes.get(node_id)
            if kind == _KIND_SLICES_XML:
                out.append(_text(404, f"unknown node {node_id}") if index is None else
                           Response(200, slices_xml(snapshot.data, node_id), XML, _index_headers(index)))
            elif index is None:
                out.append(Response(200, _xmlrpc_fault(WAIT_METHOD, PermissionDenied(
                    f"node {node_id} failed to authenticate"))))
            else:
                out.append(Response(200, snapshot.getslivers_body(node_id)))
        return out

    # --- reloads -----------------------------------------------------------------------------
    def _reloaded(self, old: Snapshot, new: Snapshot) -> None:
        """Any thread, under the data file's lock (so in reload order): hand the new snapshot
        to the event loop."""
        http, held = self._http, self._held
        loop = http.loop if http is not None else None
        if loop is None or held is None:
            return
        try:
            loop.call_soon_threadsafe(held.adopt, new)
        except RuntimeError:  # the loop is closed: stopping
            pass


def serve(
    config_path: Path,
    host: str,
    port: int,
    *,
    ready: threading.Event | None = None,
    stop: threading.Event | None = None,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """Serve until ``stop`` is set (forever without one; the caller's signal handling ends it).
    ``ready`` is set once the socket is listening. Raises the open-files limit first, so that
    ``max_connections`` held waits fit (each is one file descriptor)."""
    raise_open_files_limit(max_connections + 256)
    server = AuthorityServer(config_path, host, port, max_connections=max_connections)
    server.start()
    try:
        if ready is not None:
            ready.set()
        (stop if stop is not None else threading.Event()).wait()
    finally:
        server.stop()
