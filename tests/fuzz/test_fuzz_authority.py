"""Fuzz the authority document parsers: only ``DocumentRejected``, and what is accepted is valid.

Targets: the GetSlivers validator (arbitrary nested values; mutations of a real-PLCAPI-shaped
document) and the slices.xml parser (byte mutations of a valid document).
"""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from nodemanager.authority.parse import parse_getslivers_with_protection, parse_slices_xml
from nodemanager.core.errors import DocumentRejected
from nodemanager.core.records import INSTANTIATIONS, AuthorityDocument, is_valid_name

from .conftest import VALUES, fuzz_settings, mutated_bytes, mutated_structure

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFuzzKey000000000000000000000000000000000 f@z"
FAR = 4_000_000_000

VALID_GETSLIVERS: dict[str, Any] = {
    "timestamp": 1_700_000_000, "node_id": 7, "hostname": "node7.example.org",
    "interfaces": [{"is_primary": True, "bwlimit": 100_000_000}], "groups": None, "accounts": [
        {"name": "root", "keys": [KEY]}],
    "initscripts": [{"name": "hello", "enabled": True, "script": "#!/bin/sh\necho hi\n"}],
    "slivers": [
        {"name": "site_alpha", "slice_id": 1, "instantiation": "plc-instantiated", "expires": FAR,
         "keys": [{"key_type": "ssh", "key": KEY}],
         "attributes": [{"tagname": "cpu_share", "value": "4"}, {"tagname": "vsys", "value": "a"},
                        {"tagname": "vsys", "value": "b"}, {"tagname": "initscript", "value": "hello"}],
         "GetSliceFamily": "f8"},
        {"name": "site_ctl", "slice_id": 2, "instantiation": "nm-controller", "expires": FAR,
         "keys": [], "attributes": []},
        {"name": "site_deleg", "slice_id": 3, "instantiation": "delegated", "expires": FAR,
         "keys": [], "attributes": [{"tagname": "delegations", "value": "site_ctl"}]},
    ],
}

VALID_SLICES_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<slices timestamp="1700000000" node_id="7" bwcap="100000">'
    b'<slice name="site_alpha" id="1" instantiation="plc-instantiated" expires="4000000000">'
    b'<key type="ssh">' + KEY.encode() + b'</key>'
    b'<attribute name="nm_cpu_share" value="2"/><attribute name="initscript_code">echo hi</attribute>'
    b'</slice>'
    b'<slice name="site_beta" id="2" instantiation="delegated" expires="4000000000">'
    b'<attribute name="controller" value="site_alpha"/></slice>'
    b'</slices>'
)


def check_accepted(doc: AuthorityDocument, protected: frozenset[str]) -> None:
    names = [s.name for s in doc.slivers]
    assert len(names) == len(set(names)), names
    for sliver in doc.slivers:
        assert is_valid_name(sliver.name) and len(sliver.name) <= 32, sliver.name
        assert sliver.instantiation in INSTANTIATIONS
        assert type(sliver.expires) is int and type(sliver.slice_id) is int
        assert sliver.timestamp == doc.timestamp
    assert all(is_valid_name(n) for n in protected)
    assert not protected & set(names)  # a protected name is never also accepted


def test_the_valid_documents_are_accepted() -> None:
    doc, protected = parse_getslivers_with_protection(VALID_GETSLIVERS, expected_node_id=7)
    assert [s.name for s in doc.slivers] == ["site_alpha", "site_ctl", "site_deleg"] and not doc.rejected
    xml_doc, _ = parse_slices_xml(VALID_SLICES_XML, expected_node_id=7)
    assert [s.name for s in xml_doc.slivers] == ["site_alpha", "site_beta"]


@fuzz_settings()
@given(VALUES)
def test_getslivers_validator_on_arbitrary_values(value: Any) -> None:
    try:
        doc, protected = parse_getslivers_with_protection(value, expected_node_id=7)
    except DocumentRejected:
        return
    check_accepted(doc, protected)


@fuzz_settings()
@given(mutated_structure(VALID_GETSLIVERS), st.booleans())
def test_getslivers_validator_on_mutated_documents(value: Any, with_now: bool) -> None:
    try:
        doc, protected = parse_getslivers_with_protection(
            value, expected_node_id=7, now=int(time.time()) if with_now else None
        )
    except DocumentRejected:
        return
    check_accepted(doc, protected)
    # an entry is either accepted, rejected with a reason, or (with ``now``) expired: none vanish
    if not with_now and isinstance(value, dict) and isinstance(value.get("slivers"), list):
        assert len(doc.slivers) + len(doc.rejected) == len(value["slivers"])
    assert all(r.reason for r in doc.rejected)


@fuzz_settings()
@given(mutated_bytes(VALID_SLICES_XML))
def test_slices_xml_parser_on_mutated_bytes(body: bytes) -> None:
    try:
        doc, protected = parse_slices_xml(body, expected_node_id=7, max_bytes=64 * 1024)
    except DocumentRejected:
        return
    check_accepted(doc, protected)


@fuzz_settings()
@given(st.binary(max_size=512))
def test_slices_xml_parser_on_arbitrary_bytes(body: bytes) -> None:
    try:
        doc, protected = parse_slices_xml(body, expected_node_id=None, max_bytes=64 * 1024)
    except DocumentRejected:
        return
    check_accepted(doc, protected)
