"""``forward_api_calls``: the login shell of delegate (``nm-controller``) accounts.

``ssh CONTROLLER@node < request.xml`` makes sshd start this program (through the generated wrapper
of :mod:`nodemanager.backends.delegate`, which adds ``--socket PATH``) with the request on stdin.
It reads one XML-RPC request body until EOF, POSTs it to the node manager's Unix socket as the
delegate account's uid (so the daemon identifies the caller with ``SO_PEERCRED``), and writes the
XML-RPC response body -- and nothing else -- to stdout (api.md "Transports").

Contract:

* exit 0: the daemon answered; stdout is its response body (which may itself be a Fault);
* ``-c COMMAND`` (what sshd passes for ``ssh host COMMAND``, sftp and every other subsystem) or
  any unknown argument: a message on stderr, nothing on stdout, exit 1 (delegate accounts get no
  shell);
* a request over :data:`MAX_REQUEST_BYTES`: Fault 102 on stdout, exit 3;
* the daemon cannot be reached or answers with something other than HTTP 200: a message on
  stderr, a Fault body on stdout (so XML-RPC clients still get a parseable answer), exit 2.

It runs once per SSH call, so start-up time matters: only ``sys``, the C ``_socket`` module and
the project's HTTP framing (:mod:`nodemanager.http.framing`, which imports only ``time``) are
imported (measured: ``typing`` and ``socket`` cost ~7 ms each, ``argparse`` ~8 ms, ``xmlrpc.client``
~25 ms, ``dataclasses`` ~23 ms, ``_socket`` 0.1 ms), arguments are parsed by hand and the Fault
body is built by hand.
No environment variable is consulted: a login shell's environment is the client's to choose.
"""

from __future__ import annotations

import sys

try:
    import _socket as _sock
except ImportError:  # pragma: no cover - other Python implementations
    import socket as _sock  # type: ignore[no-redef]

from ..http.framing import BodyTooLarge, ProtocolError, encode_request
from ..http.responses import ResponseCutShort, ResponseReader

TYPE_CHECKING = False  # typing itself costs ~7 ms to import: only type checkers read this branch
if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

DEFAULT_SOCKET = "/run/nodemanager/api.sock"
MAX_REQUEST_BYTES = 1048576
#: The daemon's answer is trusted more than a request, but a bound keeps a bug from eating memory.
MAX_RESPONSE_BYTES = 64 * 1048576
MAX_HEADER_BYTES = 65536
DEFAULT_TIMEOUT = 300.0
REQUEST_PATH = "/RPC2"

EXIT_OK, EXIT_REFUSED, EXIT_TRANSPORT, EXIT_TOO_LARGE = 0, 1, 2, 3
FAULT_INVALID_ARGUMENT, FAULT_INTERNAL = 102, 1

REFUSAL = "this account only speaks XML-RPC over SSH: pipe a request to `ssh user@node`"
USAGE = "usage: forward_api_calls [--socket PATH] [--timeout SECONDS] < request.xml"


class TransportError(Exception):
    """The daemon could not be reached, or its answer was not a usable HTTP response."""

    def __init__(self, message: str, fault_code: int = FAULT_INTERNAL) -> None:
        super().__init__(message)
        self.fault_code = fault_code


def fault_body(code: int, message: str) -> bytes:
    """An XML-RPC fault response, in the layout ``xmlrpc.client.dumps`` produces."""
    text = "".join(c if c >= " " or c in "\t\n\r" else "?" for c in message)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        "<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n"
        f"<member>\n<name>faultCode</name>\n<value><int>{int(code)}</int></value>\n</member>\n"
        f"<member>\n<name>faultString</name>\n<value><string>{text}</string></value>\n</member>\n"
        "</struct></value>\n</fault>\n</methodResponse>\n"
    ).encode("utf-8")


