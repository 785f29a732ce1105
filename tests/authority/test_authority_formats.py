"""Wire formats: the hardened XML-RPC unmarshaller, slices.xml, slivers.json, URL dispatch."""

from __future__ import annotations

import json
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.authority.parse import (
    KIND_JSON,
    KIND_SLICES_XML,
    KIND_XMLRPC,
    document_kind,
    load_document,
    loads_xmlrpc_call,
    loads_xmlrpc_response,
    parse_slices_xml,
    parse_slivers_json,
)
from nodemanager.core.errors import AuthorityError, ConfigError, DocumentRejected

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"

SLICES_XML = f"""<?xml version="1.0" encoding="UTF-8"?>
<slices timestamp="1160000000" node_id="7" bwcap="100000" hostname="n7.example.org">
  <!-- a comment is fine -->
  <slice name="princeton_sirius" id="12" instantiation="plc-instantiated" expires="1170000000">
    <key type="ssh">{KEY}</key>
    <attribute name="nm_cpu_share" value="2"/>
    <attribute name="vsys" value="a"/>
    <attribute name="vsys" value="b"/>
    <attribute name="initscript_code">#!/bin/sh
echo hi</attribute>
  </slice>
  <slice name="Bad.Name" id="13" instantiation="plc-instantiated" expires="1170000000"/>
  <slice name="princeton_bad" id="x14" instantiation="plc-instantiated" expires="1170000000"/>
  <slice name="princeton_mixed" id="15" instantiation="plc-instantiated" expires="1170000000">
    <key type="ssh">{KEY}<b/>tail</key>
  </slice>
  <unknown/>
</slices>
""".encode()


def response(value: Any) -> bytes:
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()


# --------------------------------------------------------------------------- XML-RPC

RICH = {
    "int": 5, "neg": -3, "bool": True, "no": False, "double": 2.5, "nil": None,
    "empty": "", "spaces": "  padded\n", "unicode": "ü€😀", "escaped": "<&>\"'",
    "bin": xmlrpc.client.Binary(b"\x00\x01binary"), "nested": [[1, [2, {"a": []}]], {}],
}


def test_unmarshaller_matches_xmlrpc_client_on_rich_values() -> None:
    body = response(RICH)
    ours = loads_xmlrpc_response(body, 1 << 20)
    theirs = xmlrpc.client.loads(body, use_builtin_types=True)[0][0]
    assert ours == theirs


def test_implicit_string_and_i8_are_understood() -> None:
    body = (b"<?xml version='1.0'?><methodResponse><params><param><value><struct>"
            b"<member><name>a</name><value>plain text</value></member>"
            b"<member><name>b</name><value><i8>9000000000</i8></value></member>"
            b"<member><name>c</name><value><string/></value></member>"
            b"</struct></value></param></params></methodResponse>")
    assert loads_xmlrpc_response(body, 4096) == {"a": "plain text", "b": 9_000_000_000, "c": ""}


_xml_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff") | st.sampled_from("\t\n "),
    max_size=20,
)
xmlrpc_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**31), 2**31 - 1) | _xml_text
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text("abc_", max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(xmlrpc_values)
def test_unmarshaller_agrees_with_the_stdlib(value: Any) -> None:
    body = response(value)
    assert loads_xmlrpc_response(body, 1 << 20) == xmlrpc.client.loads(body, use_builtin_types=True)[0][0]


def test_fault_raises_authority_error_with_the_fault_string() -> None:
    body = xmlrpc.client.dumps(xmlrpc.client.Fault(103, "Failed to authenticate call"), methodresponse=True).encode()
    with pytest.raises(AuthorityError, match="Failed to authenticate call") as info:
        loads_xmlrpc_response(body, 4096)
    assert not isinstance(info.value, DocumentRejected)


BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10) for i in range(1, 10))
    + b"]><methodResponse><params><param><value><string>&lol9;</string></value></param></params></methodResponse>"
)
EXTERNAL_ENTITY = (
    b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
    b"<methodResponse><params><param><value><string>&e;</string></value></param></params></methodResponse>"
)
EXTERNAL_DTD = (
    b'<?xml version="1.0"?><!DOCTYPE methodResponse SYSTEM "http://127.0.0.1:9/evil.dtd">'
    b"<methodResponse><params><param><value>x</value></param></params></methodResponse>"
)
UTF16_DOCTYPE = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "b">]><methodResponse/>'.encode("utf-16")
GOOD = response({"a": 1})

