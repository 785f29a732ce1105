"""Caller identity from the kernel: SO_PEERCRED on Unix sockets, sock_diag and /proc for TCP.

The identity tests connect from a real process running as another uid (``/usr/bin/python3``,
stdlib only, started with that uid) and check that each lookup names that uid, not root's.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import shutil
import socket
import struct
import subprocess
import sys
import time
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


# --- only a live owner counts (issue 10: orphaned sockets are owned by nobody) ------------------
TCP_STATES = {  # include/net/tcp_states.h
    "SYN_SENT": 2, "SYN_RECV": 3, "FIN_WAIT1": 4, "FIN_WAIT2": 5, "TIME_WAIT": 6, "CLOSE": 7,
    "CLOSE_WAIT": 8, "LAST_ACK": 9, "LISTEN": 10, "CLOSING": 11,
}
CLIENT_END = (ipaddress.ip_address("127.0.0.1"), 40000)
SERVER_END = (ipaddress.ip_address("127.0.0.1"), 812)


def _diag_reply(state: int, uid: int, inode: int, *, family: int = socket.AF_INET,
                source: tuple[str, int] = ("127.0.0.1", 40000),
                destination: tuple[str, int] = ("127.0.0.1", 812)) -> bytes:
    """A SOCK_DIAG_BY_FAMILY answer as the kernel writes it, for one socket."""
    def packed(host: str) -> bytes:
        return ipaddress.ip_address(host).packed.ljust(16, b"\0")

    sockid = peercred._SOCKID.pack(source[1], destination[1], packed(source[0]), packed(destination[0]))
    sockid += peercred._SOCKID_TAIL.pack(0, 1, 2)
    message = peercred._DIAG_MSG.pack(family, state, 0, 0, sockid, 0, 0, 0, uid, inode)
    header = peercred._NLMSG_HEADER.pack(peercred._NLMSG_HEADER.size + len(message), 20, 0, 1, 0)
    return header + message


def _error_reply(error: int) -> bytes:
    body = struct.pack("=i", -error) + b"\0" * 16
    return peercred._NLMSG_HEADER.pack(peercred._NLMSG_HEADER.size + len(body), 2, 0, 1, 0) + body


def test_diag_reply_names_an_established_socket_with_an_inode() -> None:
    assert peercred.diag_reply_uid(_diag_reply(1, 65534, 4242), CLIENT_END, SERVER_END) == 65534
    assert peercred.diag_reply_uid(_diag_reply(1, 0, 4242), CLIENT_END, SERVER_END) == 0  # root's, open


@pytest.mark.parametrize("state", list(TCP_STATES.values()), ids=list(TCP_STATES))
@pytest.mark.parametrize("uid", [0, 65534])
def test_diag_reply_of_any_other_state_is_nobody(state: int, uid: int) -> None:
    assert peercred.diag_reply_uid(_diag_reply(state, uid, 4242), CLIENT_END, SERVER_END) is None
    assert peercred.diag_reply_uid(_diag_reply(state, uid, 0), CLIENT_END, SERVER_END) is None


@pytest.mark.parametrize("uid", [0, 65534])
def test_diag_reply_of_an_orphan_is_nobody_even_if_established(uid: int) -> None:
    """The kernel reads state, uid and inode at different moments: an inode of 0 wins."""
    assert peercred.diag_reply_uid(_diag_reply(1, uid, 0), CLIENT_END, SERVER_END) is None


def test_diag_reply_for_another_socket_is_nobody() -> None:
    other_port = _diag_reply(1, 65534, 4242, source=("127.0.0.1", 40001))
    reversed_ends = _diag_reply(1, 65534, 4242, source=("127.0.0.1", 812), destination=("127.0.0.1", 40000))
    listener = _diag_reply(10, 65534, 4242, source=("0.0.0.0", 40000), destination=("0.0.0.0", 0))
    for reply in (other_port, reversed_ends, listener):
        assert peercred.diag_reply_uid(reply, CLIENT_END, SERVER_END) is None


def test_diag_reply_of_a_dual_stack_socket_is_unmapped() -> None:
    reply = _diag_reply(1, 65534, 4242, family=socket.AF_INET6,
                        source=("::ffff:127.0.0.1", 40000), destination=("::ffff:127.0.0.1", 812))
    assert peercred.diag_reply_uid(reply, CLIENT_END, SERVER_END) == 65534


def test_diag_reply_errors() -> None:
    assert peercred.diag_reply_uid(_error_reply(errno.ENOENT), CLIENT_END, SERVER_END) is None
    with pytest.raises(OSError):
        peercred.diag_reply_uid(_error_reply(errno.EPERM), CLIENT_END, SERVER_END)
    with pytest.raises(OSError):
        peercred.diag_reply_uid(b"\0" * 8, CLIENT_END, SERVER_END)
    with pytest.raises(OSError):
        peercred.diag_reply_uid(_diag_reply(1, 65534, 4242)[:40], CLIENT_END, SERVER_END)


def _proc_line(state: str, uid: int, inode: int, local: str = "0100007F:9C40", remote: str = "0100007F:032C") -> str:
    """One /proc/net/tcp line (little-endian host: 127.0.0.1 is 0100007F), client's end first."""
    queues = "00000000:00000000 00:00000000 00000000"
    return f"   7: {local} {remote} {state} {queues} {uid:>5} 0 {inode} 1 0000000000000000 20 4 30 10 -1"


