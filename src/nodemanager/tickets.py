"""Redeeming tickets on the node (tickets.md): signature verification, then the pure rules.

:class:`TicketVerifier` implements the API's ``TicketRedeemer`` port. It accepts two formats:

* the XML-DSig ``<ticket>`` of the bundled authority, verified against ``authority.ticket_cert``
  (steps below);
* PLCAPI's OpenPGP tickets (``GetSliceTicket``: an ASCII-armored ``-----BEGIN PGP MESSAGE-----``
  signed message carrying an XML-RPC ``{timestamp, initscripts, slivers}``), recognised by their
  armor line and verified with ``gpgv`` against ``authority.ticket_keyring`` (empty: refused with
  reason ``format not configured``). Armor, ``gpgv`` and the signed content are
  :mod:`nodemanager.pgptickets`; the rules are :func:`core.tickets.check_plc_ticket` (timestamp
  within ``tickets.max_age``, each sliver delegated and naming the caller as controller, replay and
  stale as below). A ticket granting several slivers is all-or-nothing: all are judged, then all
  are stored in one transaction with their replay marks. See ``docs/pgp-tickets.md``.

For an XML-DSig ticket ``redeem`` runs, in order:

1. the size cap (256 KiB), before anything parses the ticket;
2. the hardened parse (``authority.safe_xml``: no DTD, no entities, no network; any DOCTYPE is
   refused);
3. signxml's ``XMLVerifier`` against the certificate configured on the node
   (``authority.ticket_cert``) and nothing else: a key or certificate carried by the ticket itself
   is never trusted. The signature must be a child of the root, have exactly one reference, that
   reference must be ``URI=""`` (the whole document), the signature holds nothing but SignedInfo,
   SignatureValue and KeyInfo, and the algorithms are pinned to RSA-SHA256 and SHA-256. Ticket
   data is read ONLY from the ``signed_xml`` signxml returns: a subtree rebuilt from the canonical
   bytes that were digested, so wrapped, commented or appended elements that the signature does
   not cover are never seen;
4. the rules of :func:`core.tickets.check_ticket` (expiry, skew, node, instantiation, name,
   caller, replay, staleness);
5. one durable store transaction writing the ticket-sourced record and the replay mark
   (``Store.redeem_ticket``), which re-checks the mark inside the transaction;
6. with ``tickets.create_on_redeem``, the account's creation, queued on the sliver's worker like
   the API's ``Create`` (not awaited: the ticket is already accepted, and a failed creation is
   retried by the sync loop because ``create_requested`` is recorded).

Any failure in 1-5 is ``TicketRejected`` naming the reason, and nothing has changed.
Redemptions are serialised by a lock: they are rare, and it keeps check-then-write simple.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from lxml import etree
from signxml import (
    DigestAlgorithm,
    SignatureConfiguration,
    SignatureMethod,
    XMLVerifier,
)
from signxml.exceptions import InvalidSignature, SignXMLException

from .authority.parse import is_openssh_public_key, is_tag_name
from .authority.safe_xml import parse_xml_safely
from .clock import Clock
from .core.authz import Caller
from .core.errors import ConfigError, DocumentRejected, TicketReason, TicketRejected
from .core.records import AccountState, parse_node_id
from .core.tickets import TicketData, check_plc_ticket, check_ticket, ticket_sliver
from .pgptickets import (
    MAX_PGP_TICKET_BYTES,
    GpgvVerifier,
    dearmor,
    is_openpgp_ticket,
    load_ticket_keyring,
    plc_ticket,
)
from .store import Store

if TYPE_CHECKING:
    from .config import Config
    from .operations import SliverOperations
    from .workers import WorkerPool

logger = logging.getLogger(__name__)

MAX_TICKET_BYTES = 256 * 1024
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
#: Tags carried by dedicated ticket elements (or fields): as attributes they would be ambiguous.
_RESERVED_TAGS = frozenset({"controller", "delegations"})
#: The elements a ticket's signature may hold; any other (ds:Object, ...) is refused.
_SIGNATURE_PARTS = frozenset(f"{{{DSIG_NS}}}{part}" for part in ("SignedInfo", "SignatureValue", "KeyInfo"))

_EXPECT = SignatureConfiguration(
    location="./",
    expect_references=1,
    signature_methods=frozenset({SignatureMethod.RSA_SHA256}),
    digest_algorithms=frozenset({DigestAlgorithm.SHA256}),
)


def load_ticket_certificate(path: Path) -> x509.Certificate:
    """The authority's certificate (PEM) from ``path``; ``ConfigError`` if unreadable or not one."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"authority.ticket_cert {path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"authority.ticket_cert {path}: not a PEM X.509 certificate: {exc}") from exc


