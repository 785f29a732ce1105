"""Node-side ticket verification (tickets.md): hostile tickets are rejected and change nothing.

Each hostile case is a row of :data:`HOSTILE`: it builds a ticket (signed with the authority's real
key unless the case is about the signature), optionally prepares the store, delivers it as some
caller, and expects ``TicketRejected`` whose message contains the reason. The store (records,
account states, ticket marks) must be exactly as before.
"""

from __future__ import annotations

import logging

import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from nodemanager.plc.signing import (
    SigningIdentity,
    load_or_create_identity,
    sign_document,
)
from nodemanager.backends.hollow import HollowBackend
from nodemanager.config import parse_config
from nodemanager.core.authz import Caller
from nodemanager.core.desired import merge_document
from nodemanager.core.errors import TicketRejected
from nodemanager.core.plan import REASON_EXPIRED, ActionKind, plan_actions
from nodemanager.core.records import (
    DELEGATED,
    NM_CONTROLLER,
    PLC_INSTANTIATED,
    SOURCE_TICKET,
    AuthorityDocument,
    Sliver,
    ValveState,
)
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.story import store_snapshot
from nodemanager.tickets import (
    MAX_TICKET_BYTES,
    TicketVerifier,
    ticket_redeemer_from_config,
)
from nodemanager.workers import WorkerPool

NOW = 1_700_000_000
NODE = 7
SLICE = "site_deleg"
CONTROLLER = "site_ctrl"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
DS = "http://www.w3.org/2000/09/xmldsig#"

ROOT = Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False)
THE_CONTROLLER = Caller(uid=1001, is_root=False, local_account=True, sliver=CONTROLLER, is_controller=True)
OTHER_CONTROLLER = Caller(uid=1002, is_root=False, local_account=True, sliver="site_other", is_controller=True)
PLAIN_SLIVER = Caller(uid=1003, is_root=False, local_account=True, sliver=CONTROLLER, is_controller=False)


@pytest.fixture(scope="module")
def authority_key(tmp_path_factory: pytest.TempPathFactory) -> SigningIdentity:
    directory = tmp_path_factory.mktemp("authority")
    return load_or_create_identity(directory / "key.pem", directory / "cert.pem")


@pytest.fixture(scope="module")
def stranger_key(tmp_path_factory: pytest.TempPathFactory) -> SigningIdentity:
    directory = tmp_path_factory.mktemp("stranger")
    return load_or_create_identity(directory / "key.pem", directory / "cert.pem")


def ticket_element(
    *,
    name: str = SLICE,
    issued: int = NOW - 10,
    expires: int = NOW + 3600,
    slice_expires: int = NOW + 86400,
    instantiation: str = DELEGATED,
    controller: str = CONTROLLER,
    nodes: tuple[int, ...] = (NODE,),
    share: str = "4",
) -> Any:
    root = etree.Element("ticket", id="4b1f", issued=str(issued), expires=str(expires))
    element = etree.SubElement(root, "slice", name=name, id="42", instantiation=instantiation,
                               expires=str(slice_expires))
    etree.SubElement(element, "controller").text = controller
    for node in nodes:
        etree.SubElement(element, "node", id=str(node))
    etree.SubElement(element, "key", type="ssh").text = KEY
    etree.SubElement(element, "attribute", name="nm_cpu_share", value=share)
    return root


def signed(identity: SigningIdentity, **fields: Any) -> str:
    return sign_document(ticket_element(**fields), identity).decode()


@dataclass
class Node:
    store: Store
    verifier: TicketVerifier
    clock: ManualClock
    path: Path

    def snapshot(self) -> tuple[object, ...]:
        return store_snapshot(self.store)


@pytest.fixture
def node(tmp_path: Path, authority_key: SigningIdentity) -> Iterator[Node]:
    store = Store(tmp_path / "nm.sqlite")
    clock = ManualClock(NOW)
    controller = Sliver(name=CONTROLLER, slice_id=1, instantiation=NM_CONTROLLER, expires=NOW + 10**6,
                        timestamp=NOW - 100)
    store.apply_records([controller], [])
    verifier = TicketVerifier(certificate=authority_key.certificate, node_id=lambda: NODE, store=store,
                              clock=clock, max_clock_skew=300)
    try:
        yield Node(store, verifier, clock, tmp_path / "nm.sqlite")
    finally:
        store.close()


