"""Hostile requests against a real ApiServer: each gets a Fault or a closed connection, the
dispatcher never sees a malformed request, and the server keeps answering normal calls.

Raw sockets are used so the tests control every byte (and every silence) the client sends.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.identity import PeerIdentity
from nodemanager.api.server import ApiServer
from nodemanager.core.errors import UnknownMethod
from nodemanager.testing.rawhttp import connect_tcp, read_response

READ_TIMEOUT = 0.5


class RecordingDispatch:
    """``echo`` returns its params; anything else is an unknown method. Records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._lock = threading.Lock()

    def __call__(self, method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
        with self._lock:
            self.calls.append((method, params))
        if method == "echo":
            return list(params)
        raise UnknownMethod(f"unknown method {method!r}; valid: echo")


@pytest.fixture
def dispatch() -> RecordingDispatch:
    return RecordingDispatch()


@pytest.fixture
def server(dispatch: RecordingDispatch) -> Iterator[ApiServer]:
    directory = Path(tempfile.mkdtemp(prefix="nma-"))
    api = ApiServer(
        dispatch, tcp="127.0.0.1:0", unix_socket=str(directory / "api.sock"), read_timeout=READ_TIMEOUT
    )
    api.start()
    try:
        yield api
        assert_still_serving(api)
    finally:
        api.stop(grace=1.0)
        shutil.rmtree(directory, ignore_errors=True)


def connect_unix(server: ApiServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.unix_path))
    return sock


CONNECTS = [pytest.param(connect_tcp, id="tcp"), pytest.param(connect_unix, id="unix")]


def post(body: bytes, extra: str = "") -> bytes:
    return f"POST / HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def call_raw(sock: socket.socket, body: bytes) -> Any:
    """POST ``body``; the decoded result, or the Fault (returned, not raised)."""
    sock.sendall(post(body))
    status, headers, payload = read_response(sock)
    assert status == 200 and headers["content-type"] == "text/xml"
    try:
        return xmlrpc.client.loads(payload)[0][0]
    except xmlrpc.client.Fault as fault:
        return fault


def wait_closed(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding anything it sends)."""
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def assert_still_serving(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        assert call_raw(sock, xmlrpc.client.dumps(("ok",), "echo").encode()) == ["ok"]


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<methodCall><methodName>echo</methodName><params><param><value><string>&lol9;</string></value></param></params></methodCall>
"""


def _call_with(param_xml: bytes, method: bytes = b"echo") -> bytes:
    return (
        b"<?xml version='1.0'?><methodCall><methodName>" + method + b"</methodName><params><param><value>"
        + param_xml + b"</value></param></params></methodCall>"
    )


MALFORMED = {
    "not-xml": b"this is not xml at all",
    "truncated": _call_with(b"<string>abc</string>")[:-20],
    "empty": b"",
    "billion-laughs": BILLION_LAUGHS,
    "wrong-int": _call_with(b"<int>abc</int>"),
    "wrong-boolean": _call_with(b"<boolean>yes</boolean>"),
    "wrong-double": _call_with(b"<double>1.2.3</double>"),
    "bad-base64": _call_with(b"<base64>!!!!</base64>"),
    "nil": _call_with(b"<nil/>"),
    "unknown-element": _call_with(b"<script>x</script>"),
    "not-a-call": xmlrpc.client.dumps((1,), methodresponse=True).encode(),
    "non-utf8": _call_with(b"<string>caf\xe9 \xff\xfe</string>"),
    "undefined-entity": _call_with(b"<string>&secret;</string>"),
    "struct-without-value": _call_with(b"<struct><member><name>a</name></member></struct>"),
    "deep-nesting": _call_with(b"<array><data><value>" * 500 + b"</value></data></array>" * 500),
    "no-method-name": b"<methodCall><params/></methodCall>",
    "huge-int": _call_with(b"<int>" + b"9" * 10000 + b"</int>"),
}


@pytest.mark.parametrize("connect", CONNECTS)
@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_bodies_get_fault_102_and_the_connection_stays_usable(
    server: ApiServer, dispatch: RecordingDispatch, connect: Callable[[ApiServer], socket.socket], body: bytes
) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        answer = call_raw(sock, body)
        assert isinstance(answer, xmlrpc.client.Fault)
        assert answer.faultCode == 102
        assert answer.faultString.startswith("malformed XML-RPC request: ")
        assert time.monotonic() - started < 1.0  # a bomb is refused, not expanded
        assert call_raw(sock, xmlrpc.client.dumps((1,), "echo").encode()) == [1]  # same connection
    assert dispatch.calls == [("echo", (1,))]  # the malformed request never reached the methods