HOSTILE = {
    "billion laughs": BILLION_LAUGHS,
    "external entity": EXTERNAL_ENTITY,
    "external dtd": EXTERNAL_DTD,
    "utf16 doctype": UTF16_DOCTYPE,
    "truncated": GOOD[: len(GOOD) // 2],
    "not xml": b"HTTP/1.1 502 Bad Gateway <html>",
    "empty": b"",
    "wrong root": b"<methodCall><params/></methodCall>",
    "unknown type": b"<methodResponse><params><param><value><evil>1</evil></value></param></params></methodResponse>",
    "bad int": b"<methodResponse><params><param><value><int>one</int></value></param></params></methodResponse>",
    "bad boolean": b"<methodResponse><params><param><value><boolean>yes</boolean></value></param></params></methodResponse>",
    "bad member": b"<methodResponse><params><param><value><struct><member><value>1</value></member></struct></value></param></params></methodResponse>",
    "two params": response(1).replace(b"</params>", b"<param><value>2</value></param></params>"),
    "no params": b"<methodResponse/>",
    "huge int": b"<methodResponse><params><param><value><int>" + b"9" * 5000 + b"</int></value></param></params></methodResponse>",
    "deep nesting": b"<methodResponse><params><param>" + b"<value><array><data>" * 400 + b"</data></array></value>" * 400 + b"</param></params></methodResponse>",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_or_malformed_xmlrpc_is_rejected(name: str) -> None:
    with pytest.raises(DocumentRejected):
        loads_xmlrpc_response(HOSTILE[name], 1 << 20)


def test_size_cap_is_checked_before_parsing() -> None:
    with pytest.raises(DocumentRejected, match="cap"):
        loads_xmlrpc_response(b"<" * 2000, 1000)  # not even XML: the size is what is reported


def test_methodcall_parsing_for_the_server() -> None:
    body = xmlrpc.client.dumps(({"AuthMethod": "hmac"}, "site_x"), "GetSliceTicket").encode()
    assert loads_xmlrpc_call(body, 4096) == ("GetSliceTicket", ({"AuthMethod": "hmac"}, "site_x"))
    assert loads_xmlrpc_call(b"<methodCall><methodName>Ping</methodName></methodCall>", 4096) == ("Ping", ())
    with pytest.raises(DocumentRejected):
        loads_xmlrpc_call(b"<methodCall><params/></methodCall>", 4096)
    with pytest.raises(DocumentRejected):
        loads_xmlrpc_call(EXTERNAL_ENTITY.replace(b"methodResponse", b"methodCall"), 4096)


# --------------------------------------------------------------------------- slices.xml


def test_slices_xml_maps_to_the_getslivers_shape_with_per_item_rejections() -> None:
    document, protected = parse_slices_xml(SLICES_XML, expected_node_id=7)
    assert (document.timestamp, document.node_id, document.bwcap_kbps, document.hostname) == (
        1160000000, 7, 100000, "n7.example.org")
    [sirius] = document.slivers
    assert (sirius.name, sirius.slice_id, sirius.expires, sirius.keys) == ("princeton_sirius", 12, 1170000000, (KEY,))
    assert sirius.attributes[:3] == (("nm_cpu_share", "2"), ("vsys", "a"), ("vsys", "b"))
    assert sirius.initscript == "#!/bin/sh\necho hi"
    assert [r.label for r in document.rejected] == ["#1 'Bad.Name'", "#2 'princeton_bad'", "#3 'princeton_mixed'"]
    assert "slice_id" in document.rejected[1].reason
    assert protected == frozenset({"princeton_bad", "princeton_mixed"})


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (SLICES_XML.replace(b'timestamp="1160000000" ', b""), "no timestamp"),
        (SLICES_XML.replace(b'timestamp="1160000000"', b'timestamp="soon"'), "timestamp"),
        (SLICES_XML.replace(b'node_id="7"', b'node_id="8"'), "node 8"),
        (SLICES_XML.replace(b"<slices ", b"<slivers ").replace(b"</slices>", b"</slivers>"), "<slices>"),
        (SLICES_XML[:-40], "well-formed"),
        (b'<!DOCTYPE slices [<!ENTITY x "y">]><slices timestamp="1"/>', "DOCTYPE"),
        (BILLION_LAUGHS, "DOCTYPE"),
        (EXTERNAL_ENTITY, "DOCTYPE"),
    ],
)
def test_bad_slices_xml_is_rejected_as_a_whole(body: bytes, why: str) -> None:
    with pytest.raises(DocumentRejected, match=why):
        parse_slices_xml(body, expected_node_id=7)