# --- the hostile table ---------------------------------------------------------------------------

Build = Callable[[SigningIdentity, SigningIdentity], str]


def _tamper(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _wrap_signature_around_forgery(key: SigningIdentity, _: SigningIdentity) -> str:
    """XSW: a forged ticket carries the genuine signature, the genuine ticket hidden in ds:Object."""
    genuine = etree.fromstring(signed(key).encode())
    signature = genuine.find(f"{{{DS}}}Signature")
    forged = ticket_element(share="1000")
    forged.append(signature)
    obj = etree.SubElement(signature, f"{{{DS}}}Object")
    obj.append(copy.deepcopy(genuine))  # (its signature has moved to the forgery)
    return etree.tostring(forged).decode()


def _with_own_key_value(stranger: SigningIdentity) -> str:
    """Signed by a stranger whose public key rides along in <KeyValue>: self-certifying."""
    from signxml import CanonicalizationMethod, SignatureConstructionMethod, XMLSigner

    signer = XMLSigner(method=SignatureConstructionMethod.enveloped, signature_algorithm="rsa-sha256",
                       c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
    text = etree.tostring(signer.sign(ticket_element(), key=stranger.key)).decode()
    assert "RSAKeyValue" in text
    return text


def _second_slice_inside(key: SigningIdentity, _: SigningIdentity) -> str:
    genuine = etree.fromstring(signed(key).encode())
    genuine.insert(0, ticket_element(name="site_evil")[0])
    return etree.tostring(genuine).decode()


def _second_slice_outside(key: SigningIdentity, _: SigningIdentity) -> str:
    """The extra <slice> sits in the (unsigned, enveloped) signature element."""
    genuine = etree.fromstring(signed(key).encode())
    obj = etree.SubElement(genuine.find(f"{{{DS}}}Signature"), f"{{{DS}}}Object")
    obj.append(ticket_element(name="site_evil")[0])
    return etree.tostring(genuine).decode()


def _embedded_in_forged_root(key: SigningIdentity, _: SigningIdentity) -> str:
    forged = ticket_element(name="site_evil")
    forged.append(etree.fromstring(signed(key).encode()))
    return etree.tostring(forged).decode()


def _reference_to_an_id(key: SigningIdentity, _: SigningIdentity) -> str:
    """Genuinely signed by the authority, but the reference covers only the <slice> (by Id)."""
    from signxml import CanonicalizationMethod, SignatureConstructionMethod, XMLSigner

    element = ticket_element()
    element[0].set("Id", "s1")
    signer = XMLSigner(method=SignatureConstructionMethod.enveloped, signature_algorithm="rsa-sha256",
                       c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0)
    result = signer.sign(element, key=key.key, cert=[key.certificate], reference_uri="#s1")
    return etree.tostring(result).decode()


def _comment_in_controller(key: SigningIdentity, _: SigningIdentity) -> str:
    """Signed for controller 'site_ctrlx'; a comment makes a naive reader see 'site_ctrl'."""
    text = signed(key, controller="site_ctrlx")
    tampered = _tamper(text, "<controller>site_ctrlx</controller>", "<controller>site_ctrl<!---->x</controller>")
    naive = etree.fromstring(tampered.encode()).find("slice/controller")
    assert naive is not None and naive.text == CONTROLLER  # what an unsigned read would trust
    return tampered


def _dtd(entity: str) -> Build:
    def build(key: SigningIdentity, _: SigningIdentity) -> str:
        body = signed(key).split("?>", 1)[1]
        return f'<?xml version="1.0"?>\n<!DOCTYPE ticket [{entity}]>\n{body}'
    return build


def _stale(node: Node) -> None:
    authority = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 10**6, timestamp=NOW,
                       controller=CONTROLLER)
    node.store.apply_records([authority], [])


def _mark(issued: int) -> Callable[[Node], None]:
    mark = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 10**6, timestamp=issued,
                  source=SOURCE_TICKET, controller=CONTROLLER)
    return lambda node: node.store.redeem_ticket(mark, issued)


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    reason: str
    caller: Caller = ROOT
    prepare: Callable[[Node], None] | None = None