def test_external_entity_is_refused_and_never_read(server: ApiServer, dispatch: RecordingDispatch) -> None:
    secret_dir = Path(tempfile.mkdtemp(prefix="nma-"))
    try:
        secret = secret_dir / "secret"
        secret.write_text("TOPSECRET\n")
        body = (
            f'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY s SYSTEM "file://{secret}">]>'
            "<methodCall><methodName>echo</methodName><params><param><value><string>&s;</string>"
            "</value></param></params></methodCall>"
        ).encode()
        with connect_tcp(server) as sock:
            sock.sendall(post(body))
            status, _, payload = read_response(sock)
        assert status == 200
        assert b"TOPSECRET" not in payload
        with pytest.raises(xmlrpc.client.Fault) as caught:
            xmlrpc.client.loads(payload)
        assert caught.value.faultCode == 102
        assert dispatch.calls == []
    finally:
        shutil.rmtree(secret_dir)


def test_a_declared_non_utf8_encoding_is_honoured(server: ApiServer) -> None:
    body = (
        '<?xml version="1.0" encoding="iso-8859-1"?><methodCall><methodName>echo</methodName>'
        "<params><param><value><string>café</string></value></param></params></methodCall>"
    ).encode("iso-8859-1")
    with connect_unix(server) as sock:
        assert call_raw(sock, body) == ["café"]


@pytest.mark.parametrize("connect", CONNECTS)
def test_unknown_method_is_fault_100(server: ApiServer, connect: Callable[[ApiServer], socket.socket]) -> None:
    with connect(server) as sock:
        answer = call_raw(sock, xmlrpc.client.dumps((), "DropAllTables").encode())
    assert isinstance(answer, xmlrpc.client.Fault)
    assert answer.faultCode == 100 and "echo" in answer.faultString


@pytest.mark.parametrize("connect", CONNECTS)
def test_huge_body_is_refused_with_413_without_being_sent(
    server: ApiServer, dispatch: RecordingDispatch, connect: Callable[[ApiServer], socket.socket]
) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Type: text/xml\r\nContent-Length: 10485760\r\n\r\n<methodCall>")
        status, headers, _ = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        wait_closed(sock)
        assert time.monotonic() - started < READ_TIMEOUT  # answered at once, not after a timeout
    assert dispatch.calls == []


def test_head_over_16_kib_is_refused_with_431(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 20000 + b"\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 431
        wait_closed(sock)


@pytest.mark.parametrize("connect", CONNECTS)
def test_silent_client_is_closed_after_the_timeout_while_others_are_served(
    server: ApiServer, connect: Callable[[ApiServer], socket.socket]
) -> None:
    with connect(server) as silent:
        started = time.monotonic()
        for n in range(3):  # served while the silent client holds its connection
            with connect_tcp(server) as other:
                assert call_raw(other, xmlrpc.client.dumps((n,), "echo").encode()) == [n]
        assert time.monotonic() - started < READ_TIMEOUT
        waited = time.monotonic() - started + wait_closed(silent)
    assert READ_TIMEOUT * 0.8 <= waited < READ_TIMEOUT + 2.0


def test_trickling_head_is_cut_off_at_the_timeout(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        started = time.monotonic()
        request = post(xmlrpc.client.dumps((1,), "echo").encode())
        try:
            for byte in request[:60]:  # one byte per 20 ms: never a complete head in time
                sock.send(bytes([byte]))
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass
        wait_closed(sock)
        elapsed = time.monotonic() - started
    assert READ_TIMEOUT * 0.8 <= elapsed < READ_TIMEOUT + 2.0


def test_stalled_body_is_cut_off_at_the_timeout(server: ApiServer, dispatch: RecordingDispatch) -> None:
    with connect_tcp(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 1000\r\n\r\n<methodCall>")
        wait_closed(sock)
        elapsed = time.monotonic() - started
    assert READ_TIMEOUT * 0.8 <= elapsed < READ_TIMEOUT + 2.0
    assert dispatch.calls == []


def test_half_sent_request_then_close_does_not_disturb_the_server(server: ApiServer) -> None:
    for cut in (5, 30, 80):
        with connect_unix(server) as sock:
            sock.sendall(post(xmlrpc.client.dumps((1,), "echo").encode())[:cut])
    assert_still_serving(server)


def test_200_concurrent_connections_are_all_answered(server: ApiServer) -> None:
    sockets = [connect_tcp(server) if n % 2 else connect_unix(server) for n in range(200)]
    try:
        for n, sock in enumerate(sockets):
            sock.sendall(post(xmlrpc.client.dumps((n,), "echo").encode()))
        answers = []
        for sock in sockets:
            status, _, payload = read_response(sock)
            assert status == 200
            answers.append(xmlrpc.client.loads(payload)[0][0][0])
    finally:
        for sock in sockets:
            sock.close()
    assert answers == list(range(200))


def test_many_bombs_in_parallel_keep_the_server_responsive(server: ApiServer) -> None:
    codes: list[int] = []

    def bomb() -> None:
        with connect_tcp(server) as sock:
            for _ in range(20):
                answer = call_raw(sock, BILLION_LAUGHS)
                codes.append(answer.faultCode if isinstance(answer, xmlrpc.client.Fault) else 0)

    threads = [threading.Thread(target=bomb) for _ in range(4)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    assert_still_serving(server)
    for thread in threads:
        thread.join(30)
    assert time.monotonic() - started < 10
    assert codes == [102] * 80
