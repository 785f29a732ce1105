"""The pure half of blocking queries (``authority.blocking``): requests built, answers read.

Tables for every answer the protocol defines and the ways it can go wrong, then hypothesis for
hostile answers: whatever the authority sends, the reading is Changed, NotModified or one of the
three documented errors, never anything else.
"""

from __future__ import annotations

import xmlrpc.client
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.authority.auth import hmac_auth, session_auth, verify_hmac_auth
from nodemanager.authority.blocking import (
    METHOD,
    Changed,
    NotModified,
    WaitRequest,
    index_of_document,
    is_index,
    offers_blocking,
    wait_call,
    wait_outcome,
)
from nodemanager.authority.parse import (
    IGNORED_MEMBERS,
    KIND_JSON,
    KIND_SLICES_XML,
    KIND_XMLRPC,
    PARSED_MEMBERS,
    loads_xmlrpc_call,
    parse_getslivers_with_protection,
)
from nodemanager.core.errors import AuthorityError, AuthorityUnavailable, ConfigError, DocumentRejected

XMLRPC_URL = "http://127.0.0.1:8000/PLCAPI/"
XML_URL = "http://127.0.0.1:8000/slices.xml?node_id=7"
DOC = {"timestamp": 10, "node_id": 7, "slivers": [], "nm_index": "v2"}


def answer(value: Any) -> bytes:
    return xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()


def xmlrpc_request(index: str = "v1", wait: int = 30) -> WaitRequest:
    return wait_call(XMLRPC_URL, index, wait, node_id=7, node_key="secret", margin=5)


def xml_request(index: str = "v1", wait: int = 30) -> WaitRequest:
    return wait_call(XML_URL, index, wait, margin=5)


# ------------------------------------------------------------------------------ requests


def test_xmlrpc_request_is_getsliverswait_with_bootauth_over_index_and_wait() -> None:
    request = xmlrpc_request("abc-1_Z", 120)
    assert (request.method, request.url, request.content_type) == ("POST", XMLRPC_URL, "text/xml")
    assert request.timeout == 125.0 and request.kind == KIND_XMLRPC
    method, params = loads_xmlrpc_call(request.body, 1 << 20)
    assert method == METHOD
    auth, index, wait = params
    assert (index, wait) == ("abc-1_Z", 120)
    assert auth == hmac_auth(7, "secret", ["abc-1_Z", 120])
    # the server's verifier accepts exactly these parameters, and no others
    assert verify_hmac_auth(auth, {7: "secret"}, [index, wait]) == 7
    with pytest.raises(Exception, match="failed to authenticate"):
        verify_hmac_auth(auth, {7: "secret"}, [index, wait + 1])


def test_xmlrpc_request_with_a_session() -> None:
    request = wait_call(XMLRPC_URL, "v1", 10, session="s3ss10n")
    _, (auth, index, wait) = loads_xmlrpc_call(request.body, 1 << 20)
    assert auth == session_auth("s3ss10n") and (index, wait) == ("v1", 10)


def test_slices_xml_request_is_a_conditional_get_with_wait() -> None:
    request = wait_call("https://a.example/x/slices.xml?node_id=7&wait=3&site=s", "idx", 45, margin=2.5)
    assert request.method == "GET" and request.body == b"" and request.content_type == ""
    parts = urlsplit(request.url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "a.example", "/x/slices.xml")
    assert parse_qs(parts.query) == {"node_id": ["7"], "site": ["s"], "wait": ["45"]}
    assert dict(request.headers) == {"If-None-Match": '"idx"'}
    assert request.timeout == 47.5 and request.kind == KIND_SLICES_XML


