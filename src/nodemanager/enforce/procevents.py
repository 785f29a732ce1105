"""The kernel's process-event connector (``cn_proc``): its messages, read and written. Pure.

A connector message is ``struct cn_msg`` (idx, val, seq, ack, len, flags) followed by its
payload; for process events the payload is ``struct proc_event`` (what, cpu, timestamp, then the
event's data). ``Host.open_proc_events`` carries these messages in netlink datagrams; this
module knows what is inside them, and only the parts placement needs: uid changes, forks, and the
acknowledgement of a subscription (which is also how we learn that events reach us at all).

Subscribing: ``PROC_CN_MCAST_LISTEN``. Kernels from 6.6 accept a ``struct proc_input`` (the
operation and a mask of wanted events) and then send us only those, which spares the daemon the
exec and exit events of every process on the machine; older kernels silently ignore a message of
that size. A filtering kernel filters its own acknowledgement too (an event of kind "none"), so
the listener subscribes in the plain form first, waits for the acknowledgement, and then asks
for the filter.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_UID = 0x4
PROC_EVENT_EXIT = 0x80000000
#: The events placement needs (the filter of a kernel that takes one).
WANTED = PROC_EVENT_FORK | PROC_EVENT_UID

_CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_FOUR = struct.Struct("=IIII")
_DATA = _CN_MSG.size + _EVENT_HEAD.size


@dataclass(frozen=True, slots=True)
class UidChange:
    """A task changed its uids (setuid, setresuid...): ``tgid`` is its process."""

    pid: int
    tgid: int
    ruid: int
    euid: int


@dataclass(frozen=True, slots=True)
class Fork:
    """``parent_tgid`` made a task; ``child_pid == child_tgid`` when it is a new process."""

    parent_pid: int
    parent_tgid: int
    child_pid: int
    child_tgid: int


@dataclass(frozen=True, slots=True)
class Ack:
    """The kernel's answer to a (un)subscription: ``err`` 0 means accepted."""

    seq: int
    ack: int
    err: int


ProcEvent = UidChange | Fork | Ack


def subscription(op: int, tag: int, *, events: int | None) -> bytes:
    """A connector message (un)subscribing with ``op``; with ``events``, the filtered form
    (``struct proc_input``) that only kernels from 6.6 understand. The kernel's :class:`Ack`
    carries ``ack == tag + 1`` (see :func:`acknowledges`)."""
    payload = struct.pack("=I", op) if events is None else struct.pack("=II", op, events)
    return _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, tag, len(payload), 0) + payload


def acknowledges(event: ProcEvent | None, tag: int) -> bool:
    """True when ``event`` accepts the subscription sent with ``tag``."""
    return isinstance(event, Ack) and event.ack == (tag + 1) & 0xFFFFFFFF and event.err == 0


def parse(message: bytes) -> ProcEvent | None:
    """The event in one connector message, or None for events placement does not use (exec,
    exit, gid...), other connectors' messages and truncated ones."""
    if len(message) < _DATA + 4:
        return None
    idx, val, seq, ack, _length, _flags = _CN_MSG.unpack_from(message)
    if (idx, val) != (CN_IDX_PROC, CN_VAL_PROC):
        return None
    what = _EVENT_HEAD.unpack_from(message, _CN_MSG.size)[0]
    if what == PROC_EVENT_NONE:
        return Ack(seq, ack, struct.unpack_from("=I", message, _DATA)[0])
    if len(message) < _DATA + _FOUR.size:
        return None
    a, b, c, d = _FOUR.unpack_from(message, _DATA)
    if what == PROC_EVENT_UID:
        return UidChange(a, b, c, d)
    if what == PROC_EVENT_FORK:
        return Fork(a, b, c, d)
    return None


def event_message(what: int, data: tuple[int, int, int, int], *, seq: int = 0, ack: int = 0) -> bytes:
    """A connector message carrying one event: what the kernel sends (fakes and tests use it)."""
    payload = _EVENT_HEAD.pack(what, 0, 0) + _FOUR.pack(*data)
    return _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, ack, len(payload), 0) + payload


def ack_for(subscribe: bytes, err: int = 0) -> bytes:
    """The kernel's acknowledgement of the subscription message ``subscribe``."""
    seq, ack = _CN_MSG.unpack_from(subscribe)[2:4]
    return event_message(PROC_EVENT_NONE, (err, 0, 0, 0), seq=seq, ack=ack + 1)
