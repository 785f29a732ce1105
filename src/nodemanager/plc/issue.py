"""Issuing tickets (tickets.md) at the bundled authority: who may have one, and what it says.

``GetSliceTicket(auth, slice_name)`` over XML-RPC and ``nodemanager authority ticket SLICE`` both
end in :meth:`TicketIssuer.issue`. The caller of ``GetSliceTicket`` authenticates like a PLCAPI
user: ``auth = {"AuthMethod": "password", "Username": NAME, "AuthString": PASSWORD}``, checked
against the data file's ``[[users]]`` (``password_sha256`` is the hex SHA-256 of the password,
compared in constant time). A user may get a ticket for a ``delegated`` slice that is among the
user's ``slices``, or whose controller is: the people running a controller slice are the ones
delivering its tickets to nodes. Node (HMAC) authentication gets no tickets.

Faults: bad or missing auth and no right to the slice -> 108; unknown slice -> 102; a slice that
cannot have a ticket (not delegated, no controller, expired, on no node) -> 104.

``TicketIssuer.issue(..., format="pgp")`` (``nodemanager authority ticket SLICE --format pgp``)
makes PLCAPI's OpenPGP ticket instead: ``xmlrpc.client.dumps(({timestamp, initscripts, slivers},),
methodresponse=True)`` without its XML declaration, signed by ``gpg --armor --sign`` with the
authority's GnuPG key (:mod:`.pgpsigning`). It names no node and no expiry: nodes bound its age
with ``tickets.max_age``.

A ticket is stamped ``issued = max(now, data timestamp, last issued for that slice + 1)``: never
older than the data it is derived from (a node holding that data would reject it as stale), and
strictly increasing per slice while the server runs (a node rejects a second ticket with the same
``issued`` as a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import uuid
import xmlrpc.client
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from lxml import etree

from ..core.errors import (
    ConfigError,
    InvalidArgument,
    NotAllowedForSliver,
    PermissionDenied,
    WrongArgumentCount,
)
from ..core.records import DELEGATED
from .model import (
    XMLRPC_INT_MAX,
    AuthorityData,
    SliceEntry,
    UserEntry,
    sliver_attributes,
)
from .pgpsigning import GpgSigner, PgpIdentity, pgp_signer_for
from .signing import SigningIdentity, identity_for, sign_document

log = logging.getLogger(__name__)


def password_digest(password: str) -> str:
    """The ``password_sha256`` value for ``password`` (what an operator puts in the data file)."""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()


def authenticate_user(auth: object, users: Mapping[str, UserEntry]) -> UserEntry:
    """The user that PLCAPI-style password ``auth`` names, or ``PermissionDenied`` (one message
    for every failure: it does not tell which user names exist)."""
    if not isinstance(auth, Mapping) or auth.get("AuthMethod") != "password":
        raise PermissionDenied('tickets need {"AuthMethod": "password", "Username": ..., "AuthString": ...}')
    name, password = auth.get("Username"), auth.get("AuthString")
    user = users.get(name) if isinstance(name, str) else None
    supplied = password_digest(password) if isinstance(password, str) else ""
    expected = user.password_sha256 if user is not None else "0" * 64
    if not hmac.compare_digest(supplied, expected) or user is None:
        raise PermissionDenied("authentication failed")
    return user


def may_get_ticket(user: UserEntry, entry: SliceEntry) -> bool:
    """The user belongs to the slice or to its controller."""
    return entry.name in user.slices or (bool(entry.controller) and entry.controller in user.slices)


def ticket_element(
    entry: SliceEntry, *, ticket_id: str, issued: int, expires: int, node_ids: Iterable[int]
) -> Any:
    """The unsigned ``<ticket>`` element for ``entry`` (format in tickets.md)."""
    root = etree.Element("ticket", id=ticket_id, issued=str(issued), expires=str(expires))
    element = etree.SubElement(
        root, "slice", name=entry.name, id=str(entry.slice_id), instantiation=entry.instantiation,
        expires=str(entry.expires),
    )
    etree.SubElement(element, "controller").text = entry.controller
    for node_id in sorted(node_ids):
        etree.SubElement(element, "node", id=str(node_id))
    for key in entry.keys:
        etree.SubElement(element, "key", type="ssh").text = key
    for tag, value in sliver_attributes(entry):
        if tag != "controller":  # carried by <controller>
            etree.SubElement(element, "attribute", name=tag, value=value)
    return root


#: The ticket formats ``TicketIssuer.issue`` makes.
FORMAT_XML = "xml"
FORMAT_PGP = "pgp"
FORMATS = (FORMAT_XML, FORMAT_PGP)


def plc_ticket_content(entry: SliceEntry, *, timestamp: int) -> bytes:
    """The content PLCAPI's ``GetSliceTicket`` signs: an XML-RPC ``methodResponse`` (no XML
    declaration) of ``{timestamp, initscripts, slivers: [one GetSlivers-shaped sliver]}``; the
    controller travels as PLC's ``delegations`` tag."""
    attributes = [("delegations" if tag == "controller" else tag, value) for tag, value in sliver_attributes(entry)]
    sliver = {
        "name": entry.name,
        "slice_id": entry.slice_id,
        "instantiation": entry.instantiation,
        "expires": entry.expires,
        "keys": [{"key_type": "ssh", "key": key} for key in entry.keys],
        "attributes": [{"tagname": tag, "value": value} for tag, value in attributes],
    }
    text = xmlrpc.client.dumps(({"timestamp": timestamp, "initscripts": [], "slivers": [sliver]},),
                               methodresponse=True)
    return text.removeprefix("<?xml version='1.0'?>\n").encode("utf-8")


