"""Who is at the other end of an API connection, asked of the kernel (api.md, "Transports").

Never from anything the client sends. On the Unix socket the kernel stamps the connecting
process's credentials (``SO_PEERCRED``). On TCP that only worked on PlanetLab's patched kernel; on
a stock kernel the answer is the owner of the *client's* socket, which for a loopback connection
lives on this host: :func:`sock_diag_uid` asks the kernel for exactly that socket (one
``SOCK_DIAG_BY_FAMILY`` netlink request for the 4-tuple, no dump: tens of microseconds), and
:func:`proc_net_uid` scans ``/proc/net/tcp`` and ``tcp6`` (milliseconds) when netlink is not
available. A socket that cannot be found gives no identity, never a guessed one.

**Only a live owner counts** (api.md, "Orphaned sockets are owned by nobody, not by root"). When
a client closes its socket the kernel keeps it for a while as an orphan: FIN_WAIT1 with the old
owner's uid but inode 0 (measured here), then a timewait entry (FIN_WAIT2, TIME_WAIT) with uid 0
and inode 0. A client that sends its request and closes before the lookup would otherwise be
served as root. So a lookup names a uid only when the client's socket is ESTABLISHED *and* has a
non-zero inode (it is still attached to a file, i.e. owned by a process); every other state --
FIN_WAIT*, TIME_WAIT, CLOSE*, LAST_ACK, LISTEN, not found -- is anonymous. Both conditions are
needed: the kernel fills in a socket's state, uid and inode one after the other (the inode after
the uid, in sock_diag and /proc alike) without stopping a concurrent close, and an orphan never
gets its inode back, so a non-zero inode proves the socket still had its owner when its uid was
read, whatever the state said a moment earlier.

That rule names the live owner of *a* socket with the connection's 4-tuple. :func:`tcp_peer`
also checks, after the lookup, that the server's own end of the connection is still ESTABLISHED
(``TCP_INFO``): the peer had then sent neither FIN nor RST when the lookup ran, so the socket
the kernel named was our peer's and not a later socket that reused the 4-tuple (loopback allows
TIME_WAIT reuse). A peer that has half-closed or closed by then is anonymous even if the kernel
still lists an owner. The check costs one ``getsockopt``; the server makes the lookup right after
``accept()``, before reading anything, and keeps the identity for the whole connection.

Seen from the server, the client's socket has ``source = remote`` and ``destination = local``.
IPv4-mapped IPv6 addresses (what a dual-stack listener reports for an IPv4 client) are looked up
as the IPv4 addresses they carry, as the kernel itself hashes such connections.

Every function here is synchronous, cheap, and safe to call from any thread.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct
from itertools import count
from pathlib import Path
from typing import Any

from .identity import TRANSPORT_TCP, TRANSPORT_UNIX, PeerIdentity

__all__ = [
    "diag_reply_uid", "is_loopback", "proc_line_uid", "proc_net_uid", "sock_diag_uid",
    "still_established", "tcp_peer", "unix_peer",
]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_TCP_ESTABLISHED = 1                              # include/net/tcp_states.h
_NLMSG_HEADER = struct.Struct("=IHHII")          # len, type, flags, seq, pid
_REQ_V2 = struct.Struct("=BBBxI")                 # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")              # sport, dport, src, dst (network order)
_SOCKID_TAIL = struct.Struct("=III")              # ifindex, cookie[2]
_DIAG_MSG = struct.Struct("=BBBB48sIIIII")        # family, state, timer, retrans, id, expires,
                                                  # rqueue, wqueue, uid, inode
_PEERCRED = struct.Struct("3i")                   # pid, uid, gid
_sequence = count(1)

_PROC_FILES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def unix_peer(sock: Any) -> PeerIdentity:
    """The identity of the process that connected the Unix stream socket ``sock`` (``SO_PEERCRED``).

    ``sock`` is anything with ``getsockopt`` (a socket or asyncio's TransportSocket). A uid the
    kernel cannot map (reported negative) gives no identity.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return PeerIdentity(TRANSPORT_UNIX, uid if uid >= 0 else None, pid if pid > 0 else None)


def tcp_peer(
    local: tuple[Any, ...],
    remote: tuple[Any, ...],
    *,
    loopback_only_identity: bool = True,
    connection: Any | None = None,
) -> PeerIdentity:
    """The identity of the TCP client at ``remote`` connected to our ``local`` address.

    ``local``/``remote`` are ``getsockname()``/``getpeername()`` of the accepted socket. With
    ``loopback_only_identity`` (the default, what the server uses) a non-loopback remote has no
    identity whatever the kernel would say. The uid comes from :func:`sock_diag_uid`, or from
    :func:`proc_net_uid` when netlink cannot be used; None when no live owner is found (module
    doc). ``connection``, the accepted socket (anything with ``getsockopt``), adds the check
    that our end is still ESTABLISHED after the lookup; the server always passes it.
    """
    remote_ip, remote_port = _endpoint(remote)
    local_ip, local_port = _endpoint(local)
    if loopback_only_identity and not remote_ip.is_loopback:
        return PeerIdentity(TRANSPORT_TCP, None)
    try:
        uid = sock_diag_uid(local_ip, local_port, remote_ip, remote_port)
    except OSError as exc:
        logger.debug("event=sock-diag-unavailable error=%s", exc)
        uid = proc_net_uid(local_ip, local_port, remote_ip, remote_port)
    if uid is not None and connection is not None and not still_established(connection):
        uid = None
    return PeerIdentity(TRANSPORT_TCP, uid)


def still_established(connection: Any) -> bool:
    """Whether our end of a TCP connection is ESTABLISHED (``tcpi_state``, the first byte of
    ``TCP_INFO``): False once the peer's FIN or RST arrived, or when the state cannot be read."""
    try:
        info = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return bool(info) and info[0] == _TCP_ESTABLISHED


def is_loopback(address: tuple[Any, ...]) -> bool:
    """Whether a socket address (IPv4, IPv6 or IPv4-mapped) is a loopback address."""
    return _endpoint(address)[0].is_loopback


def _endpoint(address: tuple[Any, ...]) -> tuple[IPAddress, int]:
    host = str(address[0]).partition("%")[0]
    ip = ipaddress.ip_address(host)
    return _unmapped(ip.packed), int(address[1])


def _packed(ip: IPAddress) -> bytes:
    return ip.packed.ljust(16, b"\0")


def sock_diag_uid(local_ip: IPAddress, local_port: int, remote_ip: IPAddress, remote_port: int) -> int | None:
    """The uid owning the TCP socket ``remote -> local`` by an exact sock_diag netlink request.

    Returns None when the kernel has no such socket. Raises OSError when netlink sock_diag cannot
    be used at all (the caller then falls back to /proc). Addresses must be of one family (pass
    IPv4-mapped addresses unwrapped).
    """
    family = socket.AF_INET if remote_ip.version == 4 else socket.AF_INET6
    sockid = _SOCKID.pack(remote_port, local_port, _packed(remote_ip), _packed(local_ip))
    body = (
        _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF)
        + sockid
        + _SOCKID_TAIL.pack(0, _INET_DIAG_NOCOOKIE, _INET_DIAG_NOCOOKIE)
    )
    seq = next(_sequence) & 0xFFFFFFFF
    request = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(request + body, (0, 0))
        reply = nl.recv(65536)
    return diag_reply_uid(reply, (remote_ip, remote_port), (local_ip, local_port))


