"""Clients of the node manager API: over the local Unix socket, TCP, and XML-RPC over SSH.

All of them keep the ``xmlrpc.client.ServerProxy`` calling style (``api.GetXIDs()``), and all parse
responses with the project's hardened XML-RPC decoder (:mod:`nodemanager.http.xmlrpc`: defusedxml's
expat parser with DTDs forbidden): the answer comes from another party (over SSH, from another
machine), so it gets the same care as a request. Nothing is monkey-patched.

Errors, in one tree:

* ``xmlrpc.client.Fault``: the node answered with a fault (codes in api.md); over SSH also the
  Fault ``forward_api_calls`` writes when the daemon behind it cannot be reached;
* :class:`SshTransportError`: ssh itself failed (exit 255: unreachable host, refused key, host key
  mismatch), timed out, or produced no or non-XML-RPC output; it carries ssh's stderr tail;
* :class:`MalformedResponse`: an HTTP transport got a body that is not an XML-RPC response;
* ``OSError`` / ``xmlrpc.client.ProtocolError``: the HTTP transports could not connect (or the
  connection broke) or got an HTTP error status. HTTP is spoken by the project's own client
  (:mod:`nodemanager.http.client`).

XML-RPC over SSH runs the system ``ssh`` client (the user's ssh config, agent and known_hosts
apply), with ``-T`` and ``BatchMode=yes`` by default so it never waits for a password prompt.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
import xmlrpc.client
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..http.client import Connection, HttpClientError, ResponseTooLarge
from ..http.xmlrpc import RESPONSE, MalformedXmlRpc, decode

__all__ = [
    "MalformedResponse", "SafeTransport", "SshTransport", "SshTransportError", "UnixTransport",
    "XmlRpcOverSsh", "loads_response", "local_proxy", "tcp_proxy",
]

#: Bounds on what a client accepts from a node (a GetSSHKeys of thousands of slivers fits easily).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
STDERR_TAIL = 600
DEFAULT_TIMEOUT = 300.0
_PIPE_CHUNK = 65536
#: What "no timeout" (``timeout=None``) becomes: a bound nobody reaches.
_NO_TIMEOUT = 1e9


class MalformedResponse(xmlrpc.client.ResponseError):
    """The body is not an XML-RPC response (not XML, a DTD, not a methodResponse, bad values)."""


class SshTransportError(xmlrpc.client.Error):
    """ssh could not deliver the call or brought back no XML-RPC answer.

    ``returncode`` is ssh's exit status (None on a timeout or when ssh could not be started) and
    ``stderr`` the tail of what ssh printed (the reason, e.g. ``Permission denied (publickey)``)."""

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return self.message


def loads_response(data: bytes, *, use_builtin_types: bool = False) -> tuple[Any, ...]:
    """The params of an XML-RPC response body; raises ``Fault`` for a fault response and
    :class:`MalformedResponse` for anything that is not a methodResponse.

    Decoded by the project's one hardened decoder (:mod:`nodemanager.http.xmlrpc`, policy
    ``RESPONSE``); without ``use_builtin_types`` binary and date values come back as
    ``xmlrpc.client.Binary`` and ``DateTime``, as ``xmlrpc.client.loads`` gives them."""
    try:
        decoded = decode(data, RESPONSE)
    except MalformedXmlRpc as exc:
        raise MalformedResponse(f"malformed XML-RPC response: {exc}") from exc
    if decoded.fault is not None:
        fault = decoded.fault
        if not isinstance(fault, dict) or not {"faultCode", "faultString"} <= fault.keys():
            raise MalformedResponse("malformed XML-RPC response: a fault without faultCode and faultString")
        raise xmlrpc.client.Fault(fault["faultCode"], fault["faultString"])
    return decoded.params if use_builtin_types else tuple(_stdlib_types(value) for value in decoded.params)


def _stdlib_types(value: Any) -> Any:
    """``value`` with bytes and datetimes as ``xmlrpc.client.Binary`` and ``DateTime``."""
    if isinstance(value, bytes):
        return xmlrpc.client.Binary(value)
    if isinstance(value, datetime):
        return xmlrpc.client.DateTime(value)
    if isinstance(value, list):
        return [_stdlib_types(item) for item in value]
    if isinstance(value, dict):
        return {key: _stdlib_types(item) for key, item in value.items()}
    return value


class SafeTransport(xmlrpc.client.Transport):
    """HTTP transport whose responses are size-capped and parsed with DTDs forbidden. Speaks
    HTTP through the project's own client (:class:`nodemanager.http.client.Connection`: one
    kept-alive connection, reopened when the server closed it between calls)."""

    def __init__(self, *, timeout: float | None = DEFAULT_TIMEOUT, use_builtin_types: bool = False,
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        super().__init__(use_builtin_types=use_builtin_types)
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._kept: tuple[str, Connection] | None = None

    def _new_connection(self, host: str) -> Connection:
        return Connection(f"http://{host}/", timeout=self._seconds(), max_body=self.max_response_bytes)

    def _seconds(self) -> float:
        return _NO_TIMEOUT if self.timeout is None else float(self.timeout)

    def request(self, host: Any, handler: str, request_body: bytes, verbose: bool = False) -> tuple[Any, ...]:
        """ServerProxy's entry point: POST ``request_body`` to ``handler``; the decoded answer.

        An HTTP status other than 200 is ``xmlrpc.client.ProtocolError``; a connection failure
        the ``OSError`` behind it (e.g. ``FileNotFoundError`` for a missing socket)."""
        host_text = host if isinstance(host, str) else host[0]
        if self._kept is None or self._kept[0] != host_text:
            self.close()
            self._kept = host_text, self._new_connection(host_text)
        connection = self._kept[1]
        body = request_body.encode("utf-8") if isinstance(request_body, str) else bytes(request_body)
        try:
            response = connection.request("POST", handler, body=body, headers=(("User-Agent", self.user_agent),))
        except ResponseTooLarge as exc:
            raise MalformedResponse(f"response larger than {self.max_response_bytes} bytes") from exc
        except HttpClientError as exc:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__
            if isinstance(cause, OSError):  # the same kind of OSError, with the whole story
                errno = cause.errno
                raise (type(cause)(errno, str(exc)) if errno is not None else type(cause)(str(exc))) from exc
            raise OSError(str(exc)) from exc
        if response.status != 200:
            raise xmlrpc.client.ProtocolError(host_text + handler, response.status, f"HTTP {response.status}",
                                              dict(response.headers))
        return loads_response(response.body, use_builtin_types=self._use_builtin_types)

    def close(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None:
            kept[1].close()


class UnixTransport(SafeTransport):
    """HTTP over the Unix stream socket at ``socket_path`` (the daemon identifies the caller with
    ``SO_PEERCRED``). The URI's host part is ignored. Keeps the connection alive between calls."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float | None = DEFAULT_TIMEOUT,
                 use_builtin_types: bool = False, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        super().__init__(timeout=timeout, use_builtin_types=use_builtin_types,
                         max_response_bytes=max_response_bytes)
        self.socket_path = os.fspath(socket_path)

    def _new_connection(self, host: str) -> Connection:
        return Connection("http://localhost/", timeout=self._seconds(), max_body=self.max_response_bytes,
                          unix_socket=self.socket_path)