HOSTILE = [
    Case("unsigned", lambda k, s: etree.tostring(ticket_element()).decode(), "bad signature"),
    Case("signed-by-another-key", lambda k, s: signed(s), "not signed with the authority's key"),
    Case("own-keyvalue-of-another-key", lambda k, s: _with_own_key_value(s), "not signed with the authority's key"),
    Case("changed-attribute-value", lambda k, s: _tamper(signed(k), 'value="4"', 'value="5"'), "bad signature"),
    Case("changed-expiry", lambda k, s: _tamper(signed(k), f'expires="{NOW + 3600}"', f'expires="{NOW + 9600}"'),
         "bad signature"),
    Case("changed-node-id", lambda k, s: _tamper(signed(k, nodes=(8,)), '<node id="8"/>', '<node id="7"/>'),
         "bad signature"),
    Case("changed-name", lambda k, s: _tamper(signed(k), 'name="site_deleg"', 'name="site_delef"'), "bad signature"),
    Case("signature-wraps-forged-slice", _wrap_signature_around_forgery, "bad signature"),
    Case("second-slice-inside-signed-element", _second_slice_inside, "bad signature"),
    Case("second-slice-outside-signed-element", _second_slice_outside, "bad signature"),
    Case("signed-ticket-inside-forged-root", _embedded_in_forged_root, "bad signature"),
    Case("reference-uri-to-an-id", _reference_to_an_id, 'URI=""'),
    Case("comment-injection-in-controller", _comment_in_controller, "wrong caller", THE_CONTROLLER),
    Case("expired", lambda k, s: signed(k, issued=NOW - 7200, expires=NOW - 1), "expired"),
    Case("expires-now", lambda k, s: signed(k, expires=NOW), "expired"),
    Case("slice-expired", lambda k, s: signed(k, slice_expires=NOW - 1), "expired"),
    Case("issued-in-the-future", lambda k, s: signed(k, issued=NOW + 301, expires=NOW + 9000), "not yet valid"),
    Case("another-node", lambda k, s: signed(k, nodes=(8, 9)), "wrong node"),
    Case("replay-same-issued", lambda k, s: signed(k), "replay", prepare=_mark(NOW - 10)),
    Case("replay-older", lambda k, s: signed(k), "replay", prepare=_mark(NOW - 5)),
    Case("wrong-instantiation", lambda k, s: signed(k, instantiation=PLC_INSTANTIATED), "wrong instantiation"),
    Case("controller-instantiation", lambda k, s: signed(k, instantiation=NM_CONTROLLER), "wrong instantiation"),
    Case("name-traversal", lambda k, s: signed(k, name="../x"), "invalid slice name"),
    Case("name-root", lambda k, s: signed(k, name="root"), "invalid slice name"),
    Case("name-too-long", lambda k, s: signed(k, name="site_" + "x" * 40), "invalid slice name"),
    Case("internal-entity", _dtd('<!ENTITY x "site_evil">'), "DOCTYPE"),
    Case("billion-laughs", _dtd('<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;">'),
         "DOCTYPE"),
    Case("external-entity", _dtd('<!ENTITY x SYSTEM "file:///etc/passwd">'), "DOCTYPE"),
    Case("oversized", lambda k, s: signed(k) + " " * MAX_TICKET_BYTES, "too large"),
    Case("oversized-multibyte", lambda k, s: signed(k) + "\u00e9" * (MAX_TICKET_BYTES // 2 + 1), "too large"),
    Case("not-xml", lambda k, s: "this is not a ticket", "malformed"),
    Case("delivered-by-another-controller", lambda k, s: signed(k), "wrong caller", OTHER_CONTROLLER),
    Case("delivered-by-a-non-controller-sliver", lambda k, s: signed(k), "wrong caller", PLAIN_SLIVER),
    Case("stale-vs-authority-data", lambda k, s: signed(k, issued=NOW - 10), "stale", prepare=_stale),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c.id for c in HOSTILE])
def test_hostile_ticket_is_rejected_and_changes_nothing(
    case: Case, node: Node, authority_key: SigningIdentity, stranger_key: SigningIdentity
) -> None:
    if case.prepare is not None:
        case.prepare(node)
    before = node.snapshot()
    ticket = case.build(authority_key, stranger_key)
    with pytest.raises(TicketRejected) as caught:
        node.verifier.redeem(ticket, case.caller)
    assert case.reason in str(caught.value)
    assert caught.value.fault_code == 102
    assert node.snapshot() == before


# --- accepted tickets ----------------------------------------------------------------------------


@pytest.mark.parametrize("caller", [ROOT, THE_CONTROLLER], ids=["root", "controller"])
def test_a_valid_ticket_records_the_delegated_sliver(
    caller: Caller, node: Node, authority_key: SigningIdentity
) -> None:
    assert node.verifier.redeem(signed(authority_key), caller) == SLICE
    record = node.store.sliver(SLICE)
    assert record == Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 3600,
                            timestamp=NOW - 10, source=SOURCE_TICKET, keys=(KEY,),
                            attributes=(("nm_cpu_share", "4"),), controller=CONTROLLER)
    assert node.store.ticket_mark(SLICE) == NOW - 10
    assert node.store.account(SLICE) is None  # the account waits for Create()