class TicketIssuer:
    """Signs tickets for the authority whose data file is ``data_path``. The signing identity is
    loaded (generated the first time) on first use. Thread-safe."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = Path(data_path)
        self._lock = threading.Lock()
        self._identity: SigningIdentity | None = None
        self._pgp: tuple[GpgSigner, PgpIdentity] | None = None
        self._last_issued: dict[str, int] = {}

    def identity(self, data: AuthorityData) -> SigningIdentity:
        with self._lock:
            if self._identity is None:
                self._identity = identity_for(self.data_path, data.tickets)
            return self._identity

    def pgp_identity(self, data: AuthorityData) -> tuple[GpgSigner, PgpIdentity]:
        """The authority's ``gpg`` signer and OpenPGP identity (key generated on first use)."""
        with self._lock:
            if self._pgp is None:
                signer = pgp_signer_for(self.data_path, data.tickets)
                self._pgp = (signer, signer.load_or_create())
            return self._pgp

    def issue(
        self,
        data: AuthorityData,
        slice_name: str,
        *,
        now: int,
        ttl: int | None = None,
        nodes: Sequence[int] | None = None,
        format: str = FORMAT_XML,  # noqa: A002 (the CLI option's name)
    ) -> bytes:
        """The signed ticket for ``slice_name`` valid ``ttl`` seconds (default: the data file's
        ``ticket_lifetime``) on ``nodes`` (default: every node of the slice; each given node
        must be one of them). Raises ``InvalidArgument``/``NotAllowedForSliver``.

        ``format="pgp"``: PLCAPI's OpenPGP ticket (module docstring), which carries neither nodes
        nor an expiry (``ttl`` and ``nodes`` are then refused)."""
        if format not in FORMATS:
            raise InvalidArgument(f"unknown ticket format {format!r}; one of {', '.join(FORMATS)}")
        if format == FORMAT_PGP and (ttl is not None or nodes):
            raise InvalidArgument("an OpenPGP (PLCAPI) ticket names no nodes and no expiry: drop --node/--ttl")
        entry = data.slice(slice_name)
        if entry is None:
            raise InvalidArgument(f"no slice named {slice_name[:64]!r}")
        if entry.instantiation != DELEGATED:
            raise NotAllowedForSliver(f"slice {entry.name} is {entry.instantiation}; tickets are for delegated slices")
        if not entry.controller:
            raise NotAllowedForSliver(f"slice {entry.name} has no controller to deliver its tickets")
        if entry.expires <= now:
            raise NotAllowedForSliver(f"slice {entry.name} expired at {entry.expires}")
        on = set(data.nodes) if entry.nodes is None else set(entry.nodes)
        if nodes:
            outside = sorted(set(nodes) - on)
            if outside:
                raise InvalidArgument(f"slice {entry.name} is not on node(s) {outside}")
            on = set(nodes)
        if not on:
            raise NotAllowedForSliver(f"slice {entry.name} is on no node")
        if format == FORMAT_PGP:
            signer, pgp = self.pgp_identity(data)
            return signer.sign(pgp, plc_ticket_content(entry, timestamp=self._stamp(entry.name, now, data)))
        identity = self.identity(data)
        issued = self._stamp(entry.name, now, data)
        expires = min(issued + (ttl if ttl is not None else data.tickets.lifetime), XMLRPC_INT_MAX)
        element = ticket_element(entry, ticket_id=str(uuid.uuid4()), issued=issued, expires=expires, node_ids=on)
        return sign_document(element, identity)

    def _stamp(self, name: str, now: int, data: AuthorityData) -> int:
        with self._lock:
            issued = max(now, data.timestamp, self._last_issued.get(name, 0) + 1)
            self._last_issued[name] = issued
        return issued


class TicketContext(Protocol):
    """What ``GetSliceTicket`` needs of the server that calls it (``AuthorityServer`` is one):
    declared here so that this module does not import the server that imports it."""

    tickets: TicketIssuer
    clock: Callable[[], float]

    def data(self) -> AuthorityData: ...


def get_slice_ticket(server: TicketContext, params: Sequence[Any]) -> str:
    """GetSliceTicket(auth, slice_name): a signed ticket for a delegated slice (see module doc)."""
    if len(params) != 2:
        raise WrongArgumentCount("GetSliceTicket takes (auth, slice_name)")
    data = server.data()
    user = authenticate_user(params[0], data.users)
    name = params[1]
    if not isinstance(name, str):
        raise InvalidArgument("slice_name must be a string")
    entry = data.slice(name)
    if entry is None:
        raise InvalidArgument(f"no slice named {name[:64]!r}")
    if not may_get_ticket(user, entry):
        raise PermissionDenied(f"user {user.name} may not get tickets for {entry.name}")
    try:
        ticket = server.tickets.issue(data, name, now=int(server.clock()))
    except ConfigError as exc:  # the signing key cannot be read or made: the operator's problem
        log.error("event=ticket-signing-unavailable error=%s", exc)
        raise NotAllowedForSliver("the authority cannot sign tickets now (see its log)") from exc
    log.info("event=ticket-issued slice=%s user=%s", entry.name, user.name)
    return ticket.decode("utf-8")
