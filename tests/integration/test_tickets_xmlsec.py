"""Interoperability with the ``xmlsec1`` tool (tickets.md): both directions, and a forgery.

* a ticket signed with ``xmlsec1 --sign`` (from a template, with the authority's key) is redeemed
  by the node;
* a ticket signed by the bundled authority verifies with ``xmlsec1 --verify`` restricted to the
  authority's certificate;
* a forged ticket that carries its own ``<KeyValue>`` (signed by another key) is rejected by the
  node and by the restricted ``xmlsec1``. What ``xmlsec1`` does without the restricting flags is
  recorded in the test's output (Debian's 1.2.x accepts it), but not asserted: that is the
  tool's business, not ours.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from nodemanager.plc.issue import ticket_element
from nodemanager.plc.model import SliceEntry
from nodemanager.plc.signing import (
    SigningIdentity,
    load_or_create_identity,
    sign_document,
)
from nodemanager.core.authz import Caller
from nodemanager.core.errors import TicketRejected
from nodemanager.core.records import SOURCE_TICKET
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.tickets import TicketVerifier

XMLSEC1 = shutil.which("xmlsec1")
pytestmark = pytest.mark.skipif(XMLSEC1 is None, reason="xmlsec1 is not installed (apt-get install xmlsec1)")

log = logging.getLogger(__name__)
NOW = 1_700_000_000
ROOT = Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False)
ENTRY = SliceEntry(
    name="site_deleg", slice_id=42, instantiation="delegated", expires=NOW + 86400, nodes=None,
    keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org",),
    attributes=(("nm_cpu_share", "4"),), initscript="", controller="site_ctrl",
)
RESTRICTED = ["--enabled-key-data", "x509", "--enabled-reference-uris", "empty"]

SIGNATURE_TEMPLATE = """
<Signature xmlns="http://www.w3.org/2000/09/xmldsig#">
  <SignedInfo>
    <CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
    <SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>
    <Reference URI="">
      <Transforms>
        <Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>
        <Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
      </Transforms>
      <DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>
      <DigestValue></DigestValue>
    </Reference>
  </SignedInfo>
  <SignatureValue></SignatureValue>
  {key_info}
</Signature>
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningIdentity, SigningIdentity]:
    directory = tmp_path_factory.mktemp("keys")
    authority = load_or_create_identity(directory / "authority.key.pem", directory / "authority.pem")
    stranger = load_or_create_identity(directory / "stranger.key.pem", directory / "stranger.pem")
    return authority, stranger


@pytest.fixture
def verifier(tmp_path: Path, keys: tuple[SigningIdentity, SigningIdentity]) -> Iterator[TicketVerifier]:
    with Store(tmp_path / "nm.sqlite") as store:
        yield TicketVerifier(certificate=keys[0].certificate, node_id=lambda: 7, store=store, clock=ManualClock(NOW))


def unsigned_ticket() -> bytes:
    element = ticket_element(ENTRY, ticket_id="t-1", issued=NOW - 5, expires=NOW + 3600, node_ids=[7])
    return etree.tostring(element)


def xmlsec1(*argv: str) -> subprocess.CompletedProcess[str]:
    assert XMLSEC1 is not None
    return subprocess.run([XMLSEC1, *argv], capture_output=True, text=True, timeout=60, check=False)


def sign_with_xmlsec1(tmp_path: Path, identity: SigningIdentity, key_info: str, name: str) -> str:
    body = unsigned_ticket()
    template = body.replace(b"</ticket>", SIGNATURE_TEMPLATE.format(key_info=key_info).encode() + b"</ticket>")
    (tmp_path / f"{name}.template.xml").write_bytes(template)
    out = tmp_path / f"{name}.xml"
    done = xmlsec1("--sign", "--privkey-pem", f"{identity.key_path},{identity.cert_path}",
                   "--output", str(out), str(tmp_path / f"{name}.template.xml"))
    assert done.returncode == 0, done.stderr
    return out.read_text()


def test_a_ticket_signed_by_xmlsec1_is_redeemed(tmp_path: Path, keys: tuple[SigningIdentity, SigningIdentity],
                                                verifier: TicketVerifier) -> None:
    ticket = sign_with_xmlsec1(tmp_path, keys[0], "", "genuine")
    assert "<SignatureValue>" in ticket and "<SignatureValue></SignatureValue>" not in ticket
    assert verifier.redeem(ticket, ROOT) == "site_deleg"
    record = verifier.store.sliver("site_deleg")
    assert record is not None and record.source == SOURCE_TICKET and record.attributes == (("nm_cpu_share", "4"),)


def test_a_ticket_signed_by_the_authority_verifies_with_xmlsec1(
    tmp_path: Path, keys: tuple[SigningIdentity, SigningIdentity]
) -> None:
    authority = keys[0]
    ticket = tmp_path / "ticket.xml"
    ticket.write_bytes(sign_document(etree.fromstring(unsigned_ticket()), authority))
    done = xmlsec1("--verify", *RESTRICTED, "--pubkey-cert-pem", str(authority.cert_path), str(ticket))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stderr
    # and xmlsec1 does check: one changed byte fails
    tampered = tmp_path / "tampered.xml"
    tampered.write_text(ticket.read_text().replace('value="4"', 'value="5"'))
    done = xmlsec1("--verify", *RESTRICTED, "--pubkey-cert-pem", str(authority.cert_path), str(tampered))
    assert done.returncode != 0


def test_a_forged_ticket_with_its_own_key_value_is_rejected(
    tmp_path: Path, keys: tuple[SigningIdentity, SigningIdentity], verifier: TicketVerifier,
    record_property: pytest.RecordProperty,
) -> None:
    authority, stranger = keys
    forged = sign_with_xmlsec1(tmp_path, stranger, "<KeyInfo><KeyValue/></KeyInfo>", "forged")
    assert "<RSAKeyValue>" in forged
    forged_path = tmp_path / "forged.xml"

    unrestricted = xmlsec1("--verify", "--pubkey-cert-pem", str(authority.cert_path), str(forged_path))
    restricted = xmlsec1("--verify", *RESTRICTED, "--pubkey-cert-pem", str(authority.cert_path), str(forged_path))
    # Shown, not asserted: Debian's xmlsec1 1.2.x trusts the ticket's own KeyValue by default.
    outcome = "ACCEPTS" if unrestricted.returncode == 0 else "rejects"
    record_property("xmlsec1_without_restricting_flags", outcome)
    log.warning("xmlsec1 without --enabled-key-data x509 %s a ticket carrying its own KeyValue "
                "(exit %d)", outcome, unrestricted.returncode)

    assert restricted.returncode != 0, restricted.stderr
    before = verifier.store.slivers()
    with pytest.raises(TicketRejected, match="bad signature"):
        verifier.redeem(forged, ROOT)
    assert verifier.store.slivers() == before
    assert verifier.store.ticket_mark("site_deleg") is None
