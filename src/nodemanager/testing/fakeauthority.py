"""FakeAuthority: a fetch function whose document (or failure) a test sets directly.

It stands in for ``AuthorityClient.fetch`` where the network is not what is being tested; the
authority client itself is tested against the real bundled server over HTTP.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from ..core.errors import AuthorityError
from ..core.records import PLC_INSTANTIATED, SOURCE_AUTHORITY, AuthorityDocument, Sliver


def stable_slice_id(name: str) -> int:
    """A slice id derived from the name: the same in every run and every document (a sliver's
    uid derives from it). Below 10**7, so that any test ``uid_base`` plus it is a valid uid;
    two names collide about once in ten million pairs."""
    return 1 + zlib.crc32(name.encode()) % 10_000_000


def make_sliver(
    name: str,
    *,
    timestamp: int = 1,
    expires: int = 4_000_000_000,
    instantiation: str = PLC_INSTANTIATED,
    keys: Iterable[str] = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTestsOnly0000000000000000000 t@x",),
    attributes: Iterable[tuple[str, str]] = (),
    slice_id: int = 0,
    controller: str = "",
    initscript: str = "",
) -> Sliver:
    return Sliver(
        name=name,
        slice_id=slice_id or stable_slice_id(name),
        instantiation=instantiation,
        expires=expires,
        timestamp=timestamp,
        source=SOURCE_AUTHORITY,
        keys=tuple(keys),
        attributes=tuple(attributes),
        initscript=initscript,
        controller=controller,
    )


class FakeAuthority:
    def __init__(self, node_id: int = 1) -> None:
        self.node_id = node_id
        self.timestamp = 1_000
        self.slivers: dict[str, Sliver] = {}
        self.error: AuthorityError | None = None
        self.protected: frozenset[str] = frozenset()
        self.fetches = 0

    def publish(self, slivers: Iterable[Sliver], *, timestamp: int | None = None) -> None:
        """Replace the document; the timestamp moves forward unless given."""
        self.timestamp = self.timestamp + 1 if timestamp is None else timestamp
        self.slivers = {s.name: _restamp(s, self.timestamp) for s in slivers}

    def fetch(self) -> tuple[AuthorityDocument, frozenset[str]]:
        self.fetches += 1
        if self.error is not None:
            raise self.error
        doc = AuthorityDocument(
            timestamp=self.timestamp,
            node_id=self.node_id,
            slivers=tuple(self.slivers[n] for n in sorted(self.slivers)),
        )
        return doc, self.protected


def _restamp(sliver: Sliver, timestamp: int) -> Sliver:
    from dataclasses import replace

    return replace(sliver, timestamp=timestamp)