@pytest.mark.parametrize(
    ("url", "index", "wait", "kwargs", "message"),
    [
        ("file:///srv/slices.xml", "v1", 30, {}, "blocking queries need"),
        ("http://h/slivers.json", "v1", 30, {}, "blocking queries need"),
        (XML_URL, "", 30, {}, "not 1..64"),
        (XML_URL, "a" * 65, 30, {}, "not 1..64"),
        (XML_URL, 'a"b', 30, {}, "not 1..64"),
        (XML_URL, "a\r\nX: y", 30, {}, "not 1..64"),
        (XML_URL, "v1", 0, {}, "wait must be"),
        (XML_URL, "v1", 601, {}, "wait must be"),
        (XML_URL, "v1", True, {}, "wait must be"),
        (XML_URL, "v1", 30, {"margin": 0}, "margin must be positive"),
        (XMLRPC_URL, "v1", 30, {"node_id": 7}, "needs the node id and node key"),
    ],
)
def test_wait_call_refuses_the_callers_mistakes(url: str, index: str, wait: int, kwargs: dict[str, Any],
                                                message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        wait_call(url, index, wait, **kwargs)


@pytest.mark.parametrize(
    ("url", "offers"),
    [(XMLRPC_URL, True), (XML_URL, True), ("https://h/PLCAPI/", True), ("file:///a/slices.xml", False),
     ("file:///a/slivers.json", False), ("http://h/slivers.json", False)],
)
def test_offers_blocking(url: str, offers: bool) -> None:
    assert offers_blocking(url) is offers


@pytest.mark.parametrize(("value", "ok"), [
    ("a", True), ("A-z_09", True), ("x" * 64, True), ("", False), ("x" * 65, False), ("a b", False),
    ("é", False), ("1.2", False), (7, False), (None, False), (b"abc", False),
])
def test_is_index(value: object, ok: bool) -> None:
    assert is_index(value) is ok


# ------------------------------------------------------------------------------ XML-RPC answers


def test_xmlrpc_not_modified() -> None:
    outcome = wait_outcome(xmlrpc_request("v1"), 200, {}, answer({"nm_index": "v1", "nm_not_modified": True}))
    assert outcome == NotModified("v1")


def test_xmlrpc_changed_keeps_the_body_and_the_decoded_struct() -> None:
    body = answer(DOC)
    outcome = wait_outcome(xmlrpc_request("v1"), 200, {}, body)
    assert isinstance(outcome, Changed)
    assert (outcome.body, outcome.index) == (body, "v2")
    assert outcome.data is not None and outcome.data["timestamp"] == 10
    document, _ = parse_getslivers_with_protection(outcome.data, expected_node_id=7)
    assert document.timestamp == 10


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({"nm_index": "v9", "nm_not_modified": True}, DocumentRejected, "names index 'v9'"),
        ({"nm_index": "v1", "nm_not_modified": False}, DocumentRejected, "must be true"),
        ({"nm_index": "v1", "nm_not_modified": 1}, DocumentRejected, "must be true"),
        ({"nm_not_modified": True}, DocumentRejected, "not an index"),
        ({**DOC, "nm_index": "v1"}, DocumentRejected, "already holds"),
        ({**DOC, "nm_index": "bad index"}, DocumentRejected, "not an index"),
        ({**DOC, "nm_index": 12}, DocumentRejected, "not an index"),
        ({k: v for k, v in DOC.items() if k != "nm_index"}, DocumentRejected, "not an index"),
        (["v1"], DocumentRejected, "must be a struct"),
        ("v1", DocumentRejected, "must be a struct"),
    ],
)
def test_xmlrpc_inconsistent_answers_are_rejected(value: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        wait_outcome(xmlrpc_request("v1"), 200, {}, answer(value))


def test_xmlrpc_fault_is_an_authority_error() -> None:
    body = xmlrpc.client.dumps(xmlrpc.client.Fault(100, "no such method GetSliversWait"), methodresponse=True).encode()
    with pytest.raises(AuthorityError, match="GetSliversWait") as info:
        wait_outcome(xmlrpc_request(), 200, {}, body)
    assert not isinstance(info.value, (AuthorityUnavailable, DocumentRejected))


@pytest.mark.parametrize("body", [b"", b"garbage", b"<methodResponse>", b"<!DOCTYPE x><methodResponse/>"])
def test_xmlrpc_garbage_is_rejected(body: bytes) -> None:
    with pytest.raises(DocumentRejected):
        wait_outcome(xmlrpc_request(), 200, {}, body)


@pytest.mark.parametrize(("status", "transient"), [
    (500, True), (502, True), (503, True), (504, True), (429, True), (408, True),
    (404, False), (403, False), (304, False), (301, False), (201, False),
])
def test_xmlrpc_other_statuses_are_unavailable(status: int, transient: bool) -> None:
    with pytest.raises(AuthorityUnavailable, match=f"HTTP {status}") as info:
        wait_outcome(xmlrpc_request(), status, {}, answer({"nm_index": "v1", "nm_not_modified": True}))
    assert ("transient" in str(info.value)) is transient


def test_xmlrpc_answer_over_the_cap_is_rejected() -> None:
    request = wait_call(XMLRPC_URL, "v1", 30, node_id=7, node_key="k", max_bytes=100)
    with pytest.raises(DocumentRejected, match="cap"):
        wait_outcome(request, 200, {}, answer({**DOC, "hostname": "h" * 200}))


# ------------------------------------------------------------------------------ slices.xml answers

NEW_XML = b'<slices timestamp="11" node_id="7"/>'


def test_slices_xml_304_is_not_modified() -> None:
    assert wait_outcome(xml_request("v1"), 304, {"nm-index": "v1", "etag": '"v1"'}, b"") == NotModified("v1")


def test_slices_xml_header_names_in_any_case() -> None:
    assert wait_outcome(xml_request("v1"), 304, {"NM-Index": " v1 "}, b"") == NotModified("v1")


def test_slices_xml_200_is_changed() -> None:
    outcome = wait_outcome(xml_request("v1"), 200, {"nm-index": "v2", "etag": '"v2"'}, NEW_XML)
    assert outcome == Changed(NEW_XML, "v2") and outcome.data is None


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "message"),
    [
        (304, {"nm-index": "v9"}, b"", DocumentRejected, "names index 'v9'"),
        (304, {"etag": '"v1"'}, b"", DocumentRejected, "not an index"),  # a bare ETag is not enough
        (304, {}, b"", DocumentRejected, "not an index"),
        (200, {"nm-index": "v1"}, NEW_XML, DocumentRejected, "already holds"),
        (200, {"nm-index": "x" * 65}, NEW_XML, DocumentRejected, "not an index"),
        (200, {"nm-index": "a/b"}, NEW_XML, DocumentRejected, "not an index"),
        (200, {}, NEW_XML, DocumentRejected, "not an index"),
        (503, {"nm-index": "v1"}, b"", AuthorityUnavailable, "HTTP 503"),
        (404, {}, b"", AuthorityUnavailable, "HTTP 404"),
        (412, {"nm-index": "v1"}, b"", AuthorityUnavailable, "HTTP 412"),
    ],
)
def test_slices_xml_bad_answers(status: int, headers: dict[str, str], body: bytes, error: type[Exception],
                                message: str) -> None:
    with pytest.raises(error, match=message):
        wait_outcome(xml_request("v1"), status, headers, body)


