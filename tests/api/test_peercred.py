"""Caller identity from the kernel: SO_PEERCRED on Unix sockets, sock_diag and /proc for TCP.

The identity tests connect from a real process running as another uid (``/usr/bin/python3``,
stdlib only, started with that uid) and check that each lookup names that uid, not root's.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodemanager.api import peercred
from nodemanager.api.identity import TRANSPORT_TCP, TRANSPORT_UNIX

IS_ROOT = os.geteuid() == 0
ROOT_REASON = "needs root (creates accounts, runs processes as them)"
SYSTEM_PYTHON = "/usr/bin/python3"

# Connects to (family, host, port) or a Unix path, says "ready", and holds the connection open
# until its stdin closes.
CLIENT = r"""
import socket, sys
target = sys.argv[1]
if target.startswith("/"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect(target)
else:
    family, host, port = target.split(",")
    s = socket.socket(int(family), socket.SOCK_STREAM); s.connect((host, int(port)))
print("ready", flush=True)
sys.stdin.read()
"""


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def account() -> Iterator[pwd.struct_passwd]:
    """A throwaway account (prefix nma), always removed."""
    if not IS_ROOT:
        pytest.skip(ROOT_REASON)
    name = f"nmapeer{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def connect_as() -> Iterator[Callable[[pwd.struct_passwd, str], None]]:
    """Start a client process as the account, connected to the target; kill it at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(user: pwd.struct_passwd, target: str) -> None:
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", CLIENT, target],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _listener(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    sock.settimeout(10)
    return sock


def _endpoints(conn: socket.socket) -> tuple[peercred.IPAddress, int, peercred.IPAddress, int]:
    local, remote = conn.getsockname(), conn.getpeername()
    return (
        peercred._unmapped(ipaddress.ip_address(local[0]).packed), local[1],
        peercred._unmapped(ipaddress.ip_address(remote[0]).packed), remote[1],
    )


FAMILIES = [pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4")]
if _has_ipv6_loopback():
    FAMILIES.append(pytest.param(socket.AF_INET6, "::1", id="ipv6"))


@pytest.mark.parametrize("lookup", [peercred.sock_diag_uid, peercred.proc_net_uid], ids=["sock_diag", "proc"])
@pytest.mark.parametrize(("family", "host"), FAMILIES)
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
def test_tcp_lookup_names_the_client_socket_owner(
    lookup: Callable[..., int | None], family: int, host: str, account: pwd.struct_passwd,
    connect_as: Callable[[pwd.struct_passwd, str], None],
) -> None:
    with _listener(family, host) as server:
        connect_as(account, f"{int(family)},{host},{server.getsockname()[1]}")
        conn, _ = server.accept()
        with conn:
            local_ip, local_port, remote_ip, remote_port = _endpoints(conn)
            assert lookup(local_ip, local_port, remote_ip, remote_port) == account.pw_uid
            # Our own end of the connection is root's: direction matters.
            assert lookup(remote_ip, remote_port, local_ip, local_port) == 0
            identity = peercred.tcp_peer(conn.getsockname(), conn.getpeername())
            assert identity.transport == TRANSPORT_TCP
            assert identity.uid == account.pw_uid


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
@pytest.mark.parametrize("lookup", [peercred.sock_diag_uid, peercred.proc_net_uid], ids=["sock_diag", "proc"])
def test_ipv4_client_on_a_dual_stack_listener_is_found(
    lookup: Callable[..., int | None], account: pwd.struct_passwd,
    connect_as: Callable[[pwd.struct_passwd, str], None],
) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no IPv6 on this host")
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server.bind(("::", 0))
    server.listen()
    server.settimeout(10)
    with server:
        connect_as(account, f"{int(socket.AF_INET)},127.0.0.1,{server.getsockname()[1]}")
        conn, _ = server.accept()
        with conn:
            assert conn.getpeername()[0] == "::ffff:127.0.0.1"
            assert lookup(*_endpoints(conn)) == account.pw_uid
            assert peercred.tcp_peer(conn.getsockname(), conn.getpeername()).uid == account.pw_uid


@pytest.mark.parametrize("lookup", [peercred.sock_diag_uid, peercred.proc_net_uid], ids=["sock_diag", "proc"])
def test_unknown_tuple_has_no_owner(lookup: Callable[..., int | None]) -> None:
    loopback = ipaddress.ip_address("127.0.0.1")
    with _listener(socket.AF_INET, "127.0.0.1") as server:
        port = server.getsockname()[1]
        # Nothing is connected to the listener; the kernel's exact lookup would fall back to the
        # listening socket itself when asked for a "client" on its port: that must not count.
        assert lookup(loopback, 1, loopback, port) is None
        assert lookup(loopback, port, loopback, 1) is None
    assert peercred.tcp_peer(("127.0.0.1", 1), ("127.0.0.1", 2)).uid is None


def test_sock_diag_and_proc_agree_for_our_own_connection() -> None:
    with _listener(socket.AF_INET, "127.0.0.1") as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            found = _endpoints(conn)
            assert peercred.sock_diag_uid(*found) == peercred.proc_net_uid(*found) == os.geteuid()


def test_tcp_peer_falls_back_to_proc_when_netlink_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> int | None:
        raise PermissionError("netlink refused")

    monkeypatch.setattr(peercred, "sock_diag_uid", broken)
    with _listener(socket.AF_INET, "127.0.0.1") as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert peercred.tcp_peer(conn.getsockname(), conn.getpeername()).uid == os.geteuid()


def test_non_loopback_remote_has_no_identity() -> None:
    identity = peercred.tcp_peer(("192.0.2.1", 812), ("192.0.2.7", 40000))
    assert identity.uid is None and identity.transport == TRANSPORT_TCP
    mapped = peercred.tcp_peer(("::ffff:192.0.2.1", 812, 0, 0), ("::ffff:192.0.2.7", 40000, 0, 0))
    assert mapped.uid is None
    assert peercred.is_loopback(("::ffff:127.0.0.1", 1, 0, 0))
    assert not peercred.is_loopback(("192.0.2.7", 1))


def test_proc_endpoint_decoding() -> None:
    expected_v4 = ("0100007F" if sys.byteorder == "little" else "7F000001") + ":1F90"
    assert peercred._proc_endpoint(expected_v4) == (ipaddress.ip_address("127.0.0.1"), 8080)
    one = "00000000000000000000000001000000" if sys.byteorder == "little" else "00000000000000000000000000000001"
    assert peercred._proc_endpoint(one + ":0050") == (ipaddress.ip_address("::1"), 80)


def test_unix_peer_over_a_socketpair() -> None:
    left, right = socket.socketpair()
    with left, right:
        identity = peercred.unix_peer(left)
    assert identity.transport == TRANSPORT_UNIX
    assert identity.uid == os.geteuid()
    assert identity.pid == os.getpid()


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
def test_unix_peer_of_another_uid(
    account: pwd.struct_passwd, connect_as: Callable[[pwd.struct_passwd, str], None], home_root: Path
) -> None:
    path = home_root / "peer.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o666)
    server.listen()
    server.settimeout(10)
    with server:
        connect_as(account, str(path))
        conn, _ = server.accept()
        with conn:
            identity = peercred.unix_peer(conn)
    assert identity.uid == account.pw_uid
    assert identity.pid is not None and identity.pid != os.getpid()
