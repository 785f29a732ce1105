"""PLCAPI's OpenPGP tickets on the node (tickets.md, second format), with real GnuPG.

Keys are made once per session: a DSA-1024 key in a GnuPG-1 keyring exactly as stock MyPLC makes
its ``PLC_ROOT_GPG_KEY`` (``gpg1 --batch --gen-key``), and three ed25519 keys made by GnuPG 2 (the
authority ``A``, a second trusted key ``B``, a stranger ``S``). Tickets are ``gpg --batch --no-tty
--armor --sign`` of ``xmlrpc.client.dumps((struct,), methodresponse=True)`` without the XML
declaration, as PLCAPI's ``GetSliceTicket`` makes them.

Each hostile case is a row of :data:`HOSTILE`: it must be refused with Fault 102 naming the
reason, change nothing in the store, and (where the row says so) be refused before ``gpgv`` runs.
"""

from __future__ import annotations

import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodemanager.config import parse_config
from nodemanager.core.authz import Caller
from nodemanager.core.errors import ConfigError, TicketReason, TicketRejected
from nodemanager.core.records import DELEGATED, NM_CONTROLLER, SOURCE_AUTHORITY, SOURCE_TICKET, Sliver
from nodemanager.host import CommandResult, Host
from nodemanager.pgptickets import (
    GpgvVerifier,
    dearmor,
    is_openpgp_ticket,
    judge_status,
    load_ticket_keyring,
)
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.story import store_snapshot
from nodemanager.testing.openpgp import (
    armor,
    export_public,
    gpg1_dsa_key,
    gpg2_key,
    literal_packet,
    missing_tools,
    packet_tag,
    plc_content,
    sign,
    split_packets,
)
from nodemanager.tickets import TicketVerifier, ticket_redeemer_from_config

NOW = int(time.time())
SLICE, SLICE2 = "plc_deleg", "plc_deleg2"
CONTROLLER = "plc_ctrl"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"

ROOT = Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False)
THE_CONTROLLER = Caller(uid=1001, is_root=False, local_account=True, sliver=CONTROLLER, is_controller=True)
OTHER_CONTROLLER = Caller(uid=1002, is_root=False, local_account=True, sliver="plc_other", is_controller=True)

needs_gpg = pytest.mark.skipif(missing_tools("gpg", "gpgv", "gpgconf", "prlimit") is not None,
                               reason=str(missing_tools("gpg", "gpgv", "gpgconf", "prlimit")))
needs_gpg1 = pytest.mark.skipif(missing_tools("gpg1") is not None, reason=str(missing_tools("gpg1")))


@dataclass(frozen=True)
class Keys:
    plc_home: Path  # GnuPG 1, DSA-1024
    plc_keyring: bytes
    home: Path  # GnuPG 2: A, B, S
    a: str
    b: str
    s: str
    a_keyring: bytes  # armored
    ab_keyring: bytes


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    if missing_tools("gpg", "gpgv", "gpgconf", "prlimit"):
        pytest.skip(str(missing_tools("gpg", "gpgv", "gpgconf", "prlimit")))
    base = tmp_path_factory.mktemp("pgp")
    plc_home, plc_keyring = base / "plc", b""
    if missing_tools("gpg1") is None:
        plc_keyring = export_public("gpg1", plc_home, gpg1_dsa_key(plc_home))
    home = base / "g2"
    a = gpg2_key(home, "Authority A", "a@example.org")
    b = gpg2_key(home, "Authority B", "b@example.org")
    s = gpg2_key(home, "Stranger", "s@example.org")
    return Keys(plc_home, plc_keyring, home, a, b, s, export_public("gpg", home, a, armored=True),
                export_public("gpg", home, a, b))


def sliver(name: str = SLICE, *, controller: str | None = CONTROLLER, tag: str = "delegations",
           instantiation: str = DELEGATED, expires: int = NOW + 3600, **extra: Any) -> dict[str, Any]:
    attributes = [{"tagname": "nm_cpu_share", "value": "4"}]
    if controller is not None:
        attributes.append({"tagname": tag, "value": controller})
    return {"name": name, "slice_id": 42, "instantiation": instantiation, "expires": expires,
            "keys": [{"key_type": "ssh", "key": KEY}], "attributes": attributes, **extra}