def test_proc_line_rule() -> None:
    assert peercred.proc_line_uid(_proc_line("01", 65534, 4242).split()) == 65534
    assert peercred.proc_line_uid(_proc_line("01", 65534, 0).split()) is None
    # as measured: a closed client socket in FIN_WAIT1 keeps its uid but loses its inode, and a
    # timewait entry (FIN_WAIT2 / TIME_WAIT) reads as uid 0 with inode 0
    for state, uid in (("04", 65534), ("05", 0), ("06", 0), ("08", 65534), ("0A", 65534), ("07", 0)):
        assert peercred.proc_line_uid(_proc_line(state, uid, 0).split()) is None
        assert peercred.proc_line_uid(_proc_line(state, uid, 4242).split()) is None
    with pytest.raises(ValueError):
        peercred.proc_line_uid("7: 0100007F:9C40 0100007F:032C 01".split())


@pytest.mark.skipif(sys.byteorder != "little", reason="the crafted lines are little-endian")
def test_proc_net_uid_from_crafted_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    files = (tmp_path / "tcp", tmp_path / "tcp6")
    monkeypatch.setattr(peercred, "_PROC_FILES", files)

    def lookup(*lines: str) -> int | None:
        files[0].write_text(header + "".join(line + "\n" for line in lines))
        return peercred.proc_net_uid(SERVER_END[0], SERVER_END[1], CLIENT_END[0], CLIENT_END[1])

    files[1].write_text(header)
    assert lookup(_proc_line("01", 65534, 4242)) == 65534
    assert lookup(_proc_line("06", 0, 0)) is None
    assert lookup(_proc_line("01", 65534, 4242, local="0100007F:9C41")) is None  # another socket
    assert lookup("garbage line", _proc_line("01", 1234, 99)) == 1234
    # two entries for one 4-tuple that disagree (an orphan and a live socket): nobody's
    assert lookup(_proc_line("05", 0, 0), _proc_line("01", 1234, 99)) is None


class _FakeConnection:
    def __init__(self, info: bytes | OSError) -> None:
        self.info = info

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        if isinstance(self.info, OSError):
            raise self.info
        return self.info


def test_still_established_reads_tcp_info_state() -> None:
    assert peercred.still_established(_FakeConnection(bytes([1]) + b"\0" * 7))
    assert not peercred.still_established(_FakeConnection(bytes([8]) + b"\0" * 7))  # CLOSE_WAIT
    assert not peercred.still_established(_FakeConnection(b""))
    assert not peercred.still_established(_FakeConnection(OSError(errno.ENOTCONN, "gone")))


def _wait_not_established(conn: socket.socket) -> None:
    deadline = time.monotonic() + 5
    while peercred.still_established(conn):
        assert time.monotonic() < deadline, "the peer's FIN never arrived"
        time.sleep(0.01)


def test_a_closed_peer_of_our_own_uid_has_no_identity() -> None:
    """Even root's own orphan is nobody's: a closed socket names no owner."""
    with _listener(socket.AF_INET, "127.0.0.1") as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with conn:
            local, remote = conn.getsockname(), conn.getpeername()
            assert peercred.still_established(conn)
            assert peercred.tcp_peer(local, remote, connection=conn).uid == os.geteuid()
            client.close()
            _wait_not_established(conn)
            assert peercred.tcp_peer(local, remote, connection=conn).uid is None
            found = _endpoints(conn)
            assert peercred.sock_diag_uid(*found) is None
            assert peercred.proc_net_uid(*found) is None


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason=ROOT_REASON)
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_the_orphan_of_another_uid_has_no_identity() -> None:
    """uid 65534 connects and closes before the lookup: the kernel still lists its socket
    (FIN_WAIT with its uid, or a timewait entry as uid 0); neither names an owner."""
    code = "import socket, sys\ns = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\ns.close()"
    with _listener(socket.AF_INET, "127.0.0.1") as server:
        subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", code,
             str(server.getsockname()[1])],
            check=True, cwd="/", timeout=30,
        )
        conn, _ = server.accept()
        with conn:
            found = _endpoints(conn)
            assert peercred.sock_diag_uid(*found) is None
            assert peercred.proc_net_uid(*found) is None
            assert peercred.tcp_peer(conn.getsockname(), conn.getpeername(), connection=conn).uid is None
