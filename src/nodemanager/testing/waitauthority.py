"""WaitAuthority: a tiny authority on raw sockets that speaks the blocking-query protocol.

The node's side of blocking queries is tested against it (the bundled authority is tested on its
own): one node's document, versioned by an index, served as ``GetSlivers`` / ``GetSliversWait``
over XML-RPC and as ``slices.xml`` with ``NM-Index`` and conditional waits (authority.md
"Blocking queries"). Knobs make it misbehave the ways a node must survive:

* ``offer_index=False`` -- a real PLCAPI or a static server: no index, ``GetSliversWait``
  answered with a fault (and counted: the node must never send one);
* ``hang_waits=True`` -- accepts a wait, reads it, never answers (a dead middlebox);
* ``fail_waits=N`` -- answers the next N waits with HTTP 503.

Every request is recorded as ``(kind, detail)``: ``("GetSlivers", None)``,
``("GetSliversWait", (index, wait))``, ``("GET", (query, if_none_match))``. BootAuth is checked
with the shared verifier, so a node that signs the wrong parameters fails here as it would in
production. Threads: one accept loop, one thread per connection; :meth:`stop` closes everything.
"""

from __future__ import annotations

import socket
import threading
import xmlrpc.client
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..authority.auth import verify_hmac_auth
from ..core.errors import PermissionDenied

__all__ = ["WaitAuthority"]

_MAX_HEAD = 16 * 1024


class WaitAuthority:
    """One node's documents (node ``node_id``, key ``node_key``) behind a blocking-query server."""

    def __init__(self, *, node_id: int = 1, node_key: str = "node-key", offer_index: bool = True,
                 hang_waits: bool = False, fail_waits: int = 0) -> None:
        self.node_id = node_id
        self.node_key = node_key
        self.offer_index = offer_index
        self.hang_waits = hang_waits
        self.fail_waits = fail_waits
        self.requests: list[tuple[str, Any]] = []
        self.held = 0  # waits currently held
        self._cond = threading.Condition()
        self._version = 1
        self._slivers: list[dict[str, Any]] = []
        self._timestamp = 1000
        self._stopping = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self.port = int(self._listener.getsockname()[1])

    # --- what tests do ------------------------------------------------------------------------
    @property
    def xmlrpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/PLCAPI/"

    @property
    def slices_xml_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/slices.xml"

    @property
    def index(self) -> str:
        return f"v{self._version}"

    def set_slivers(self, slivers: Sequence[dict[str, Any]]) -> None:
        """Replace the node's slivers (a new timestamp and index); held waits answer at once."""
        with self._cond:
            self._slivers = list(slivers)
            self._timestamp += 1
            self._version += 1
            self._cond.notify_all()

    def count(self, kind: str) -> int:
        with self._cond:
            return sum(1 for k, _ in self.requests if k == kind)

    def start(self) -> WaitAuthority:
        thread = threading.Thread(target=self._accept, name="wait-authority", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            connections = list(self._connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> WaitAuthority:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # --- serving ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                if self._stopping:
                    conn.close()
                    return
                self._connections.add(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = _read_request(conn)
            if request is not None:
                answer = self._answer(*request)
                if answer is not None:
                    conn.sendall(answer)
        except OSError:
            pass
        finally:
            with self._cond:
                self._connections.discard(conn)
            conn.close()

    def _document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"timestamp": self._timestamp, "node_id": self.node_id, "slivers": self._slivers}
        if self.offer_index:
            document["nm_index"] = self.index
        return document

    def _hold(self, index: str, wait: int) -> bool:
        """Wait (the condition held) until the document leaves ``index`` or ``wait`` ends;
        True when it changed. A hanging server holds until it stops."""
        self.held += 1
        try:
            if self.hang_waits:
                self._cond.wait_for(lambda: self._stopping)
                return False
            self._cond.wait_for(lambda: self._stopping or self.index != index, timeout=wait)
            return self.index != index
        finally:
            self.held -= 1

    def _answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> bytes | None:
        parts = urlsplit(target)
        if method == "GET" and parts.path.endswith(".xml"):
            return self._slices_xml(parse_qs(parts.query), headers.get("if-none-match"))
        if method != "POST":
            return _response(405, b"", {})
        params, name = xmlrpc.client.loads(body)
        with self._cond:
            if name == "GetSlivers":
                self.requests.append(("GetSlivers", None))
                return self._xmlrpc(params, (), lambda: self._document())
            if name == "GetSliversWait" and len(params) == 3:
                self.requests.append(("GetSliversWait", (params[1], params[2])))
                if not self.offer_index:
                    return _fault(-32601, "method GetSliversWait is not supported")
                if self.fail_waits > 0:
                    self.fail_waits -= 1
                    return _response(503, b"busy", {})
                return self._xmlrpc(params, params[1:], lambda: self._wait(str(params[1]), int(params[2])))
        return _fault(-32601, f"unknown method {name}")

    def _xmlrpc(self, params: tuple[Any, ...], signed: Sequence[Any], produce: Any) -> bytes | None:
        try:
            verify_hmac_auth(params[0] if params else None, {self.node_id: self.node_key}, list(signed))
        except PermissionDenied as exc:
            return _fault(103, str(exc))
        value = produce()
        if value is None:
            return None
        return _response(200, xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode(), {})

    def _wait(self, index: str, wait: int) -> dict[str, Any] | None:
        changed = self._hold(index, wait) if index == self.index else True
        if self._stopping:
            return None
        if changed:
            return self._document()
        return {"nm_index": index, "nm_not_modified": True}

    def _slices_xml(self, query: dict[str, list[str]], if_none_match: str | None) -> bytes | None:
        wait = int(query["wait"][0]) if "wait" in query else None
        with self._cond:
            self.requests.append(("GET", (query, if_none_match)))
            if wait is not None and self.fail_waits > 0:
                self.fail_waits -= 1
                return _response(503, b"busy", {})
            presented = (if_none_match or "").strip('"')
            if wait is not None and presented == self.index:
                changed = self._hold(presented, wait)
                if self._stopping:
                    return None
                if not changed:
                    return _response(304, b"", {"ETag": f'"{presented}"', "NM-Index": presented})
            slivers = "".join(
                f'<slice name="{s["name"]}" id="{s["slice_id"]}" instantiation="{s["instantiation"]}" '
                f'expires="{s["expires"]}"/>' for s in self._slivers
            )
            body = f'<slices timestamp="{self._timestamp}" node_id="{self.node_id}">{slivers}</slices>'.encode()
            extra = {"ETag": f'"{self.index}"', "NM-Index": self.index} if self.offer_index else {"ETag": '"static"'}
            return _response(200, body, extra)


def _read_request(conn: socket.socket) -> tuple[str, str, dict[str, str], bytes] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk or len(data) > _MAX_HEAD:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        body += chunk
    return method, target, headers, body[:length]


def _response(status: int, body: bytes, headers: dict[str, str]) -> bytes:
    reason = {200: "OK", 304: "Not Modified", 405: "Method Not Allowed", 503: "Service Unavailable"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}", "Connection: close", "Content-Type: text/xml"]
    if status != 304:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _fault(code: int, message: str) -> bytes:
    return _response(200, xmlrpc.client.dumps(xmlrpc.client.Fault(code, message), methodresponse=True).encode(), {})