def content(*slivers: dict[str, Any], timestamp: int = NOW - 10) -> bytes:
    return plc_content({"timestamp": timestamp, "initscripts": [], "slivers": list(slivers or [sliver()])})


def ticket(keys: Keys, body: bytes | None = None, *, users: Sequence[str] = (), mode: Sequence[str] = (),
           extra: Sequence[str] = ()) -> str:
    """A gpg2 ticket signed by A (or ``users``)."""
    signed = sign(keys.home, content() if body is None else body, users=users or (keys.a,),
                  mode=mode or ("--armor", "--sign"), extra=extra)
    return signed.decode("ascii")


class RecordingHost(Host):
    """The real host, remembering which programs ran."""

    def __init__(self) -> None:
        super().__init__()
        self.programs: list[str] = []

    def run(self, argv: Sequence[str], **kwargs: Any) -> CommandResult[bytes]:
        self.programs.extend(Path(str(a)).name for a in argv if Path(str(a)).name in ("gpgv", "prlimit"))
        return super().run(argv, **kwargs)


@dataclass
class Node:
    store: Store
    verifier: TicketVerifier
    host: RecordingHost
    clock: ManualClock
    path: Path

    def snapshot(self) -> tuple[object, ...]:
        return store_snapshot(self.store)


def make_node(tmp_path: Path, keyring: bytes) -> Iterator[Node]:
    store = Store(tmp_path / "nm.sqlite")
    controller = Sliver(name=CONTROLLER, slice_id=1, instantiation=NM_CONTROLLER, expires=NOW + 10**6,
                        timestamp=NOW - 100)
    store.apply_records([controller], [])
    host = RecordingHost()
    clock = ManualClock(NOW)
    verifier = TicketVerifier(certificate=None, pgp=GpgvVerifier(keyring, host=host), node_id=lambda: 7,
                              store=store, clock=clock, max_clock_skew=300, max_age=86400)
    try:
        yield Node(store, verifier, host, clock, tmp_path / "nm.sqlite")
    finally:
        store.close()


@pytest.fixture
def node(tmp_path: Path, keys: Keys) -> Iterator[Node]:
    (tmp_path / "a.asc").write_bytes(keys.a_keyring)
    yield from make_node(tmp_path, load_ticket_keyring(tmp_path / "a.asc"))


# --- accepted tickets ----------------------------------------------------------------------------


def _assert_recorded(node: Node, name: str = SLICE, controller: str = CONTROLLER) -> None:
    record = node.store.sliver(name)
    assert record == Sliver(name=name, slice_id=42, instantiation=DELEGATED, expires=NOW + 3600,
                            timestamp=NOW - 10, source=SOURCE_TICKET, keys=(KEY,),
                            attributes=(("nm_cpu_share", "4"), ("delegations", controller)), controller=controller)
    assert node.store.ticket_mark(name) == NOW - 10


@needs_gpg1
@pytest.mark.parametrize("caller", [THE_CONTROLLER, ROOT], ids=["controller", "root"])
def test_a_stock_myplc_ticket_gpg1_dsa1024_is_accepted(tmp_path: Path, keys: Keys, caller: Caller) -> None:
    """gpg1, a DSA-1024 key in a GnuPG-1 keyring, SHA-1, compressed: exactly MyPLC's ticket."""
    signed = sign(keys.plc_home, content(), gpg="gpg1").decode("ascii")
    assert signed.startswith("-----BEGIN PGP MESSAGE-----\n")
    assert keys.plc_keyring[0] == 0x99 and keys.plc_keyring[3] == 4 and keys.plc_keyring[8] == 17  # v4 DSA key
    assert int.from_bytes(keys.plc_keyring[9:11], "big") == 1024  # the bit count of p
    (tmp_path / "pubring.gpg").write_bytes(keys.plc_keyring)
    for node in make_node(tmp_path, load_ticket_keyring(tmp_path / "pubring.gpg")):
        assert node.verifier.redeem(signed, caller) == SLICE
        _assert_recorded(node)


@needs_gpg
def test_a_gpg2_ticket_is_accepted_against_an_armored_key(node: Node, keys: Keys) -> None:
    assert node.verifier.redeem(ticket(keys), THE_CONTROLLER) == SLICE
    _assert_recorded(node)
    assert node.host.programs.count("gpgv") == 1