def parse_arguments(argv: list[str]) -> tuple[str, float] | None:
    """``(socket path, timeout)`` from ``--socket PATH`` / ``--timeout S`` (also ``--opt=value``);
    None for anything else, ``-c COMMAND`` included."""
    socket_path, timeout = DEFAULT_SOCKET, DEFAULT_TIMEOUT
    i = 0
    while i < len(argv):
        option, has_value, value = argv[i].partition("=")
        if option not in ("--socket", "--timeout"):
            return None
        if not has_value:
            if i + 1 >= len(argv):
                return None
            i += 1
            value = argv[i]
        if option == "--socket":
            if not value:
                return None
            socket_path = value
        else:
            try:
                timeout = float(value)
            except ValueError:
                return None
            if not 0 < timeout < 1e6:
                return None
        i += 1
    return socket_path, timeout


def build_request(body: bytes) -> bytes:
    return encode_request("POST", REQUEST_PATH, host="localhost", body=body,
                          headers=(("User-Agent", "forward_api_calls"),), keep_alive=False)


def read_response(sock: _sock.socket) -> tuple[int, str, bytes]:
    """``(status, reason, body)`` of one HTTP/1.x response (framing:
    :class:`nodemanager.http.responses.ResponseReader`): Content-Length, chunked, or
    close-delimited bodies, at most ``MAX_RESPONSE_BYTES``."""
    reader = ResponseReader(max_body=MAX_RESPONSE_BYTES, max_head=MAX_HEADER_BYTES)
    try:
        while not reader.done:
            chunk = sock.recv(65536)
            if chunk:
                reader.feed(chunk)
            else:
                reader.end_of_stream()
    except ResponseCutShort as exc:
        raise TransportError("the node manager's response was cut short" if exc.answered
                             else "the node manager closed the connection before answering") from None
    except BodyTooLarge:
        raise TransportError(f"response larger than {MAX_RESPONSE_BYTES} bytes") from None
    except ProtocolError as exc:
        raise TransportError(f"malformed HTTP response: {exc}") from None
    head = reader.head
    assert head is not None
    return head.status, head.reason, reader.body


def forward(body: bytes, socket_path: str, timeout: float) -> bytes:
    """POST ``body`` to the daemon's Unix socket and return the response body (HTTP 200 only)."""
    sock = _sock.socket(_sock.AF_UNIX, _sock.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            sock.sendall(build_request(body))
            status, reason, response = read_response(sock)
        except TimeoutError:
            raise TransportError(f"the node manager did not answer within {timeout:g}s") from None
        except OSError as exc:
            raise TransportError(
                f"cannot reach the node manager API at {socket_path}: {exc.strerror or exc}"
            ) from None
    finally:
        sock.close()
    if status == 413:
        raise TransportError("request larger than the node manager accepts (HTTP 413)", FAULT_INVALID_ARGUMENT)
    if status != 200:
        raise TransportError(f"the node manager API answered HTTP {status} {reason}".rstrip())
    return response


def main(
    argv: list[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Entry point of the ``forward_api_calls`` console script; returns the exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    stdin = sys.stdin.buffer if stdin is None else stdin
    stdout = sys.stdout.buffer if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    parsed = parse_arguments(arguments)
    if parsed is None:
        stderr.write(f"forward_api_calls: {REFUSAL}\n{USAGE}\n")
        return EXIT_REFUSED
    socket_path, timeout = parsed
    body = stdin.read(MAX_REQUEST_BYTES + 1)
    if len(body) > MAX_REQUEST_BYTES:
        message = f"request larger than {MAX_REQUEST_BYTES} bytes"
        stderr.write(f"forward_api_calls: {message}\n")
        return _answer(stdout, fault_body(FAULT_INVALID_ARGUMENT, message), EXIT_TOO_LARGE)
    try:
        response = forward(body, socket_path, timeout)
    except TransportError as exc:
        stderr.write(f"forward_api_calls: {exc}\n")
        return _answer(stdout, fault_body(exc.fault_code, str(exc)), EXIT_TRANSPORT)
    return _answer(stdout, response, EXIT_OK)


def _answer(stdout: BinaryIO, data: bytes, status: int) -> int:
    try:
        stdout.write(data)
        stdout.flush()
    except BrokenPipeError:
        return EXIT_TRANSPORT
    return status


if __name__ == "__main__":
    sys.exit(main())