class NodeIdFile:
    """This node's id from ``authority.node_id_file``, read on first use and then kept (a
    failure is not cached: a node id written later is picked up)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._value: int | None = None

    def __call__(self) -> int:
        if self._value is None:
            try:
                text = self.path.read_text(encoding="ascii").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise TicketRejected(TicketReason.NODE_UNKNOWN, f"{self.path}: {exc}") from exc
            node_id = parse_node_id(text)
            if node_id is None:
                raise TicketRejected(TicketReason.NODE_UNKNOWN, f"{self.path} holds no positive integer")
            self._value = node_id
        return self._value


def _int(element: Any, attribute: str, where: str) -> int:
    raw = element.get(attribute)
    if raw is None:
        raise TicketRejected(TicketReason.MALFORMED, f"{where} has no {attribute!r}")
    text = raw.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise TicketRejected(TicketReason.MALFORMED, f"{where} {attribute}={raw[:30]!r} is not a non-negative integer")
    return int(text)


def _no_text(element: Any, where: str) -> None:
    if (element.text or "").strip() or len(element):
        raise TicketRejected(TicketReason.MALFORMED, f"{where} must be empty")


def ticket_data(root: Any) -> TicketData:
    """Extract :class:`TicketData` from the signed ``<ticket>`` element; anything unexpected
    (unknown or repeated elements, bad numbers, bad keys or tag names) is ``TicketRejected``."""
    if not isinstance(root.tag, str) or root.tag != "ticket":
        raise TicketRejected(TicketReason.MALFORMED, f"the signed element is <{root.tag}>, not <ticket>")
    ticket_id = root.get("id", "")
    issued, expires = _int(root, "issued", "<ticket>"), _int(root, "expires", "<ticket>")
    children = [c for c in root if isinstance(c.tag, str)]
    if len(children) != 1 or children[0].tag != "slice":
        raise TicketRejected(TicketReason.MALFORMED, "<ticket> must hold exactly one <slice> (and its signature)")
    element = children[0]
    slice_name = element.get("name", "")
    slice_id = _int(element, "id", "<slice>")
    slice_expires = _int(element, "expires", "<slice>")
    controllers: list[str] = []
    nodes: list[int] = []
    keys: list[str] = []
    attributes: list[tuple[str, str]] = []
    for child in element:
        if not isinstance(child.tag, str):
            continue
        if child.tag == "controller":
            controllers.append((child.text or "").strip())
        elif child.tag == "node":
            _no_text(child, "<node>")
            nodes.append(_int(child, "id", "<node>"))
        elif child.tag == "key":
            key = (child.text or "").strip()
            if child.get("type") != "ssh" or len(child) or not is_openssh_public_key(key):
                raise TicketRejected(TicketReason.MALFORMED, f"<key> is not an ssh key: {key[:40]!r}")
            keys.append(key)
        elif child.tag == "attribute":
            _no_text(child, "<attribute>")
            tag, value = child.get("name"), child.get("value")
            if tag is None or value is None or not is_tag_name(tag) or tag in _RESERVED_TAGS:
                raise TicketRejected(TicketReason.MALFORMED, f"<attribute name={str(tag)[:40]!r}> is not acceptable")
            attributes.append((tag, value))
        else:
            raise TicketRejected(TicketReason.MALFORMED, f"unexpected <{child.tag}> in <slice>")
    if len(controllers) != 1:
        raise TicketRejected(TicketReason.MALFORMED, "<slice> must name exactly one <controller>")
    if not nodes:
        raise TicketRejected(TicketReason.MALFORMED, "<slice> lists no <node>")
    initscript = next((value for tag, value in attributes if tag == "initscript_code"), "")
    return TicketData(
        ticket_id=ticket_id,
        issued=issued,
        expires=expires,
        slice_name=slice_name,
        slice_id=slice_id,
        instantiation=element.get("instantiation", ""),
        slice_expires=slice_expires,
        controller=controllers[0],
        node_ids=tuple(nodes),
        keys=tuple(keys),
        attributes=tuple(attributes),
        initscript=initscript,
    )


def verify_ticket(ticket: str | bytes, certificate: x509.Certificate) -> TicketData:
    """Steps 1-3 of the module docstring: the ticket's data, read only from what ``certificate``'s
    key signed. Raises ``TicketRejected``."""
    too_large = f"a ticket may have at most {MAX_TICKET_BYTES} bytes"
    if len(ticket) > MAX_TICKET_BYTES:  # characters <= bytes: no need to encode a huge string
        raise TicketRejected(TicketReason.TOO_LARGE, too_large)
    try:
        body = ticket.encode("utf-8") if isinstance(ticket, str) else bytes(ticket)
    except UnicodeEncodeError as exc:
        raise TicketRejected(TicketReason.MALFORMED, f"not encodable as UTF-8: {exc.reason}") from None
    if len(body) > MAX_TICKET_BYTES:
        raise TicketRejected(TicketReason.TOO_LARGE, too_large)
    try:
        parse_xml_safely(body, max_bytes=MAX_TICKET_BYTES, what="ticket")
    except DocumentRejected as exc:
        raise TicketRejected(TicketReason.MALFORMED, f"{exc}") from None
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        result = XMLVerifier().verify(body, x509_cert=certificate, parser=parser, expect_config=_EXPECT)
    except InvalidSignature as exc:
        if "verification failed" not in str(exc):
            raise TicketRejected(TicketReason.SIGNATURE, f"{str(exc)[:200]}") from None
        raise TicketRejected(TicketReason.SIGNATURE, "not signed with the authority's key") from None
    except (SignXMLException, etree.LxmlError, ValueError) as exc:
        raise TicketRejected(TicketReason.SIGNATURE, f"{str(exc)[:200] or type(exc).__name__}") from None
    extra = [c.tag for c in result.signature_xml if isinstance(c.tag, str) and c.tag not in _SIGNATURE_PARTS]
    if extra:  # e.g. a ds:Object smuggling a second <slice> past the enveloped-signature transform
        raise TicketRejected(TicketReason.SIGNATURE, f"unexpected content in the signature: {str(extra[0])[:80]}")
    references = result.signature_xml.findall(f"{{{DSIG_NS}}}SignedInfo/{{{DSIG_NS}}}Reference")
    if len(references) != 1 or references[0].get("URI") != "":
        raise TicketRejected(TicketReason.SIGNATURE, 'the signed reference must be URI="" (the whole ticket)')
    if result.signed_xml is None:
        raise TicketRejected(TicketReason.MALFORMED, "the signed data is not an XML element")
    return ticket_data(result.signed_xml)


class TicketVerifier:
    """The node's ``TicketRedeemer`` (see the module docstring). Thread-safe."""

    def __init__(
        self,
        *,
        certificate: x509.Certificate | None,
        node_id: Callable[[], int],
        store: Store,
        clock: Clock,
        max_clock_skew: int = 300,
        create_on_redeem: bool = False,
        operations: SliverOperations | None = None,
        pool: WorkerPool | None = None,
        pgp: GpgvVerifier | None = None,
        max_age: int = 86400,
    ) -> None:
        if create_on_redeem and (operations is None or pool is None):
            raise ValueError("create_on_redeem needs the operations and the worker pool")
        self.certificate = certificate
        self.node_id = node_id
        self.store = store
        self.clock = clock
        self.max_clock_skew = max_clock_skew
        self.create_on_redeem = create_on_redeem
        self.operations = operations
        self.pool = pool
        self.pgp = pgp
        self.max_age = max_age
        self._lock = threading.Lock()

    def redeem(self, ticket: str, caller: Caller) -> str:
        """Verify ``ticket`` for ``caller``, store the delegated sliver(s) it grants, and return
        the name(s) (comma-separated); ``TicketRejected`` (nothing changed) otherwise. Callable
        from any thread."""
        if is_openpgp_ticket(ticket):
            return self._redeem_openpgp(ticket, caller)
        if self.certificate is None:
            raise TicketRejected(TicketReason.NOT_CONFIGURED, "XML-DSig tickets are refused: this node has no "
                                 "authority.ticket_cert")
        data = verify_ticket(ticket, self.certificate)
        with self._lock, self.store.records_lock:
            name = data.slice_name
            check_ticket(
                data,
                now=int(self.clock.now()),
                max_clock_skew=self.max_clock_skew,
                node_id=self.node_id(),
                caller=caller,
                last_issued=self.store.ticket_mark(name),
                existing=self.store.sliver(name),
            )
            record = ticket_sliver(data)
            if not self.store.redeem_ticket(record, data.issued):
                raise TicketRejected(TicketReason.REPLAY, f"a ticket for {name} at least as new was accepted meanwhile")
        logger.info(
            "sliver=%s event=ticket-accepted ticket=%s issued=%d expires=%d controller=%s",
            name, data.ticket_id[:64], data.issued, record.expires, data.controller,
        )
        if self.create_on_redeem:
            self._create(name)
        return name

    def _redeem_openpgp(self, ticket: str | bytes, caller: Caller) -> str:
        """``redeem`` for a PLCAPI OpenPGP ticket (module docstring)."""
        if self.pgp is None:
            raise TicketRejected(TicketReason.NOT_CONFIGURED, "OpenPGP tickets are refused: this node has no "
                                 "authority.ticket_keyring")
        if len(ticket) > MAX_PGP_TICKET_BYTES:
            raise TicketRejected(TicketReason.TOO_LARGE, f"a ticket may have at most {MAX_PGP_TICKET_BYTES} bytes")
        signer, content = self.pgp.verify(dearmor(ticket))
        data = plc_ticket(content, signer)
        with self._lock, self.store.records_lock:
            records = check_plc_ticket(
                data,
                now=int(self.clock.now()),
                max_age=self.max_age,
                max_clock_skew=self.max_clock_skew,
                caller=caller,
                last_issued=self.store.ticket_mark,
                existing=self.store.sliver,
            )
            if not self.store.redeem_tickets(records, data.timestamp):
                names = ", ".join(r.name for r in records)
                raise TicketRejected(TicketReason.REPLAY, f"a ticket for {names} at least as new was accepted meanwhile")
        for record in records:
            logger.info(
                "sliver=%s event=ticket-accepted format=openpgp signer=%s issued=%d expires=%d controller=%s",
                record.name, signer, data.timestamp, record.expires, record.controller or "-",
            )
        if self.create_on_redeem:
            for record in records:
                self._create(record.name)
        return ",".join(record.name for record in records)

    def _create(self, name: str) -> None:
        """Queue the account's creation on the sliver's worker, as ``Create`` does."""
        assert self.operations is not None and self.pool is not None
        operations, store = self.operations, self.store

        def job() -> None:
            current = store.sliver(name)
            if current is None:  # destroyed while the job waited its turn
                return
            state = store.account(name) or AccountState(name=name)
            if not state.create_requested:
                store.put_account(replace(state, create_requested=True))
            operations.ensure(current, start=False)

        self.pool.submit(name, "create", job)