@needs_gpg
def test_a_ticket_with_an_xml_declaration_and_the_controller_tag_is_accepted(node: Node, keys: Keys) -> None:
    body = xmlrpc.client.dumps(({"timestamp": NOW - 10, "initscripts": [],
                                 "slivers": [sliver(tag="controller")]},), methodresponse=True).encode()
    assert node.verifier.redeem(ticket(keys, body), THE_CONTROLLER) == SLICE
    assert node.store.sliver(SLICE).controller == CONTROLLER  # type: ignore[union-attr]


@needs_gpg
def test_a_ticket_for_two_slivers_stores_both_in_one_go(node: Node, keys: Keys) -> None:
    signed = ticket(keys, content(sliver(), sliver(SLICE2, controller=f"plc_other, {CONTROLLER}")))
    assert node.verifier.redeem(signed, THE_CONTROLLER) == f"{SLICE},{SLICE2}"
    assert node.store.sliver(SLICE2).controller == CONTROLLER  # type: ignore[union-attr]
    assert node.store.ticket_mark(SLICE) == node.store.ticket_mark(SLICE2) == NOW - 10


@needs_gpg
def test_the_controller_can_come_from_the_record_the_node_holds(node: Node, keys: Keys) -> None:
    held = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 50, timestamp=NOW - 20,
                  source=SOURCE_AUTHORITY, controller=CONTROLLER)
    node.store.apply_records([held], [])
    assert node.verifier.redeem(ticket(keys, content(sliver(controller=None))), THE_CONTROLLER) == SLICE
    record = node.store.sliver(SLICE)
    assert record is not None and record.source == SOURCE_TICKET and record.expires == NOW + 3600
    assert record.controller == CONTROLLER


# --- hostile tickets -----------------------------------------------------------------------------


def _uncompressed(keys: Keys, body: bytes | None = None) -> list[bytes]:
    packets = split_packets(sign(keys.home, content() if body is None else body, users=(keys.a,),
                                 mode=("--sign",), extra=("--compress-algo", "none")))
    assert [packet_tag(p) for p in packets] == [4, 11, 2]  # one-pass signature, literal, signature
    return packets


def _second_literal_inside(keys: Keys) -> str:
    ops, literal, signature = _uncompressed(keys)
    return armor(ops + literal + literal_packet(content(sliver(SLICE2))) + signature)


def _literal_before(keys: Keys) -> str:
    ops, literal, signature = _uncompressed(keys)
    return armor(literal_packet(content(sliver(SLICE2))) + ops + literal + signature)


def _literal_after(keys: Keys) -> str:
    ops, literal, signature = _uncompressed(keys)
    return armor(ops + literal + signature + literal_packet(content(sliver(SLICE2))))


def _tampered(keys: Keys) -> str:
    ops, literal, signature = _uncompressed(keys)
    assert literal.count(b"<int>42</int>") == 1
    return armor(ops + literal.replace(b"<int>42</int>", b"<int>43</int>") + signature)


def _second_armored_block(keys: Keys) -> str:
    return ticket(keys) + ticket(keys, content(sliver(SLICE2)))


def _text_before_the_armor(keys: Keys) -> str:
    return "Here is your ticket:\n" + ticket(keys)


def _bad_crc(keys: Keys) -> str:
    lines = ticket(keys).splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("="))
    lines[index] = "=AAAA" if lines[index] != "=AAAA" else "=BBBB"
    return "\n".join(lines)


def _nested(depth: int) -> bytes:
    value = "<value><int>1</int></value>"
    for _ in range(depth):
        value = f"<value><array><data>{value}</data></array></value>"
    return f"<methodResponse><params><param>{value}</param></params></methodResponse>".encode()


def _mark(issued: int) -> Callable[[Node], None]:
    def prepare(node: Node) -> None:
        older = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 50, timestamp=issued,
                       source=SOURCE_TICKET, controller=CONTROLLER)
        assert node.store.redeem_ticket(older, issued)
    return prepare


def _authority_record(node: Node) -> None:
    node.store.apply_records([Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 50,
                                     timestamp=NOW, source=SOURCE_AUTHORITY, controller=CONTROLLER)], [])


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Keys], str]
    reason: TicketReason
    before_gpgv: bool = False
    caller: Caller = THE_CONTROLLER
    prepare: Callable[[Node], None] | None = None


