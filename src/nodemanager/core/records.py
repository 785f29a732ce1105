"""Plain value types shared by every layer, and the name rule.

These are frozen dataclasses with no behaviour that touches the outside world. A ``Sliver`` is what
a source (the authority's document, or a verified ticket) says should exist; an ``AccountState`` is
what the node knows about the machine-side account it made for that sliver. Keeping the two apart is
what lets the plan compare "desired" with "applied" without asking the OS about unchanged slivers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import InvalidName

#: A slice name becomes a Unix account name and a path component: site prefix, underscore, slice.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9]*_[a-z0-9_]+")
NAME_MAX_LENGTH = 32

#: Names that must never become slivers even though they match the pattern.
RESERVED_NAMES = frozenset({"root", "daemon", "nobody", "sshd", "nodemanager"})

PLC_INSTANTIATED = "plc-instantiated"
DELEGATED = "delegated"
NM_CONTROLLER = "nm-controller"
NOT_INSTANTIATED = "not-instantiated"
INSTANTIATIONS = (PLC_INSTANTIATED, DELEGATED, NM_CONTROLLER, NOT_INSTANTIATED)

#: Instantiations whose accounts the sync creates by itself; delegated slivers wait for Create().
AUTO_INSTANTIATED = frozenset({PLC_INSTANTIATED, NM_CONTROLLER})

SOURCE_AUTHORITY = "authority"
SOURCE_TICKET = "ticket"

#: The slice tag that makes a sliver an observer (api.md "Observer", docs/observer.md).
OBSERVER_TAG = "nm_observer"


def validate_name(name: object) -> str:
    """Return ``name`` if it is a safe slice name, else raise :class:`InvalidName` saying why."""
    if not isinstance(name, str):
        raise InvalidName(f"slice name must be a string, not {type(name).__name__}")
    if len(name) > NAME_MAX_LENGTH:
        raise InvalidName(f"slice name {name[:40]!r}... is longer than {NAME_MAX_LENGTH} characters")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidName(f"slice name {name!r} does not match {NAME_PATTERN.pattern}")
    if name in RESERVED_NAMES:
        raise InvalidName(f"slice name {name!r} is reserved")
    return name


def parse_node_id(text: str) -> int | None:
    """The node id a node-id file holds (a positive decimal integer of at most 18 digits, with
    surrounding white space), or None when it holds anything else."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) == 0:
        return None
    return int(text)


def is_valid_name(name: object) -> bool:
    try:
        validate_name(name)
    except InvalidName:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Sliver:
    """One sliver as a source states it: identity, keys, attributes, lifetime.

    ``timestamp`` is the timestamp of the document (or ticket ``issued``) it came from; the
    timestamp rule compares it. ``attributes`` keeps every (tag, value) pair in source order,
    including repeated and unknown tags; the RSpec is derived from them by ``core.rspec``.
    """

    name: str
    slice_id: int
    instantiation: str
    expires: int
    timestamp: int
    source: str = SOURCE_AUTHORITY
    keys: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    initscript: str = ""
    controller: str = ""
    #: Memo of ``fingerprint()``; not part of the value (excluded from comparison and repr).
    _fingerprint: str = field(default="", init=False, compare=False, repr=False, hash=False)

    @property
    def auto_instantiated(self) -> bool:
        return self.instantiation in AUTO_INSTANTIATED

    @property
    def is_observer(self) -> bool:
        """The record makes its sliver an observer: read-only API access to every sliver and a
        delegate account (docs/observer.md). The last ``nm_observer`` tag counts (as for resource
        tags) and must be ``1``; only the authority's records confer the role -- a ticket is
        delivered by a controller, and its attributes grant resources, not rights over others."""
        if self.source != SOURCE_AUTHORITY:
            return False
        value = None
        for tag, tag_value in self.attributes:
            if tag == OBSERVER_TAG:
                value = tag_value
        return value is not None and value.strip() == "1"

    def content_equal(self, other: Sliver) -> bool:
        """Same content ignoring ``timestamp``: an unchanged sliver needs no write and no work."""
        return (
            self.slice_id == other.slice_id
            and self.instantiation == other.instantiation
            and self.expires == other.expires
            and self.source == other.source
            and self.keys == other.keys
            and self.attributes == other.attributes
            and self.initscript == other.initscript
            and self.controller == other.controller
        )

    def fingerprint(self) -> str:
        """Digest of what the backend applies (keys, attributes, initscript).

        The store remembers the fingerprint last applied; an equal fingerprint means the account
        needs no backend call at all. Computed once per object (records are shared frozen objects,
        so a no-op sync of thousands of slivers hashes nothing).
        """
        if self._fingerprint:
            return self._fingerprint
        digest = hashlib.sha256()
        for key in self.keys:
            digest.update(b"k\0" + key.encode() + b"\0")
        for tag, value in self.attributes:
            digest.update(b"a\0" + tag.encode() + b"\0" + value.encode() + b"\0")
        digest.update(b"i\0" + self.initscript.encode())
        digest.update(b"c\0" + self.controller.encode() + b"\0" + self.instantiation.encode())
        if self.is_observer:  # depends on the source too: a ticket's record taken over by the authority
            digest.update(b"o\0")
        fingerprint = digest.hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", fingerprint)
        return fingerprint


