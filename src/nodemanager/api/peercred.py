"""Who is at the other end of an API connection, asked of the kernel (api.md, "Transports").

Never from anything the client sends. On the Unix socket the kernel stamps the connecting
process's credentials (``SO_PEERCRED``). On TCP that only worked on PlanetLab's patched kernel; on
a stock kernel the answer is the owner of the *client's* socket, which for a loopback connection
lives on this host: :func:`sock_diag_uid` asks the kernel for exactly that socket (one
``SOCK_DIAG_BY_FAMILY`` netlink request for the 4-tuple, no dump: tens of microseconds), and
:func:`proc_net_uid` scans ``/proc/net/tcp`` and ``tcp6`` (milliseconds) when netlink is not
available. A socket that cannot be found gives no identity, never a guessed one.

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

__all__ = ["is_loopback", "proc_net_uid", "sock_diag_uid", "tcp_peer", "unix_peer"]

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x1
_NLMSG_ERROR = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_TCP_LISTEN = 10
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
    local: tuple[Any, ...], remote: tuple[Any, ...], *, loopback_only_identity: bool = True
) -> PeerIdentity:
    """The identity of the TCP client at ``remote`` connected to our ``local`` address.

    ``local``/``remote`` are ``getsockname()``/``getpeername()`` of the accepted socket. With
    ``loopback_only_identity`` (the default, what the server uses) a non-loopback remote has no
    identity whatever the kernel would say. The uid comes from :func:`sock_diag_uid`, or from
    :func:`proc_net_uid` when netlink cannot be used; None when the socket is not found.
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
    return PeerIdentity(TRANSPORT_TCP, uid)


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
    got_family, state, _t, _r, got_id, _e, _rq, _wq, uid, _inode = _DIAG_MSG.unpack_from(reply, _NLMSG_HEADER.size)
    # The kernel's exact lookup falls back to a listening socket on the source port: only a
    # connection with the very same 4-tuple counts. A dual-stack client socket answers an IPv4
    # request with its own family (IPv6, IPv4-mapped addresses).
    sport, dport, src, dst = _SOCKID.unpack_from(got_id)
    width = 4 if got_family == socket.AF_INET else 16
    found = ((_unmapped(src[:width]), sport), (_unmapped(dst[:width]), dport))
    if state == _TCP_LISTEN or found != ((remote_ip, remote_port), (local_ip, local_port)):
        return None
    return uid


def proc_net_uid(local_ip: IPAddress, local_port: int, remote_ip: IPAddress, remote_port: int) -> int | None:
    """The uid owning the TCP socket ``remote -> local``, found by scanning /proc/net/tcp{,6}.

    The fallback for :func:`sock_diag_uid`; None when not found or the files cannot be read.
    """
    wanted = ((remote_ip, remote_port), (local_ip, local_port))
    for path in _PROC_FILES:
        try:
            lines = path.read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 8 or fields[3] == "0A":
                continue
            try:
                if (_proc_endpoint(fields[1]), _proc_endpoint(fields[2])) == wanted:
                    return int(fields[7])
            except ValueError:
                continue
    return None


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
