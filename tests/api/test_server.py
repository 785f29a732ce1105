"""The API transport: a real ApiServer on a temporary Unix socket and 127.0.0.1:0.

The dispatch is a small fake (the real method table is tested elsewhere); clients are real HTTP
clients: ``xmlrpc.client.ServerProxy`` over TCP and over a Unix-socket transport, raw sockets for
the HTTP details, and ``/usr/bin/python3`` processes running as other accounts for identity.
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from nodemanager.api.identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity
from nodemanager.api.server import ApiServer, parse_tcp_address
from nodemanager.api.wire import (
    HttpError,
    RequestHead,
    dump_fault,
    dump_response,
    parse_head,
    parse_request,
)
from nodemanager.core import errors
from nodemanager.testing.rawhttp import connect_tcp, read_response

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root (creates accounts, runs processes as them)"
SYSTEM_PYTHON = "/usr/bin/python3"


def fake_dispatch(method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
    """echo / whoami / transport / sleep / fail(ErrorClassName) / none."""
    if method == "echo":
        return list(params)
    if method == "whoami":
        return -1 if peer.uid is None else peer.uid
    if method == "transport":
        return peer.transport
    if method == "sleep":
        time.sleep(float(params[0]))
        return 1
    if method == "fail":
        raise getattr(errors, params[0], RuntimeError)(f"raised {params[0]}")
    if method == "none":
        return None
    raise errors.UnknownMethod(f"unknown method {method!r}")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """ServerProxy over a Unix socket, keeping one connection alive like the TCP transport."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = str(path)

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection[1] is None:
            self._connection = (host, _UnixConnection(self._path))
        return self._connection[1]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short, world-traversable directory for sockets (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nma-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_server(sock_dir: Path) -> Iterator[Callable[..., ApiServer]]:
    servers: list[ApiServer] = []

    def make(**kwargs: Any) -> ApiServer:
        kwargs.setdefault("tcp", "127.0.0.1:0")
        kwargs.setdefault("unix_socket", str(sock_dir / "api.sock"))
        kwargs.setdefault("read_timeout", 2.0)
        server = ApiServer(kwargs.pop("dispatch", fake_dispatch), **kwargs)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop(grace=1.0)


@pytest.fixture
def server(make_server: Callable[..., ApiServer]) -> ApiServer:
    return make_server()


def tcp_proxy(server: ApiServer) -> xmlrpc.client.ServerProxy:
    assert server.tcp_address is not None
    host, port = server.tcp_address
    return xmlrpc.client.ServerProxy(f"http://{host}:{port}/")


def unix_proxy(server: ApiServer) -> xmlrpc.client.ServerProxy:
    assert server.unix_path is not None
    return xmlrpc.client.ServerProxy("http://nodemanager/", transport=UnixTransport(server.unix_path))


PROXIES = [pytest.param(tcp_proxy, id="tcp"), pytest.param(unix_proxy, id="unix")]


def raw_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request; read one response (status, lower-cased headers, body)."""
    sock.sendall(request)
    return read_response(sock)


def post(body: bytes, *, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (
        f"POST / {version}\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


CALL = xmlrpc.client.dumps((7, "x"), "echo").encode()


def call_and_close(proxy: xmlrpc.client.ServerProxy, result: list[Any], seconds: float) -> None:
    with proxy:
        result.append(proxy.sleep(seconds))


# --- calls -----------------------------------------------------------------------------------
@pytest.mark.parametrize("proxy", PROXIES)
def test_echo_round_trips_values(server: ApiServer, proxy: Callable[[ApiServer], Any]) -> None:
    client = proxy(server)
    with client:
        assert client.echo(1, "naïve", [True, 2.5], {"a": [1, 2]}) == [1, "naïve", [True, 2.5], {"a": [1, 2]}]
        assert client.echo() == []  # keep-alive: the second call reuses the connection


@pytest.mark.parametrize("proxy", PROXIES)
def test_caller_is_identified_per_transport(server: ApiServer, proxy: Callable[[ApiServer], Any]) -> None:
    with proxy(server) as client:
        assert client.whoami() == os.geteuid()
        assert client.transport() == (TRANSPORT_TCP if proxy is tcp_proxy else TRANSPORT_UNIX)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("UnknownMethod", 100), ("WrongArgumentCount", 101), ("InvalidArgument", 102),
        ("UnknownSliver", 102), ("InvalidLoans", 102), ("OperationFailed", 104),
        ("NotAllowedForSliver", 104), ("PermissionDenied", 108), ("StoreError", 1),
        ("NoSuchClass", 1),
    ],
)
def test_errors_become_faults_with_their_codes(server: ApiServer, error: str, code: int) -> None:
    with tcp_proxy(server) as client:
        with pytest.raises(xmlrpc.client.Fault) as caught:
            client.fail(error)
        assert caught.value.faultCode == code
        if code == 1:
            assert "raised" not in caught.value.faultString  # internals stay in the log
        else:
            assert caught.value.faultString == f"raised {error}"
        assert client.echo(1) == [1]  # the connection is still usable


def test_a_method_returning_none_is_an_internal_error(server: ApiServer) -> None:
    with unix_proxy(server) as client:
        with pytest.raises(xmlrpc.client.Fault) as caught:
            client.none()
        assert caught.value.faultCode == 1


def test_on_request_hook_sees_every_call(make_server: Callable[..., ApiServer]) -> None:
    seen: list[tuple[str, int | None, float]] = []
    server = make_server(on_request=lambda m, c, s: seen.append((m, c, s)))
    with tcp_proxy(server) as client:
        client.echo()
        with pytest.raises(xmlrpc.client.Fault):
            client.nope()
    assert [(m, c) for m, c, _ in seen] == [("echo", None), ("nope", 100)]
    assert all(0 <= s < 5 for _, _, s in seen)


def test_a_slow_call_does_not_hold_up_others(server: ApiServer) -> None:
    result: list[Any] = []
    slow = threading.Thread(target=call_and_close, args=(tcp_proxy(server), result, 1.5))
    slow.start()
    time.sleep(0.1)
    started = time.monotonic()
    with unix_proxy(server) as client:
        assert client.echo(1) == [1]
    assert time.monotonic() - started < 1.0
    slow.join(10)
    assert result == [1]


# --- HTTP framing ----------------------------------------------------------------------------
def test_http10_keep_alive_only_when_asked(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        status, headers, body = raw_exchange(sock, post(CALL, version="HTTP/1.0", extra="Connection: keep-alive\r\n"))
        assert status == 200 and headers["connection"] == "keep-alive"
        assert xmlrpc.client.loads(body)[0] == ([7, "x"],)
        status, headers, _ = raw_exchange(sock, post(CALL, version="HTTP/1.0"))
        assert status == 200 and headers["connection"] == "close"
        assert is_closed(sock)


def test_http11_keeps_alive_until_connection_close(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        for _ in range(3):
            status, headers, _ = raw_exchange(sock, post(CALL))
            assert status == 200 and "connection" not in headers
            assert headers["content-type"] == "text/xml"
        status, headers, _ = raw_exchange(sock, post(CALL, extra="Connection: close\r\n"))
        assert status == 200 and headers["connection"] == "close"
        assert is_closed(sock)


def test_pipelined_requests_are_answered_in_order(server: ApiServer) -> None:
    first = xmlrpc.client.dumps((1,), "echo").encode()
    second = xmlrpc.client.dumps((2,), "echo").encode()
    with connect_tcp(server) as sock:
        sock.sendall(post(first) + post(second, extra="Connection: close\r\n"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    bodies = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        bodies.append(rest[:length])
        data = rest[length:]
    assert [xmlrpc.client.loads(body)[0] for body in bodies] == [([1],), ([2],)]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Encoding: gzip\r\n\r\nabc", 415),
        (b"POST / HTTP/2.0\r\nContent-Length: 0\r\n\r\n", 505),
        (b"hello there\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nbad header\r\n\r\n", 400),
    ],
    ids=["get", "no-length", "chunked", "bad-length", "two-lengths", "gzip", "http2", "garbage", "bad-header"],
)
def test_framing_errors_get_a_status_and_a_close(server: ApiServer, request_bytes: bytes, status: int) -> None:
    with connect_tcp(server) as sock:
        got, headers, body = raw_exchange(sock, request_bytes)
        assert got == status
        assert headers["connection"] == "close"
        if status == 405:
            assert headers["allow"] == "POST" and b"POST" in body
        assert is_closed(sock)
    with tcp_proxy(server) as client:
        assert client.echo(1) == [1]


def test_expect_100_continue(server: ApiServer) -> None:
    with connect_tcp(server) as sock:
        head = f"POST / HTTP/1.1\r\nContent-Length: {len(CALL)}\r\nExpect: 100-continue\r\n\r\n".encode()
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        status, _, body = raw_exchange(sock, CALL)
    assert status == 200 and xmlrpc.client.loads(body)[0] == ([7, "x"],)


def test_connections_beyond_the_cap_are_refused_at_once(make_server: Callable[..., ApiServer]) -> None:
    server = make_server(max_connections=2)
    held = [connect_tcp(server), connect_tcp(server)]
    try:
        for sock in held:  # make sure both are registered before the third arrives
            assert raw_exchange(sock, post(CALL))[0] == 200
        with connect_tcp(server) as third:
            status, _, _ = raw_exchange(third, post(CALL))
            assert status == 503
            assert is_closed(third)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the two closes asynchronously
        try:
            with tcp_proxy(server) as client:
                assert client.echo(1) == [1]
            break
        except xmlrpc.client.ProtocolError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# --- TCP listener ----------------------------------------------------------------------------
def test_parse_tcp_address() -> None:
    assert parse_tcp_address("") is None
    assert parse_tcp_address("127.0.0.1:812") is not None
    address = parse_tcp_address("[::1]:0")
    assert address is not None and address.host == "::1" and address.port == 0 and address.loopback
    localhost = parse_tcp_address("localhost:9")
    assert localhost is not None and localhost.host == "127.0.0.1"
    for bad in ("127.0.0.1", "::1:80", "[127.0.0.1]:80", "example.org:80", "127.0.0.1:99999", "1.2.3.4:x"):
        with pytest.raises(errors.ConfigError):
            parse_tcp_address(bad)


def test_tcp_port_in_use_is_a_clear_error(make_server: Callable[..., ApiServer], sock_dir: Path) -> None:
    first = make_server(unix_socket="")
    assert first.tcp_address is not None
    host, port = first.tcp_address
    second = ApiServer(fake_dispatch, tcp=f"{host}:{port}", unix_socket=str(sock_dir / "other.sock"))
    with pytest.raises(errors.OperationFailed, match="in use"):
        second.start()
    assert not (sock_dir / "other.sock").exists()  # nothing is left bound after a failed start


def test_ipv6_loopback_listener(make_server: Callable[..., ApiServer]) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    server = make_server(tcp="[::1]:0", unix_socket="")
    assert server.tcp_address is not None
    host, port = server.tcp_address
    assert host == "::1"
    with xmlrpc.client.ServerProxy(f"http://[::1]:{port}/") as client:
        assert client.whoami() == os.geteuid()


def _local_non_loopback_address() -> str:
    for target in ("192.0.2.1", "198.51.100.1", "10.255.255.1"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))
                address = probe.getsockname()[0]
        except OSError:
            continue
        if not address.startswith("127."):
            return address
    pytest.skip("this host has no non-loopback IPv4 address")


def test_non_loopback_peers_are_refused_on_a_loopback_listener(server: ApiServer) -> None:
    address = _local_non_loopback_address()
    assert server.tcp_address is not None
    with socket.socket() as sock:
        sock.bind((address, 0))
        sock.settimeout(10)
        sock.connect(server.tcp_address)
        sock.sendall(post(CALL))
        assert is_closed(sock)


def test_non_loopback_peers_have_no_identity_on_a_configured_public_listener(
    make_server: Callable[..., ApiServer],
) -> None:
    address = _local_non_loopback_address()
    server = make_server(tcp=f"{address}:0", unix_socket="")
    assert server.tcp_address is not None
    with xmlrpc.client.ServerProxy(f"http://{address}:{server.tcp_address[1]}/") as client:
        assert client.whoami() == -1  # root's own process, but not over loopback: nobody


# --- Unix socket file ------------------------------------------------------------------------
def test_unix_socket_mode_and_parent_directory(make_server: Callable[..., ApiServer], sock_dir: Path) -> None:
    path = sock_dir / "run" / "nodemanager" / "api.sock"
    old_umask = os.umask(0o077)
    try:
        server = make_server(tcp="", unix_socket=str(path))
    finally:
        os.umask(old_umask)
    info = os.lstat(path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o666
    for directory in (path.parent, path.parent.parent):
        dinfo = os.stat(directory)
        assert stat.S_IMODE(dinfo.st_mode) == 0o755 and dinfo.st_uid == os.geteuid()
    assert server.unix_path == path
    server.stop()
    assert not path.exists()


def test_stale_socket_is_replaced(make_server: Callable[..., ApiServer], sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    server = make_server(tcp="")
    with unix_proxy(server) as client:
        assert client.echo(1) == [1]


def test_live_socket_is_refused(make_server: Callable[..., ApiServer], sock_dir: Path) -> None:
    first = make_server(tcp="")
    second = ApiServer(fake_dispatch, tcp="", unix_socket=str(sock_dir / "api.sock"))
    with pytest.raises(errors.OperationFailed, match="another node manager is serving"):
        second.start()
    with unix_proxy(first) as client:
        assert client.echo(1) == [1]  # the live server is untouched


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_a_path_that_is_not_a_socket_is_never_removed(sock_dir: Path, kind: str) -> None:
    path = sock_dir / "api.sock"
    target = sock_dir / "target"
    target.write_text("precious\n")
    if kind == "file":
        path.write_text("precious\n")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    server = ApiServer(fake_dispatch, tcp="", unix_socket=str(path))
    with pytest.raises(errors.OperationFailed, match="not a socket"):
        server.start()
    if kind == "file":
        assert path.read_text() == "precious\n"
    elif kind == "directory":
        assert path.is_dir()
    else:
        assert path.is_symlink() and target.read_text() == "precious\n"


def test_stop_leaves_a_socket_that_is_no_longer_ours(make_server: Callable[..., ApiServer], sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    server = make_server(tcp="")
    path.unlink()
    path.write_text("someone else's\n")
    server.stop()
    assert path.read_text() == "someone else's\n"


# --- lifecycle -------------------------------------------------------------------------------
def test_stop_lets_an_in_flight_call_finish(make_server: Callable[..., ApiServer]) -> None:
    server = make_server()
    result: list[Any] = []
    caller = threading.Thread(target=call_and_close, args=(unix_proxy(server), result, 0.5))
    caller.start()
    time.sleep(0.2)
    idle = connect_tcp(server)  # an idle keep-alive connection is closed at once on stop
    started = time.monotonic()
    server.stop(grace=5.0)
    caller.join(5)
    assert result == [1]
    assert time.monotonic() - started < 3.0
    with idle:  # closed, or (if stop began before the server saw it) told 503 and closed
        rest = b""
        while chunk := idle.recv(4096):
            rest += chunk
        assert rest == b"" or rest.startswith(b"HTTP/1.1 503 ")
    assert server.tcp_address is None and server.unix_path is None


def test_start_twice_is_an_error(server: ApiServer) -> None:
    with pytest.raises(RuntimeError):
        server.start()


# --- identity of real accounts -----------------------------------------------------------------
WHOAMI = r"""
import http.client, socket, sys, xmlrpc.client
kind, target = sys.argv[1], sys.argv[2]
if kind == "unix":
    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(target)
    class Unix(xmlrpc.client.Transport):
        def make_connection(self, host):
            return Conn("localhost")
    proxy = xmlrpc.client.ServerProxy("http://nodemanager/", transport=Unix())
else:
    proxy = xmlrpc.client.ServerProxy(target)
print(proxy.whoami())
"""


@pytest.fixture(scope="module")
def accounts() -> Iterator[list[pwd.struct_passwd]]:
    """Two throwaway accounts (prefix nma), always removed."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    names = [f"nmasite_{tag}{os.getpid() % 100000}" for tag in ("a", "b")]
    created: list[str] = []
    try:
        for name in names:
            subprocess.run(
                ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                check=True,
                capture_output=True,
            )
            created.append(name)
        yield [pwd.getpwnam(name) for name in names]
    finally:
        for name in created:
            subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
def test_each_account_is_identified_over_both_transports(
    server: ApiServer, accounts: list[pwd.struct_passwd]
) -> None:
    assert server.tcp_address is not None and server.unix_path is not None
    host, port = server.tcp_address
    targets = [("unix", str(server.unix_path)), ("tcp", f"http://{host}:{port}/")]
    for user in accounts:
        for kind, target in targets:
            done = subprocess.run(
                [SYSTEM_PYTHON, "-c", WHOAMI, kind, target],
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                cwd="/",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            assert int(done.stdout) == user.pw_uid, (user.pw_name, kind)


# --- wire: request bodies and heads, without a socket -----------------------------------------
def test_parse_request_decodes_every_xmlrpc_type() -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9)
    body = xmlrpc.client.dumps(
        (1, -(2**31), True, 2.5, "s", xmlrpc.client.Binary(b"\x00\xffdata" * 30), xmlrpc.client.DateTime(stamp),
         [1, [2]], {"k": {"n": 1}}),
        "Method.name",
    ).encode()
    method, params = parse_request(body)
    assert method == "Method.name"
    assert params == (1, -(2**31), True, 2.5, "s", b"\x00\xffdata" * 30, stamp, [1, [2]], {"k": {"n": 1}})


def test_parse_request_without_params() -> None:
    assert parse_request(b"<methodCall><methodName>Help</methodName></methodCall>") == ("Help", ())


@pytest.mark.parametrize(
    "body",
    [
        b"<methodCall><methodName></methodName></methodCall>",
        b"<methodCall><methodName>two words</methodName></methodCall>",
        b"<methodCall><methodName>" + b"a" * 200 + b"</methodName></methodCall>",
        (
            b"<methodCall><methodName>x</methodName><params><param><value><bigdecimal>1.5</bigdecimal>"
            b"</value></param></params></methodCall>"
        ),
    ],
    ids=["empty-name", "space-in-name", "long-name", "bigdecimal"],
)
def test_parse_request_rejects_bad_names_and_types(body: bytes) -> None:
    with pytest.raises(errors.InvalidArgument, match="^malformed XML-RPC request: "):
        parse_request(body)


def test_responses_are_utf8_xmlrpc() -> None:
    assert xmlrpc.client.loads(dump_response({"naïve": 1})) == (({"naïve": 1},), None)
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(dump_fault(xmlrpc.client.Fault(108, "no")))
    assert caught.value.faultCode == 108
    with pytest.raises(TypeError):
        dump_response(None)


def test_parse_head_keep_alive_rules() -> None:
    def head(version: str, extra: str = "") -> RequestHead:
        raw = f"POST /RPC2 {version}\r\nContent-Length: 5\r\n{extra}\r\n".encode()
        return parse_head(raw, max_body=10)

    assert head("HTTP/1.1").keep_alive and head("HTTP/1.1").http11
    assert not head("HTTP/1.1", "Connection: Close\r\n").keep_alive
    assert not head("HTTP/1.0").keep_alive
    assert head("HTTP/1.0", "Connection: Keep-Alive\r\n").keep_alive
    assert head("HTTP/1.1", "Expect: 100-continue\r\n").expect_continue
    assert head("HTTP/1.1").content_length == 5
    with pytest.raises(HttpError) as caught:
        parse_head(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", max_body=10)
    assert caught.value.status == 413