@dataclass(frozen=True, slots=True)
class Rejection:
    """An entry of a document that failed validation. Nothing of it is trusted, not even its name;
    ``label`` is only a printable hint for the log (index and a sanitised name)."""

    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class AuthorityDocument:
    """A validated authority document (GetSlivers or slices.xml): the canonical shape."""

    timestamp: int
    node_id: int | None
    hostname: str = ""
    bwcap_kbps: int | None = None
    slivers: tuple[Sliver, ...] = ()
    rejected: tuple[Rejection, ...] = ()
    #: Top-level members that node-wide handlers validate themselves (``accounts``,
    #: ``conf_files``: see ``sync.DocumentHandler``), as the authority sent them (untrusted);
    #: a member the document does not carry (or carries as nil) is absent from the mapping.
    members: Mapping[str, Any] = field(default_factory=dict)


class Phase(str, Enum):
    """Where a sliver's account is in its life. Legal transitions live in ``core.lifecycle``."""

    ABSENT = "absent"          # no account (never created, or destroyed)
    STOPPED = "stopped"        # account exists, no sliver processes started by us
    RUNNING = "running"        # Start ran
    FAILED = "failed"          # last operation failed; retried with backoff
    DESTROYING = "destroying"  # destroy in progress


@dataclass(frozen=True, slots=True)
class AccountState:
    """What the node manager knows about the machine side of one sliver (persisted in the store).

    ``owned`` means the node manager itself created the account: only owned accounts are ever
    modified or removed. ``applied`` is the fingerprint of the Sliver last applied successfully.
    ``access`` is the backend's access signature (lock state and authoritative keys, see
    ``ObservedAccount.access``) right after that apply: the plan reconfigures a sliver whose
    observed signature differs, so a changed lock or key file is repaired at the next cycle.
    """

    name: str
    uid: int | None = None
    owned: bool = False
    applied: str = ""
    phase: Phase = Phase.ABSENT
    failures: int = 0
    last_error: str = ""
    retry_at: float = 0.0
    create_requested: bool = False
    access: str = ""
    #: A start was asked for while a lease kept the sliver frozen: it was not started (its
    #: account is locked, and a process started into a frozen group would freeze at once); it
    #: is started when the lease schedule no longer freezes it (``operations``, docs/leases.md).
    start_pending: bool = False


@dataclass(frozen=True, slots=True)
class ObservedAccount:
    """What the backend sees on the machine for one sliver name, from one cheap pass.

    ``access`` is an opaque signature of what decides who may use the account (its lock state
    and its authoritative keys file), "" when the backend has none (hollow). Equal signatures
    mean nothing of that changed since the backend last computed it."""

    name: str
    uid: int
    managed_marker: bool = False
    access: str = ""


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """What stopping a sliver took: how many processes were sent SIGTERM, and how many rounds of
    killing followed the grace period (through its cgroup, or by pid without one)."""

    termed: int
    kill_rounds: int


@dataclass(frozen=True, slots=True)
class Loan:
    """``lender`` lends ``amount`` of ``resource`` to ``recipient`` (resources.md)."""

    recipient: str
    resource: str
    amount: int


@dataclass(frozen=True, slots=True)
class ValveState:
    """The mass-deletion safety valve's memory between documents: which removals are held and in
    how many consecutive documents the same set of removals has been seen."""

    held: frozenset[str] = field(default_factory=frozenset)
    seen: int = 0
