"""Fuzz ticket parsing: mutated tickets are only ever ``TicketRejected``.

Two targets: :func:`tickets.ticket_data` (the rules applied to the signed element) on mutations of
a valid unsigned ticket, and :func:`tickets.verify_ticket` on byte mutations of a ticket signed by
a real authority identity -- where, in addition, any mutation that still verifies must yield
exactly the original ticket's data (a change the signature does not cover changes nothing).
Skipped with the reason when the ticket verifier or the authority's signer is not present.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemanager.authority.safe_xml import parse_xml_safely
from nodemanager.core.errors import DocumentRejected, TicketRejected

from .conftest import fuzz_settings, mutated_bytes

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzzKey000000000000000000000000000000000 f@z"
TICKET = (
    '<ticket id="0b6f2e0c-9a51-4a53-8c3e-2f0b8e0c1d11" issued="1700000000" expires="4000000000">'
    '<slice name="site_deleg" id="42" instantiation="delegated" expires="4000000000">'
    "<controller>site_ctl</controller><node id=\"7\"/><node id=\"8\"/>"
    f'<key type="ssh">{KEY}</key>'
    '<attribute name="nm_cpu_share" value="4"/>'
    "</slice></ticket>"
).encode()


def _module(name: str, *attributes: str) -> Any:
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} is not present ({exc}): no ticket verifier to fuzz")
    missing = [a for a in attributes if not hasattr(module, a)]
    if missing:
        pytest.skip(f"{name} has no {', '.join(missing)}: no ticket verifier to fuzz")
    return module


@pytest.fixture(scope="module")
def tickets() -> Any:
    return _module("nodemanager.tickets", "ticket_data", "verify_ticket")


@pytest.fixture(scope="module")
def signed(tickets: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[bytes, Any, Any]]:
    """A ticket signed by a freshly generated authority identity: (bytes, certificate, data)."""
    signing = _module("nodemanager.plc.signing", "load_or_create_identity", "sign_document")
    from lxml import etree

    base: Path = tmp_path_factory.mktemp("authority")
    identity = signing.load_or_create_identity(base / "key.pem", base / "cert.pem")
    body = signing.sign_document(etree.fromstring(TICKET), identity)
    data = tickets.verify_ticket(body, identity.certificate)
    yield body, identity.certificate, data


def test_the_valid_ticket_parses(tickets: Any) -> None:
    data = tickets.ticket_data(parse_xml_safely(TICKET, max_bytes=1 << 18, what="ticket"))
    assert data.slice_name == "site_deleg" and tuple(data.node_ids) == (7, 8)


@fuzz_settings()
@given(mutated_bytes(TICKET))
def test_ticket_rules_on_mutated_tickets(tickets: Any, body: bytes) -> None:
    try:
        root = parse_xml_safely(body, max_bytes=1 << 18, what="ticket")
    except DocumentRejected:
        return
    try:
        tickets.ticket_data(root)
    except TicketRejected:
        return


@fuzz_settings()
@given(st.binary(max_size=400) | mutated_bytes(TICKET))
def test_verify_ticket_rejects_unsigned_or_garbage(tickets: Any, signed: tuple[bytes, Any, Any], body: bytes) -> None:
    _, certificate, _ = signed
    with pytest.raises(TicketRejected):
        tickets.verify_ticket(body, certificate)


def test_verify_ticket_on_mutated_signed_tickets(tickets: Any, signed: tuple[bytes, Any, Any]) -> None:
    original, certificate, data = signed

    @fuzz_settings()
    @given(mutated_bytes(original))
    def run(body: bytes) -> None:
        try:
            verified = tickets.verify_ticket(body, certificate)
        except TicketRejected:
            return
        assert verified == data, "a mutation that still verifies changed the ticket's data"

    run()
