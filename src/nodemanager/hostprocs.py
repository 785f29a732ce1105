"""The process operations of the :class:`~nodemanager.host.Host` seam that take more than one
system call: signalling through pidfds, and the kernel's process-event connector.

Only ``host.py`` imports this module (its methods delegate here), so every effect still goes
through the one seam that ``FakeHost`` replaces.

Why pidfds: a pid read from ``/proc`` or ``cgroup.procs`` names whatever process has that number
*when the signal is sent*; if the process exited in between and the number was handed out again,
a plain ``kill`` hits a stranger. :func:`signal_through_pidfd` opens the process first (a pidfd
refers to one process for good, however its number is reused), checks that it is the process
the caller means (its uid, its cgroup) and only then signals it through the descriptor.

Why netlink here: the process-event connector (``NETLINK_CONNECTOR``, group ``CN_IDX_PROC``)
reports every uid change on the machine as it happens, which is how a login is put into its
sliver's cgroups at once (``enforce.placement``). This module only frames netlink datagrams;
the connector's messages and the events inside them are read by ``enforce.procevents``.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
from collections.abc import Callable

from .core.errors import BackendError

__all__ = ["ProcEventChannel", "process_ids", "signal_through_pidfd"]

NETLINK_CONNECTOR = 11
#: The connector's multicast group (and idx) of process events.
CN_IDX_PROC = 1
_NLMSG_DONE = 3
_NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, port
#: ``SO_RCVBUFFORCE``: root may exceed ``rmem_max`` (a burst of forks must not overflow us).
_SO_RCVBUFFORCE = 33
RECEIVE_BUFFER = 8 << 20


def process_ids(pid: int) -> tuple[str, list[str]] | None:
    """``(state, [real uid, effective uid])`` of ``pid`` from ``/proc/<pid>/status``, or None
    when there is no such process."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read().decode("ascii", "replace")
    except OSError:
        return None
    state, ids = "", []
    for line in text.splitlines():
        if line.startswith("State:"):
            fields = line.split()
            state = fields[1] if len(fields) > 1 else ""
        elif line.startswith("Uid:"):
            ids = line.split()[1:3]
            break
    return state, ids


def signal_through_pidfd(pid: int, sig: int, check: Callable[[int], bool] | None = None) -> bool:
    """Send ``sig`` to the process that has ``pid`` now, through a pidfd. True when sent.

    With ``check``, it is called with ``pid`` once the pidfd is open (it may read
    ``/proc/<pid>``); the signal is sent only when it returns True *and* the process the pidfd
    refers to is still alive afterwards (then the check read that process, not a successor).
    A pid that names no process, or a thread that is not a process leader, is not signalled."""
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EINVAL):
            return False
        raise BackendError(f"cannot open pid {pid}: {exc.strerror or exc}") from exc
    try:
        if check is not None:
            if not check(pid):
                return False
            signal.pidfd_send_signal(fd, 0)
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except OSError as exc:
        raise BackendError(f"cannot signal pid {pid}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


class ProcEventChannel:
    """A netlink socket subscribed to the connector's process-event group.

    :meth:`send` frames a connector message (built by ``enforce.procevents``) as one netlink
    datagram; :meth:`recv` returns the connector message of the next datagram. Not thread-safe:
    one thread receives; :meth:`close` may be called from another to end it."""

    #: What :meth:`recv` returns when the kernel dropped events (our receive queue overflowed).
    LOST = b""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout: float | None = None

    @classmethod
    def open(cls) -> ProcEventChannel:
        """Bind to the process-event group. Needs CAP_NET_ADMIN in the initial network
        namespace; the reason it cannot be used is the ``BackendError``'s message."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise BackendError(f"no process-event connector (netlink connector: {exc.strerror or exc})") from exc
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.bind((0, CN_IDX_PROC))
        except OSError as exc:
            sock.close()
            why = "needs CAP_NET_ADMIN" if exc.errno == errno.EPERM else (exc.strerror or str(exc))
            raise BackendError(f"cannot listen to process events: {why}") from exc
        return cls(sock)

    def send(self, message: bytes) -> None:
        header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(message), _NLMSG_DONE, 0, 0, 0)
        try:
            self._sock.send(header + message)
        except OSError as exc:
            why = ("the connector refuses us (not the initial network namespace?)"
                   if exc.errno == errno.ECONNREFUSED else (exc.strerror or str(exc)))
            raise BackendError(f"cannot subscribe to process events: {why}") from exc

    def recv(self, timeout: float) -> bytes | None:
        """The next connector message; None when ``timeout`` seconds pass without one;
        :attr:`LOST` when events were dropped (the caller must resynchronise)."""
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return None
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return self.LOST
            raise BackendError(f"cannot receive process events: {exc.strerror or exc}") from exc
        if len(data) < _NLMSG_HEADER.size:
            return None
        length = _NLMSG_HEADER.unpack_from(data)[0]
        return data[_NLMSG_HEADER.size:min(len(data), length)]

    def close(self) -> None:
        self._sock.close()