def test_expiry_is_the_earlier_of_ticket_and_slice(node: Node, authority_key: SigningIdentity) -> None:
    node.verifier.redeem(signed(authority_key, expires=NOW + 10**6, slice_expires=NOW + 500), ROOT)
    record = node.store.sliver(SLICE)
    assert record is not None and record.expires == NOW + 500


def test_a_newer_ticket_updates_and_the_skew_is_tolerated(node: Node, authority_key: SigningIdentity) -> None:
    node.verifier.redeem(signed(authority_key), ROOT)
    node.verifier.redeem(signed(authority_key, issued=NOW + 300, expires=NOW + 4000, share="9"), THE_CONTROLLER)
    record = node.store.sliver(SLICE)
    assert record is not None and record.attributes == (("nm_cpu_share", "9"),)
    assert node.store.ticket_mark(SLICE) == NOW + 300


def test_a_ticket_newer_than_the_authority_data_replaces_it(node: Node, authority_key: SigningIdentity) -> None:
    _stale(node)  # authority record stamped NOW
    node.verifier.redeem(signed(authority_key, issued=NOW + 1), ROOT)
    record = node.store.sliver(SLICE)
    assert record is not None and record.source == SOURCE_TICKET and record.timestamp == NOW + 1


def test_the_replay_mark_survives_a_restart(node: Node, authority_key: SigningIdentity) -> None:
    ticket = signed(authority_key)
    node.verifier.redeem(ticket, ROOT)
    node.store.close()
    reopened = Store(node.path)
    try:
        verifier = replace_store(node.verifier, reopened)
        with pytest.raises(TicketRejected, match="replay"):
            verifier.redeem(ticket, ROOT)
    finally:
        reopened.close()


def replace_store(verifier: TicketVerifier, store: Store) -> TicketVerifier:
    return TicketVerifier(certificate=verifier.certificate, node_id=verifier.node_id, store=store,
                          clock=verifier.clock, max_clock_skew=verifier.max_clock_skew)


def test_concurrent_deliveries_of_one_ticket_redeem_it_once(node: Node, authority_key: SigningIdentity) -> None:
    ticket = signed(authority_key)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def deliver() -> None:
        barrier.wait()
        try:
            outcomes.append(node.verifier.redeem(ticket, ROOT))
        except TicketRejected as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count(SLICE) == 1
    assert sum("replay" in o for o in outcomes) == 7


