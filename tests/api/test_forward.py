"""forward_api_calls against a tiny real HTTP server on a Unix socket (written here, not the daemon).

The program is run the way sshd runs it -- a separate process, the request on stdin -- except for
a few in-process calls of ``main`` that check the same contract cheaply.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodemanager.api import forward

REQUEST = xmlrpc.client.dumps(("site_alpha",), "GetRSpec").encode()
RESPONSE = xmlrpc.client.dumps(({"cpu_share": 32, "note": "a & b <c>"},), methodresponse=True).encode()

Responder = Callable[[bytes, bytes], bytes]


def content_length(status: str = "200 OK", body: bytes = RESPONSE) -> Responder:
    return lambda head, request: (f"HTTP/1.1 {status}\r\nContent-Type: text/xml\r\n"
                                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def close_delimited(head: bytes, request: bytes) -> bytes:
    return b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n" + RESPONSE


def chunked(head: bytes, request: bytes) -> bytes:
    middle = len(RESPONSE) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (RESPONSE[:middle], RESPONSE[middle:]))
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


class TinyHttpServer:
    """Accepts connections on a Unix socket one at a time, records each request (head, body) and
    writes whatever ``respond`` returns, then closes the connection."""

    def __init__(self, path: Path, respond: Responder) -> None:
        self.path = path
        self.respond = respond
        self.requests: list[tuple[bytes, bytes]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.listener.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.requests.append((head, body))
                conn.sendall(self.respond(head, body))

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


Serve = Callable[[Responder], "TinyHttpServer"]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    servers: list[TinyHttpServer] = []

    def start(respond: Responder) -> TinyHttpServer:
        server = TinyHttpServer(tmp_path / f"api{len(servers)}.sock", respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def run_forward(args: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "nodemanager.api.forward", *args], input=stdin,
                          capture_output=True, timeout=60, check=False)


def fault_of(body: bytes) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(body)
    return caught.value


@pytest.mark.parametrize("respond", [content_length(), close_delimited, chunked],
                         ids=["content-length", "close-delimited", "chunked"])
def test_stdout_is_exactly_the_response_body(serve: Serve, respond: Responder) -> None:
    server = serve(respond)
    done = run_forward(["--socket", str(server.path)], REQUEST)
    assert done.returncode == 0, done.stderr
    assert done.stdout == RESPONSE
    assert xmlrpc.client.loads(done.stdout)[0] == ({"cpu_share": 32, "note": "a & b <c>"},)
    assert done.stderr == b""
    (head, body), = server.requests
    assert body == REQUEST
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("POST ") and lines[0].endswith(" HTTP/1.1")
    assert f"Content-Length: {len(REQUEST)}" in lines and "Connection: close" in lines


def test_socket_option_in_equals_form_and_a_fault_answer_exits_zero(serve: Serve) -> None:
    fault = xmlrpc.client.dumps(xmlrpc.client.Fault(108, "permission denied"), methodresponse=True).encode()
    server = serve(content_length(body=fault))
    done = run_forward([f"--socket={server.path}", "--timeout", "5"], REQUEST)
    assert done.returncode == 0
    assert done.stdout == fault


@pytest.mark.parametrize("args", [["-c", "ls -l"], ["--socket", "/x", "-c", "id"], ["-c"], ["--bogus"], ["extra"],
                                  ["--socket"], ["--timeout", "soon"]])
def test_commands_and_unknown_arguments_are_refused_with_nothing_on_stdout(
        serve: Serve, args: list[str]) -> None:
    server = serve(content_length())
    args = [a.replace("/x", str(server.path)) for a in args]
    done = run_forward(args, REQUEST)
    assert done.returncode == forward.EXIT_REFUSED == 1
    assert done.stdout == b""
    assert b"this account only speaks XML-RPC over SSH: pipe a request to `ssh user@node`" in done.stderr
    assert server.requests == []


def test_a_request_over_one_mebibyte_gets_fault_102_and_is_not_sent(serve: Serve) -> None:
    server = serve(content_length())
    done = run_forward(["--socket", str(server.path)], b"x" * (forward.MAX_REQUEST_BYTES + 1))
    assert done.returncode == forward.EXIT_TOO_LARGE != 0
    fault = fault_of(done.stdout)
    assert (fault.faultCode, fault.faultString) == (102, "request larger than 1048576 bytes")
    assert server.requests == []


def test_a_request_of_exactly_one_mebibyte_is_forwarded(serve: Serve) -> None:
    server = serve(content_length())
    body = b"y" * forward.MAX_REQUEST_BYTES
    done = run_forward(["--socket", str(server.path)], body)
    assert done.returncode == 0 and done.stdout == RESPONSE
    assert server.requests[0][1] == body


def test_server_down_gives_nonzero_exit_a_message_and_a_fault_body(tmp_path: Path) -> None:
    missing = tmp_path / "absent.sock"
    done = run_forward(["--socket", str(missing)], REQUEST)
    assert done.returncode == forward.EXIT_TRANSPORT != 0
    assert b"cannot reach the node manager API" in done.stderr and str(missing).encode() in done.stderr
    fault = fault_of(done.stdout)
    assert fault.faultCode == 1 and "cannot reach the node manager API" in fault.faultString


def test_a_socket_nobody_listens_on_is_a_transport_error(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    done = run_forward(["--socket", str(path)], REQUEST)
    assert done.returncode == forward.EXIT_TRANSPORT
    assert "refused" in fault_of(done.stdout).faultString.lower()


@pytest.mark.parametrize(("respond", "code", "words"), [
    (content_length("500 Internal Server Error", b"oops"), 1, "HTTP 500"),
    (content_length("413 Payload Too Large", b""), 102, "HTTP 413"),
    (lambda head, body: b"", 1, "closed the connection"),
    (lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\nshort", 1, "cut short"),
    (lambda head, body: b"garbage\r\n\r\n", 1, "malformed HTTP status line"),
], ids=["500", "413", "no-answer", "short-body", "garbage"])
def test_bad_http_answers_become_faults(serve: Serve, respond: Responder,
                                        code: int, words: str) -> None:
    server = serve(respond)
    stdout, stderr = io.BytesIO(), io.StringIO()
    status = forward.main(["--socket", str(server.path)], stdin=io.BytesIO(REQUEST), stdout=stdout, stderr=stderr)
    assert status == forward.EXIT_TRANSPORT
    fault = fault_of(stdout.getvalue())
    assert fault.faultCode == code and words in fault.faultString
    assert words in stderr.getvalue()


def test_fault_body_escapes_markup_and_control_characters() -> None:
    fault = fault_of(forward.fault_body(104, "a <b> & c\x01d"))
    assert (fault.faultCode, fault.faultString) == (104, "a <b> & c?d")


def test_parse_arguments() -> None:
    assert forward.parse_arguments([]) == (forward.DEFAULT_SOCKET, forward.DEFAULT_TIMEOUT)
    assert forward.parse_arguments(["--socket", "/s", "--timeout=2.5"]) == ("/s", 2.5)
    assert forward.parse_arguments(["--timeout", "0"]) is None
    assert forward.parse_arguments(["--socket="]) is None


def test_startup_imports_stay_minimal() -> None:
    """It runs once per SSH call: none of the costly modules may be imported."""
    probe = ("import sys, nodemanager.api.forward; "
             "print(' '.join(m for m in ('socket', 'typing', 'argparse', 'xmlrpc.client', 'logging') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
