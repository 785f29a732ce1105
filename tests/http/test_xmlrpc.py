"""The one XML-RPC decoder (nodemanager.http.xmlrpc) and its policies: what each reader accepts."""

from __future__ import annotations

import xmlrpc.client
from datetime import datetime

import pytest

from nodemanager.http.xmlrpc import (
    API_CALL,
    CALL,
    RESPONSE,
    MalformedXmlRpc,
    Policy,
    decode,
    dump_call,
    dump_fault,
    dump_response,
)


def call_with(value_xml: bytes) -> bytes:
    return (b"<methodCall><methodName>M</methodName><params><param><value>" + value_xml
            + b"</value></param></params></methodCall>")


def test_round_trips_every_type() -> None:
    stamp = datetime(2024, 5, 6, 7, 8, 9)
    values = (1, -(2**31), True, 2.5, "s ü", b"\x00\xff" * 40, stamp, [1, [2]], {"k": {"n": None}})
    decoded = decode(dump_call("Do.it", values), CALL)
    assert decoded.method == "Do.it"
    assert decoded.params == values
    response = decode(dump_response({"a": [None]}, allow_none=True), RESPONSE)
    assert response.params == ({"a": [None]},) and response.fault is None
    fault = decode(dump_fault(xmlrpc.client.Fault(104, "no")), RESPONSE)
    assert fault.fault == {"faultCode": 104, "faultString": "no"} and fault.params == ()


@pytest.mark.parametrize(
    ("body", "policy", "words"),
    [
        (call_with(b"<nil/>"), API_CALL, "nil"),
        (dump_response(1), CALL, "root element"),
        (dump_call("M", (1,)), RESPONSE, "root element"),
        (call_with(b"<array><data><value>" * 40 + b"</value></data></array>" * 40), API_CALL, "nested deeper"),
        (call_with(b"<base64>ab!c</base64>"), API_CALL, "base64"),
        (call_with(b"<int>" + b"9" * 30 + b"</int>"), API_CALL, "range"),
        (call_with(b"<boolean>2</boolean>"), API_CALL, "boolean"),
        (call_with(b"<bigdecimal>1</bigdecimal>"), API_CALL, "not allowed"),
        (call_with(b"<string>a</string><string>b</string>"), API_CALL, "more than one"),
        (b"<methodCall><methodName>two words</methodName></methodCall>", API_CALL, "method name"),
        (b"<methodCall><params/></methodCall>", CALL, "methodName"),
        (b"<!DOCTYPE x [<!ENTITY a 'b'>]><methodCall><methodName>M</methodName></methodCall>", CALL, "DTD"),
        (b"", CALL, "empty"),
        (b"<methodCall><methodName>M</methodName>", CALL, "not well-formed"),
        (b"x" * 200, Policy(root="methodCall", allow_nil=True, max_bytes=100), "cap"),
    ],
)
def test_policies_refuse(body: bytes, policy: Policy, words: str) -> None:
    with pytest.raises(MalformedXmlRpc, match=words):
        decode(body, policy)


def test_nil_is_accepted_where_the_policy_allows_it() -> None:
    assert decode(call_with(b"<nil/>"), CALL).params == (None,)
    with pytest.raises(MalformedXmlRpc):
        decode(call_with(b"<nil/>"), API_CALL)


def test_base64_with_line_breaks_and_untyped_strings() -> None:
    assert decode(call_with(b"<base64>AAEC\nAwQ=\n</base64>"), API_CALL).params == (b"\x00\x01\x02\x03\x04",)
    assert decode(call_with(b"bare text"), API_CALL).params == ("bare text",)


def test_a_policy_names_a_known_root() -> None:
    with pytest.raises(ValueError):
        Policy(root="html", allow_nil=False)