HOSTILE = [
    # the form
    Case("clearsigned", lambda k: ticket(k, mode=("--clearsign",)), TicketReason.MALFORMED, before_gpgv=True),
    Case("detached", lambda k: ticket(k, mode=("--armor", "--detach-sign")), TicketReason.MALFORMED,
         before_gpgv=True),
    Case("garbage-armor", lambda k: "-----BEGIN PGP MESSAGE-----\n\n!!not base64!!\n-----END PGP MESSAGE-----\n",
         TicketReason.MALFORMED, before_gpgv=True),
    Case("garbage-packets", lambda k: armor(b"\x99" + bytes(range(256)) * 4), TicketReason.SIGNATURE),
    Case("bad-armor-checksum", _bad_crc, TicketReason.MALFORMED, before_gpgv=True),
    Case("two-armored-blocks", _second_armored_block, TicketReason.MALFORMED, before_gpgv=True),
    Case("text-before-the-armor", _text_before_the_armor, TicketReason.MALFORMED, before_gpgv=True),
    Case("huge", lambda k: armor(b"\xa3\x01" + bytes(200 * 1024)), TicketReason.TOO_LARGE, before_gpgv=True),
    # the signature
    Case("unsigned-literal-gpg-store", lambda k: ticket(k, mode=("--armor", "--store")), TicketReason.SIGNATURE),
    Case("another-key", lambda k: ticket(k, users=(k.s,)), TicketReason.SIGNATURE),
    Case("two-signatures-one-unknown", lambda k: ticket(k, users=(k.a, k.s)), TicketReason.SIGNATURE),
    Case("tampered-body", _tampered, TicketReason.SIGNATURE),
    Case("second-literal-inside", _second_literal_inside, TicketReason.SIGNATURE),
    Case("unsigned-literal-before", _literal_before, TicketReason.SIGNATURE),
    Case("unsigned-literal-after", _literal_after, TicketReason.SIGNATURE),
    Case("compression-bomb", lambda k: ticket(k, b"<methodResponse>" + b" " * (8 << 20)), TicketReason.TOO_LARGE),
    # the signed content
    Case("deeply-nested", lambda k: ticket(k, _nested(200)), TicketReason.MALFORMED),
    Case("doctype", lambda k: ticket(k, b'<!DOCTYPE x [<!ENTITY a "b">]>' + content()), TicketReason.MALFORMED),
    Case("method-call", lambda k: ticket(k, xmlrpc.client.dumps(({"timestamp": NOW},), "GetSliceTicket").encode()),
         TicketReason.MALFORMED),
    Case("signed-fault", lambda k: ticket(k, xmlrpc.client.dumps(xmlrpc.client.Fault(1, "x"),
                                                                 methodresponse=True).encode()),
         TicketReason.MALFORMED),
    Case("not-a-struct", lambda k: ticket(k, xmlrpc.client.dumps(([1],), methodresponse=True).encode()),
         TicketReason.MALFORMED),
    Case("no-timestamp", lambda k: ticket(k, plc_content({"slivers": [sliver()]})), TicketReason.MALFORMED),
    Case("no-sliver", lambda k: ticket(k, plc_content({"timestamp": NOW, "slivers": []})), TicketReason.MALFORMED),
    Case("one-bad-sliver-of-two", lambda k: ticket(k, content(sliver(), sliver(SLICE2, keys=[{"key_type": "ssh",
         "key": "ssh-rsa x\nssh-rsa y"}]))), TicketReason.MALFORMED),
    Case("same-slice-twice", lambda k: ticket(k, content(sliver(), sliver())), TicketReason.MALFORMED),
    # the rules (all-or-nothing included)
    Case("too-old", lambda k: ticket(k, content(timestamp=NOW - 86401)), TicketReason.TOO_OLD),
    Case("from-the-future", lambda k: ticket(k, content(timestamp=NOW + 301)), TicketReason.NOT_YET_VALID),
    Case("sliver-expired", lambda k: ticket(k, content(sliver(expires=NOW))), TicketReason.EXPIRED),
    Case("not-delegated", lambda k: ticket(k, content(sliver(instantiation="plc-instantiated"))),
         TicketReason.WRONG_INSTANTIATION),
    Case("another-controller", lambda k: ticket(k), TicketReason.WRONG_CALLER, caller=OTHER_CONTROLLER),
    Case("one-sliver-of-two-names-another-controller",
         lambda k: ticket(k, content(sliver(), sliver(SLICE2, controller="plc_other"))), TicketReason.WRONG_CALLER),
    Case("no-controller-anywhere", lambda k: ticket(k, content(sliver(controller=None))), TicketReason.WRONG_CALLER),
    Case("replay", lambda k: ticket(k), TicketReason.REPLAY, prepare=_mark(NOW - 10)),
    Case("older-than-the-last", lambda k: ticket(k), TicketReason.REPLAY, prepare=_mark(NOW - 5)),
    Case("stale-vs-authority-data", lambda k: ticket(k), TicketReason.STALE, prepare=_authority_record),
]


