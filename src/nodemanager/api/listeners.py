"""The API's listening sockets: ``api.tcp`` address parsing and binding the TCP and Unix listeners.

Kept apart from :mod:`.server` (which serves connections) because this is where the start-up
failures an operator sees are decided, each as an :class:`~nodemanager.core.errors.OperationFailed`
with a clear message: an address in use, a non-socket file at the socket path, another node
manager answering there. A Unix socket nobody answers on is stale (its process died) and is
replaced; on shutdown the socket file is removed only if it is still the one we bound (same
device and inode), so a successor's socket is never deleted.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path

from ..core.addresses import HostPort, parse_host_port
from ..core.errors import OperationFailed

__all__ = ["TcpAddress", "bind_tcp", "bind_unix", "parse_tcp_address", "remove_unix_socket"]

logger = logging.getLogger(__name__)


#: A parsed ``api.tcp`` value (``core.addresses``' one HOST:PORT parser).
TcpAddress = HostPort


def parse_tcp_address(text: str) -> TcpAddress | None:
    """``"HOST:PORT"``, ``"[V6]:PORT"`` or ``""`` (disabled: None). HOST is an IP literal or
    ``localhost`` (127.0.0.1). Raises ConfigError naming the problem."""
    return parse_host_port(text, what="api.tcp", ip_only=True)


def bind_tcp(address: TcpAddress, backlog: int) -> socket.socket:
    """A listening TCP socket. IPv6: v6only, except for the wildcard ``::`` (dual stack, so that
    "every address" includes IPv4 as it does for ``0.0.0.0``)."""
    ip = ipaddress.ip_address(address.host)
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if ip.version == 6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if ip.is_unspecified else 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OperationFailed(f"cannot listen on TCP {address.host} port {address.port}: {exc.strerror or exc}") from exc
    return sock


def _make_parents(directory: Path) -> None:
    """Create missing directories of ``directory`` with mode 0755 (root-owned when we are root)."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            continue
        os.chmod(path, 0o755)  # mkdir's mode is filtered by the umask


def _clear_stale_socket(path: Path) -> None:
    """Remove ``path`` only if it is a socket nobody answers on; refuse anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OperationFailed(
            f"{path} exists and is not a socket; refusing to replace it (remove it or set api.unix_socket)"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # stale: the process that bound it is gone
    except OSError as exc:
        raise OperationFailed(f"cannot tell whether {path} is in use ({exc}); not replacing it") from exc
    else:
        raise OperationFailed(f"another node manager is serving on {path}")
    finally:
        probe.close()
    logger.info("event=api-stale-socket-removed path=%s", path)
    path.unlink(missing_ok=True)


def bind_unix(path: Path, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """A listening Unix socket at ``path`` (mode 0666) and its (device, inode)."""
    try:
        _make_parents(path.parent)
    except OSError as exc:
        raise OperationFailed(f"cannot create the directory of {path}: {exc.strerror or exc}") from exc
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(str(path))
        bound = True
        os.chmod(path, 0o666)
        info = os.stat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if bound:
            path.unlink(missing_ok=True)
        reason = "another process is serving on it" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise OperationFailed(f"cannot listen on the Unix socket {path}: {reason}") from exc
    return sock, (info.st_dev, info.st_ino)


def remove_unix_socket(path: Path, ident: tuple[int, int]) -> None:
    """Remove the socket file ``path`` if it is still the one :func:`bind_unix` made (same
    ``(device, inode)``); anything else there, or nothing, is left alone. Never raises."""
    try:
        info = os.lstat(path)
        if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == ident:
            path.unlink()
    except OSError:
        pass