def test_store_redeem_ticket_refuses_an_old_mark_atomically(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        record = Sliver(name=SLICE, slice_id=1, instantiation=DELEGATED, expires=NOW, timestamp=5, source=SOURCE_TICKET)
        assert store.redeem_ticket(record, 5)
        assert not store.redeem_ticket(replace(record, slice_id=2), 5)
        assert store.sliver(SLICE) == record and store.ticket_mark(SLICE) == 5
        assert store.redeem_ticket(replace(record, slice_id=3, timestamp=6), 6)
        assert store.ticket_mark(SLICE) == 6


def test_create_on_redeem_creates_the_account_through_the_workers(
    tmp_path: Path, authority_key: SigningIdentity
) -> None:
    clock = ManualClock(NOW)
    backend = HollowBackend()
    pool = WorkerPool(1)
    with Store(tmp_path / "nm.sqlite") as store:
        operations = SliverOperations(store, backend, clock)
        verifier = TicketVerifier(certificate=authority_key.certificate, node_id=lambda: NODE, store=store,
                                  clock=clock, create_on_redeem=True, operations=operations, pool=pool)
        try:
            assert verifier.redeem(signed(authority_key), ROOT) == SLICE
        finally:
            pool.shutdown(cancel_pending=False, timeout=10)
        state = store.account(SLICE)
        assert state is not None and state.create_requested and state.owned and state.uid is not None
        assert backend.account(SLICE) is not None


def test_no_certificate_means_tickets_are_not_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, authority_key: SigningIdentity
) -> None:
    config = parse_config({"authority": {"ticket_cert": str(tmp_path / "missing.pem")}})
    with Store(tmp_path / "nm.sqlite") as store:
        pool = WorkerPool(1)
        try:
            operations = SliverOperations(store, HollowBackend(), ManualClock())
            with caplog.at_level(logging.WARNING, logger="nodemanager.tickets"):
                assert ticket_redeemer_from_config(config, store=store, operations=operations, pool=pool,
                                                   clock=ManualClock()) is None
            assert "tickets-disabled" in caplog.text
            (tmp_path / "cert.pem").write_bytes(authority_key.certificate_pem())
            (tmp_path / "node_id").write_text(f"{NODE}\n")
            config = parse_config({"authority": {"ticket_cert": str(tmp_path / "cert.pem"),
                                                 "node_id_file": str(tmp_path / "node_id")}})
            verifier = ticket_redeemer_from_config(config, store=store, operations=operations, pool=pool,
                                                   clock=ManualClock(NOW))
            assert verifier is not None and verifier.node_id() == NODE
            assert verifier.redeem(signed(authority_key), ROOT) == SLICE
        finally:
            pool.shutdown(timeout=10)


def test_unreadable_node_id_rejects_without_change(node: Node, authority_key: SigningIdentity,
                                                   tmp_path: Path) -> None:
    from nodemanager.tickets import NodeIdFile

    verifier = TicketVerifier(certificate=authority_key.certificate, node_id=NodeIdFile(tmp_path / "absent"),
                              store=node.store, clock=node.clock)
    before = node.snapshot()
    with pytest.raises(TicketRejected, match="node id unknown"):
        verifier.redeem(signed(authority_key), ROOT)
    assert node.snapshot() == before


# --- what the sync does with ticket records (core.desired, core.plan) -----------------------------


def test_a_document_that_does_not_list_a_ticket_sliver_keeps_it() -> None:
    ticket = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 60, timestamp=NOW - 10,
                    source=SOURCE_TICKET, controller=CONTROLLER)
    result = merge_document({SLICE: ticket}, AuthorityDocument(timestamp=NOW + 100, node_id=NODE), ValveState(),
                            max_delete_fraction=0.5, confirm_after=2)
    assert result.records == {SLICE: ticket} and result.deletes == ()


def test_a_newer_document_listing_the_slice_takes_over_and_an_older_one_does_not() -> None:
    ticket = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 60, timestamp=NOW,
                    source=SOURCE_TICKET, controller=CONTROLLER)
    listed = replace(ticket, attributes=(("nm_cpu_share", "1"),), source="authority")
    older = merge_document({SLICE: ticket}, AuthorityDocument(timestamp=NOW - 1, node_id=NODE, slivers=(listed,)),
                           ValveState(), max_delete_fraction=0.5, confirm_after=2)
    assert older.records[SLICE] == ticket and older.stale_kept == (SLICE,)
    newer = merge_document({SLICE: ticket}, AuthorityDocument(timestamp=NOW + 1, node_id=NODE, slivers=(listed,)),
                           ValveState(), max_delete_fraction=0.5, confirm_after=2)
    assert newer.records[SLICE].source == "authority"


def test_a_ticket_sliver_is_destroyed_at_its_expiry() -> None:
    ticket = Sliver(name=SLICE, slice_id=42, instantiation=DELEGATED, expires=NOW + 60, timestamp=NOW,
                    source=SOURCE_TICKET, controller=CONTROLLER)
    assert plan_actions({SLICE: ticket}, {}, {}, NOW + 59, may_destroy_orphans=True) == []
    actions = plan_actions({SLICE: ticket}, {}, {}, NOW + 60, may_destroy_orphans=True)
    assert [(a.kind, a.name, a.reason) for a in actions] == [(ActionKind.DESTROY, SLICE, REASON_EXPIRED)]