def test_slices_xml_answer_over_the_cap_is_rejected() -> None:
    request = wait_call(XML_URL, "v1", 30, max_bytes=10)
    with pytest.raises(DocumentRejected, match="cap"):
        wait_outcome(request, 200, {"nm-index": "v2"}, NEW_XML)


# ------------------------------------------------------------------------------ ordinary fetches


@pytest.mark.parametrize(
    ("kind", "headers", "data", "index"),
    [
        (KIND_XMLRPC, None, DOC, "v2"),
        (KIND_XMLRPC, None, {"timestamp": 1, "slivers": []}, None),  # a real PLCAPI: polls
        (KIND_XMLRPC, {"nm-index": "h"}, {"timestamp": 1}, None),  # XML-RPC: only the member counts
        (KIND_SLICES_XML, {"nm-index": "x1"}, None, "x1"),
        (KIND_SLICES_XML, {"NM-Index": "x1"}, None, "x1"),
        (KIND_SLICES_XML, {"etag": '"abc"'}, None, None),  # a static web server: polls
        (KIND_SLICES_XML, {}, None, None),
        (KIND_SLICES_XML, None, None, None),  # a file
        (KIND_JSON, {"nm-index": "x1"}, {"nm_index": "x1"}, None),
    ],
)
def test_index_of_document(kind: str, headers: dict[str, str] | None, data: dict[str, Any] | None,
                           index: str | None) -> None:
    assert index_of_document(kind, headers, data) == index


