"""Who is calling: established from the kernel by the transport, never from the request."""

from __future__ import annotations

from dataclasses import dataclass

TRANSPORT_UNIX = "unix"
TRANSPORT_TCP = "tcp"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """The caller of one API request.

    ``uid`` is None when the kernel could not tell (a non-loopback TCP peer, or a loopback socket
    whose owner was not found): such a caller may use only the methods allowed to anyone.
    """

    transport: str
    uid: int | None = None
    pid: int | None = None

    @property
    def known(self) -> bool:
        return self.uid is not None