def diag_reply_uid(
    reply: bytes, source: tuple[IPAddress, int], destination: tuple[IPAddress, int]
) -> int | None:
    """The uid a ``SOCK_DIAG_BY_FAMILY`` reply names for the socket ``source -> destination``.

    None unless the reply describes exactly that socket, ESTABLISHED, with a non-zero inode (the
    module doc says why). Raises OSError for a reply that is not a sock_diag answer at all.
    """
    if len(reply) < _NLMSG_HEADER.size:
        raise OSError(errno.EPROTO, "short sock_diag reply")
    _length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, _NLMSG_HEADER.size)
        if error in (-errno.ENOENT, 0):
            return None
        raise OSError(-error, f"sock_diag: {errno.errorcode.get(-error, error)}")
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _NLMSG_HEADER.size + _DIAG_MSG.size:
        raise OSError(errno.EPROTO, f"unexpected sock_diag reply type {kind}")
    got_family, state, _t, _r, got_id, _e, _rq, _wq, uid, inode = _DIAG_MSG.unpack_from(reply, _NLMSG_HEADER.size)
    # The kernel's exact lookup falls back to a listening socket on the source port: only a
    # connection with the very same 4-tuple counts. A dual-stack client socket answers an IPv4
    # request with its own family (IPv6, IPv4-mapped addresses).
    sport, dport, src, dst = _SOCKID.unpack_from(got_id)
    width = 4 if got_family == socket.AF_INET else 16
    found = ((_unmapped(src[:width]), sport), (_unmapped(dst[:width]), dport))
    if found != (source, destination) or state != _TCP_ESTABLISHED or inode == 0:
        return None
    return uid


def proc_net_uid(local_ip: IPAddress, local_port: int, remote_ip: IPAddress, remote_port: int) -> int | None:
    """The uid owning the TCP socket ``remote -> local``, found by scanning /proc/net/tcp{,6}.

    The fallback for :func:`sock_diag_uid`, with the same rule (:func:`proc_line_uid`); None when
    not found, when the files cannot be read, or when lines for that 4-tuple disagree (an orphan
    listed next to a newer socket that reused its addresses is nobody's).
    """
    wanted = ((remote_ip, remote_port), (local_ip, local_port))
    owners: set[int | None] = set()
    for path in _PROC_FILES:
        try:
            lines = path.read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            try:
                if len(fields) >= 10 and (_proc_endpoint(fields[1]), _proc_endpoint(fields[2])) == wanted:
                    owners.add(proc_line_uid(fields))
            except ValueError:
                continue
    return owners.pop() if len(owners) == 1 else None


def proc_line_uid(fields: list[str]) -> int | None:
    """The uid of one split ``/proc/net/tcp`` line (``sl local rem st queues tr retrnsmt uid
    timeout inode ...``): the uid column when the state is ESTABLISHED (``01``) and the inode is
    not 0, else None. Raises ValueError for a line that is not a socket line."""
    if len(fields) < 10:
        raise ValueError("short /proc/net/tcp line")
    state, uid, inode = int(fields[3], 16), int(fields[7]), int(fields[9])
    return uid if state == _TCP_ESTABLISHED and inode != 0 else None


def _proc_endpoint(text: str) -> tuple[IPAddress, int]:
    """``0100007F:1F90`` -> (127.0.0.1, 8080): each 32-bit word is printed in host byte order."""
    address, _, port = text.partition(":")
    raw = b"".join(struct.pack("=I", int(address[i : i + 8], 16)) for i in range(0, len(address), 8))
    return _unmapped(raw), int(port, 16)


def _unmapped(raw: bytes) -> IPAddress:
    ip: IPAddress = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