@needs_gpg
@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_openpgp_ticket_is_refused_and_changes_nothing(case: Case, node: Node, keys: Keys) -> None:
    if case.prepare is not None:
        case.prepare(node)
    before = node.snapshot()
    text = case.build(keys)
    with pytest.raises(TicketRejected) as caught:
        node.verifier.redeem(text, case.caller)
    assert caught.value.reason is case.reason, str(caught.value)
    assert str(caught.value).startswith(case.reason.value)
    assert caught.value.fault_code == 102
    assert node.snapshot() == before
    if case.before_gpgv:
        assert node.host.programs == []


@needs_gpg
def test_two_good_signatures_are_refused(tmp_path: Path, keys: Keys) -> None:
    """Both signers are in the keyring: gpgv accepts it, the node does not (one signature only)."""
    for node in make_node(tmp_path, keys.ab_keyring):
        before = node.snapshot()
        with pytest.raises(TicketRejected, match="bad signature: gpgv saw 2 "):
            node.verifier.redeem(ticket(keys, users=(keys.a, keys.b)), THE_CONTROLLER)
        assert node.snapshot() == before
        assert node.verifier.redeem(ticket(keys, users=(keys.b,)), THE_CONTROLLER) == SLICE


def test_openpgp_tickets_are_refused_without_a_keyring(tmp_path: Path) -> None:
    with Store(tmp_path / "nm.sqlite") as store:
        verifier = TicketVerifier(certificate=None, node_id=lambda: 7, store=store, clock=ManualClock(NOW))
        for text in ("-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----", "<ticket/>"):
            with pytest.raises(TicketRejected) as caught:
                verifier.redeem(text, ROOT)
            assert caught.value.reason is TicketReason.NOT_CONFIGURED and caught.value.fault_code == 102
        assert not store.slivers()


# --- configuration -------------------------------------------------------------------------------


@needs_gpg
def test_the_keyring_alone_enables_openpgp_tickets(tmp_path: Path, keys: Keys) -> None:
    from nodemanager.backends.hollow import HollowBackend
    from nodemanager.operations import SliverOperations
    from nodemanager.workers import WorkerPool

    keyring = tmp_path / "plc.gpg"
    keyring.write_bytes(export_public("gpg", keys.home, keys.a))
    config = parse_config({"authority": {"ticket_cert": str(tmp_path / "missing.pem"),
                                         "ticket_keyring": str(keyring)}})
    with Store(tmp_path / "nm.sqlite") as store:
        pool = WorkerPool(1)
        try:
            operations = SliverOperations(store, HollowBackend(), ManualClock())
            verifier = ticket_redeemer_from_config(config, store=store, operations=operations, pool=pool,
                                                   clock=ManualClock(NOW))
            assert verifier is not None
            assert verifier.redeem(ticket(keys), ROOT) == SLICE
            with pytest.raises(TicketRejected, match="format not configured"):
                verifier.redeem("<ticket/>", ROOT)
            missing = parse_config({"authority": {"ticket_keyring": str(tmp_path / "nope.gpg")}})
            with pytest.raises(ConfigError, match="ticket_keyring"):
                ticket_redeemer_from_config(missing, store=store, operations=operations, pool=pool,
                                            clock=ManualClock(NOW))
        finally:
            pool.shutdown(timeout=10)