@pytest.mark.parametrize(("kind", "headers", "data"), [
    (KIND_XMLRPC, None, {"nm_index": "two words"}),
    (KIND_XMLRPC, None, {"nm_index": 5}),
    (KIND_SLICES_XML, {"nm-index": "x" * 65}, None),
])
def test_index_of_document_rejects_a_malformed_index(kind: str, headers: dict[str, str] | None,
                                                      data: dict[str, Any] | None) -> None:
    with pytest.raises(DocumentRejected, match="not 1..64"):
        index_of_document(kind, headers, data)


def test_nm_index_is_a_known_member_and_not_a_record() -> None:
    assert "nm_index" in PARSED_MEMBERS and "nm_not_modified" in IGNORED_MEMBERS
    plain, _ = parse_getslivers_with_protection({k: v for k, v in DOC.items() if k != "nm_index"}, expected_node_id=7)
    indexed, _ = parse_getslivers_with_protection(DOC, expected_node_id=7)
    assert indexed == plain and "nm_index" not in indexed.members


# ------------------------------------------------------------------------------ hostile answers

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**31, 2**31 - 1), st.text(max_size=70),
                     st.sampled_from(["v1", "v2", "", "x" * 64, "x" * 65]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["nm_index", "nm_not_modified", "timestamp", "slivers", "x"]), inner, max_size=5),
), max_leaves=12)
ERRORS = (AuthorityUnavailable, DocumentRejected, AuthorityError)


@settings(max_examples=300, deadline=None)
@given(value=_values, status=st.sampled_from([200, 200, 200, 304, 404, 500]))
def test_any_xmlrpc_answer_is_read_or_refused(value: Any, status: int) -> None:
    request = xmlrpc_request("v1")
    try:
        body = answer(value)
    except (TypeError, OverflowError, ValueError):
        return  # not representable in XML-RPC: cannot be sent
    try:
        outcome = wait_outcome(request, status, {}, body)
    except ERRORS:
        return
    assert status == 200 and isinstance(value, dict)
    if isinstance(outcome, NotModified):
        assert outcome.index == "v1" and value.get("nm_not_modified") is True
    else:
        assert isinstance(outcome, Changed) and is_index(outcome.index) and outcome.index != "v1"
        assert outcome.index == value["nm_index"] and "nm_not_modified" not in value


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200))
def test_any_xmlrpc_bytes_are_read_or_refused(body: bytes) -> None:
    try:
        outcome = wait_outcome(xmlrpc_request("v1"), 200, {}, body)
    except ERRORS:
        return
    assert isinstance(outcome, (Changed, NotModified))


@settings(max_examples=300, deadline=None)
@given(status=st.integers(100, 599), index=st.one_of(st.none(), st.text(max_size=70), st.sampled_from(["v1", "v2"])),
       body=st.binary(max_size=50))
def test_any_slices_xml_answer_is_read_or_refused(status: int, index: str | None, body: bytes) -> None:
    headers = {} if index is None else {"nm-index": index}
    try:
        outcome = wait_outcome(xml_request("v1"), status, headers, body)
    except ERRORS:
        return
    if isinstance(outcome, NotModified):
        assert status == 304 and outcome.index == "v1"
    else:
        assert status == 200 and outcome.index != "v1" and is_index(outcome.index) and outcome.body == body