def local_proxy(socket_path: str | os.PathLike[str], *,
                timeout: float | None = DEFAULT_TIMEOUT) -> xmlrpc.client.ServerProxy:
    """A ServerProxy for the daemon's Unix socket."""
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport(socket_path, timeout=timeout))


def tcp_proxy(address: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> xmlrpc.client.ServerProxy:
    """A ServerProxy for the daemon's TCP listener at ``HOST:PORT`` (``[::1]:812`` for IPv6)."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"not a HOST:PORT address: {address!r}")
    return xmlrpc.client.ServerProxy(f"http://{host}:{port}/RPC2", transport=SafeTransport(timeout=timeout))


class SshTransport(xmlrpc.client.Transport):
    """Carries one XML-RPC request per ``ssh TARGET`` run: the body on stdin, the answer on stdout.

    ``ssh_options`` come first on the command line, so they override the defaults added after
    them (ssh keeps the first value of an option): ``-T`` and, with ``batch_mode``,
    ``-o BatchMode=yes``. ``timeout`` bounds the whole call, connection included."""

    def __init__(self, target: str, *, ssh_options: Sequence[str] = (), ssh_command: str | Sequence[str] = "ssh",
                 timeout: float = DEFAULT_TIMEOUT, batch_mode: bool = True, use_builtin_types: bool = False,
                 max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        super().__init__(use_builtin_types=use_builtin_types)
        if not target:
            raise ValueError("an ssh target (USER@HOST) is needed")
        self.target = target
        self.ssh_options = [str(option) for option in ssh_options]
        self.ssh_command = [ssh_command] if isinstance(ssh_command, str) else [str(p) for p in ssh_command]
        self.timeout = float(timeout)
        self.batch_mode = batch_mode
        self.max_response_bytes = max_response_bytes

    def argv(self) -> list[str]:
        defaults = ["-T"] + (["-o", "BatchMode=yes"] if self.batch_mode else [])
        return [*self.ssh_command, *self.ssh_options, *defaults, "--", self.target]

    def request(self, host: Any, handler: str, request_body: bytes, verbose: bool = False) -> tuple[Any, ...]:
        """ServerProxy's entry point; ``host`` and ``handler`` are ignored (the target is fixed)."""
        body = request_body.encode("utf-8") if isinstance(request_body, str) else bytes(request_body)
        returncode, stdout, stderr = self._run(body)
        where = f"ssh {self.target}"
        if returncode == 255:
            raise SshTransportError(f"{where} failed (exit 255): {stderr or 'no message from ssh'}",
                                    returncode=returncode, stderr=stderr)
        if not stdout.strip():
            raise SshTransportError(f"{where} gave no answer (exit {returncode}): {stderr or 'no message from ssh'}",
                                    returncode=returncode, stderr=stderr)
        try:
            return loads_response(stdout, use_builtin_types=self._use_builtin_types)
        except MalformedResponse as exc:
            start = stdout[:80].decode("utf-8", "replace")
            raise SshTransportError(f"{where} did not answer with XML-RPC (exit {returncode}, output starts "
                                    f"{start!r}): {exc}; ssh said: {stderr or 'nothing'}",
                                    returncode=returncode, stderr=stderr) from exc

    def _run(self, body: bytes) -> tuple[int, bytes, str]:
        """Run ssh with ``body`` on stdin; ``(exit status, stdout, stderr tail)``, with the
        output bounded and the whole run bounded by ``timeout``."""
        argv = self.argv()
        try:
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            raise SshTransportError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        deadline = time.monotonic() + self.timeout
        out, err = bytearray(), bytearray()
        assert process.stdin and process.stdout and process.stderr
        pending = memoryview(body)
        try:
            with selectors.DefaultSelector() as selector:
                if pending:
                    os.set_blocking(process.stdin.fileno(), False)
                    selector.register(process.stdin, selectors.EVENT_WRITE)
                else:
                    process.stdin.close()
                selector.register(process.stdout, selectors.EVENT_READ, out)
                selector.register(process.stderr, selectors.EVENT_READ, err)
                while selector.get_map():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise self._timed_out(process, err)
                    for key, _ in selector.select(remaining):
                        if key.fileobj is process.stdin:
                            try:
                                pending = pending[os.write(key.fd, pending[:_PIPE_CHUNK]):]
                            except BlockingIOError:
                                continue
                            except BrokenPipeError:
                                pending = pending[:0]
                            if not pending:
                                selector.unregister(process.stdin)
                                process.stdin.close()
                            continue
                        chunk = os.read(key.fd, _PIPE_CHUNK)
                        if not chunk:
                            selector.unregister(key.fileobj)
                            continue
                        key.data.extend(chunk)
                        if key.data is err and len(err) > 4 * STDERR_TAIL:
                            del err[:-STDERR_TAIL]
                        if key.data is out and len(out) > self.max_response_bytes:
                            process.kill()
                            process.wait()
                            raise SshTransportError(f"ssh {self.target}: answer larger than "
                                                    f"{self.max_response_bytes} bytes", stderr=_tail(err))
            try:
                returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise self._timed_out(process, err) from None
        finally:
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()
            if process.returncode is None:
                process.kill()
                process.wait()
        return returncode, bytes(out), _tail(err)

    def _timed_out(self, process: subprocess.Popen[bytes], err: bytearray) -> SshTransportError:
        process.kill()
        process.wait()
        return SshTransportError(f"ssh {self.target} timed out after {self.timeout:g}s", stderr=_tail(err))


def _tail(data: bytearray | bytes) -> str:
    return bytes(data).decode("utf-8", "replace").strip()[-STDERR_TAIL:]


class XmlRpcOverSsh(xmlrpc.client.ServerProxy):
    """``ServerProxy`` calling style over SSH (the seed's ``XmlRpcOverSsh``, with clear errors)::

        api = XmlRpcOverSsh("ctl@node", ssh_options=["-p", "2222", "-i", key])
        api.GetXIDs()

    Faults stay ``xmlrpc.client.Fault``; ssh failures raise :class:`SshTransportError`. The
    transport is ``api("transport")``. No other attribute is set on the proxy: any attribute name
    is a remote method."""

    def __init__(self, target: str, *, ssh_options: Sequence[str] = (), ssh_command: str | Sequence[str] = "ssh",
                 timeout: float = DEFAULT_TIMEOUT, batch_mode: bool = True, use_builtin_types: bool = False) -> None:
        transport = SshTransport(target, ssh_options=ssh_options, ssh_command=ssh_command, timeout=timeout,
                                 batch_mode=batch_mode, use_builtin_types=use_builtin_types)
        super().__init__("http://xmlrpc-over-ssh/", transport=transport)

    def __repr__(self) -> str:
        return f"<XmlRpcOverSsh for {self('transport').target}>"

    __str__ = __repr__