def test_a_keyring_that_is_not_openpgp_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("hello\n")
    with pytest.raises(ConfigError, match="neither"):
        load_ticket_keyring(tmp_path / "k")
    (tmp_path / "k").write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\n!!\n-----END PGP PUBLIC KEY BLOCK-----\n")
    with pytest.raises(ConfigError, match="base64"):
        load_ticket_keyring(tmp_path / "k")


# --- pure pieces: armor and gpgv's status --------------------------------------------------------


def test_dearmor_round_trips_and_checks() -> None:
    packets = bytes(range(200))
    assert dearmor(armor(packets)) == packets
    with_header = armor(packets).replace("\n\n", "\nVersion: GnuPG v1\nComment: x\n\n", 1)
    assert dearmor(with_header.replace("\n", "\r\n")) == packets
    without_crc = "\n".join(line for line in armor(packets).splitlines() if not line.startswith("="))
    assert dearmor(without_crc) == packets
    for bad, why in [
        (armor(packets).replace("\n\n", "\n", 1), "empty line"),
        (armor(packets) + "trailing\n", "END PGP MESSAGE"),
        (armor(packets, "PGP SIGNATURE"), "detached"),
        (armor(packets, "PGP SIGNED MESSAGE"), "clearsigned"),
        (armor(packets, "PGP PUBLIC KEY BLOCK"), "is not a"),
        ("-----BEGIN PGP MESSAGE-----\n\n-----END PGP MESSAGE-----", "empty"),
        ("-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----".replace("AAAA", "AAAé"), "ASCII"),
        ("nothing", "not an ASCII-armored"),
    ]:
        with pytest.raises(TicketRejected, match=why):
            dearmor(bad)


def test_openpgp_tickets_are_recognised_by_their_armor() -> None:
    assert is_openpgp_ticket("\n  -----BEGIN PGP MESSAGE-----\n")
    assert is_openpgp_ticket("-----BEGIN PGP SIGNED MESSAGE-----")
    assert not is_openpgp_ticket("<?xml version='1.0'?><ticket/>")
    assert is_openpgp_ticket("Your ticket:\n-----BEGIN PGP MESSAGE-----")  # then refused by dearmor
    assert not is_openpgp_ticket("<ticket>-----BEGIN PGP MESSAGE-----</ticket>")
    assert not is_openpgp_ticket("junk")


GOOD = [
    "PLAINTEXT 62 1700000000 ", "PLAINTEXT_LENGTH 10", "NEWSIG", "KEY_CONSIDERED F1B9 0",
    "SIG_ID x 2026-12-07 1", "GOODSIG 3755 PLC <root@plc>",
    "VALIDSIG F1B980A6349B385A7770E20F375535496B3D951C 2026-12-07 1 0 4 0 17 2 00 "
    "F1B980A6349B385A7770E20F375535496B3D951C",
]


def _status(lines: list[str]) -> bytes:
    return "".join(f"[GNUPG:] {line}\n" for line in lines).encode()


def test_judge_status() -> None:
    assert judge_status(_status(GOOD), 0) == "F1B980A6349B385A7770E20F375535496B3D951C"
    for lines, code, why in [
        (GOOD, 2, "exited with status 2"),
        ([*GOOD, "BADSIG 3755 PLC"], 0, "BADSIG"),
        ([*GOOD, "ERRSIG 1 2 3", "NO_PUBKEY 1"], 0, "not the authority's"),
        ([*GOOD, "EXPKEYSIG 3755 PLC"], 0, "EXPKEYSIG"),
        ([*GOOD, "NEWSIG", "GOODSIG 1 x", GOOD[-1]], 0, "2 NEWSIG"),
        ([*GOOD, "PLAINTEXT 62 1 "], 0, "2 literal data packets"),
        ([line for line in GOOD if not line.startswith("VALIDSIG")], 0, "0 VALIDSIG"),
        ([*GOOD[:-1], "VALIDSIG short"], 0, "no primary key fingerprint"),
        ([], 2, "0 NEWSIG"),
    ]:
        with pytest.raises(TicketRejected, match=why):
            judge_status(_status(lines), code)
    with pytest.raises(TicketRejected, match="unexpected status line"):
        judge_status(_status(GOOD) + b"gpgv: hello\n", 0)