def test_slices_xml_size_cap() -> None:
    with pytest.raises(DocumentRejected, match="cap"):
        parse_slices_xml(SLICES_XML, expected_node_id=7, max_bytes=100)


# --------------------------------------------------------------------------- JSON and dispatch


def test_slivers_json() -> None:
    data = {"timestamp": 5, "node_id": 7, "slivers": [
        {"name": "site_a", "slice_id": 1, "instantiation": "plc-instantiated", "expires": 10,
         "keys": [{"key_type": "ssh", "key": KEY}], "attributes": [{"tagname": "nm_cpu_share", "value": "2"}]},
        {"name": "site_b", "slice_id": 2.0, "instantiation": "plc-instantiated", "expires": 10},
    ]}
    document, protected = parse_slivers_json(json.dumps(data).encode(), expected_node_id=7)
    assert [s.name for s in document.slivers] == ["site_a"] and protected == frozenset({"site_b"})
    with pytest.raises(DocumentRejected, match="JSON"):
        parse_slivers_json(b'{"timestamp": ', expected_node_id=7)
    with pytest.raises(DocumentRejected, match="timestamp"):
        parse_slivers_json(b'{"timestamp": NaN, "slivers": []}', expected_node_id=7)
    with pytest.raises(DocumentRejected, match="cap"):
        parse_slivers_json(json.dumps(data).encode(), expected_node_id=7, max_bytes=10)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://plc.example.org/PLCAPI/", KIND_XMLRPC),
        ("http://127.0.0.1:8000/PLCAPI", KIND_XMLRPC),
        ("https://plc.example.org/slices.xml", KIND_SLICES_XML),
        ("http://a/nodes/7/slices.xml?x=1", KIND_SLICES_XML),
        ("file:///var/lib/nm/slices.xml", KIND_SLICES_XML),
        ("file:///var/lib/nm/slivers.json", KIND_JSON),
    ],
)
def test_document_kind_follows_the_url_form(url: str, kind: str) -> None:
    assert document_kind(url) == kind


@pytest.mark.parametrize("url", ["ftp://x/slices.xml", "file:///etc/passwd", "plc.example.org/PLCAPI/"])
def test_unsupported_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        document_kind(url)


def test_load_document_picks_the_parser() -> None:
    document, _ = load_document("file:///x/slices.xml", SLICES_XML, expected_node_id=7, max_bytes=1 << 20)
    assert document.timestamp == 1160000000
    with pytest.raises(DocumentRejected):
        load_document("file:///x/slivers.json", SLICES_XML, expected_node_id=7, max_bytes=1 << 20)