def ticket_redeemer_from_config(
    config: Config,
    *,
    store: Store,
    operations: SliverOperations,
    pool: WorkerPool,
    clock: Clock,
) -> TicketVerifier | None:
    """The daemon's ticket port, or None (logged) when neither ``authority.ticket_cert`` exists
    nor ``authority.ticket_keyring`` is set: the API then answers ``Ticket`` with "tickets not
    configured". A certificate file that exists but cannot be read or parsed, or a keyring that is
    set but unreadable (or no ``gpgv``), is a ``ConfigError``: a typo must not silently disable
    tickets."""
    path = Path(config.authority.ticket_cert)
    certificate = None
    if not config.authority.ticket_cert or not path.exists():
        logger.warning("event=tickets-disabled format=xml-dsig reason=no-authority-certificate path=%s", path)
    else:
        certificate = load_ticket_certificate(path)
    pgp = None
    if config.authority.ticket_keyring:
        pgp = GpgvVerifier(load_ticket_keyring(Path(config.authority.ticket_keyring)))
    if certificate is None and pgp is None:
        return None
    return TicketVerifier(
        certificate=certificate,
        pgp=pgp,
        max_age=config.tickets.max_age,
        node_id=NodeIdFile(Path(config.authority.node_id_file)),
        store=store,
        clock=clock,
        max_clock_skew=config.tickets.max_clock_skew,
        create_on_redeem=config.tickets.create_on_redeem,
        operations=operations,
        pool=pool,
    )
