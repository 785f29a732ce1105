"""Fuzz the XML-RPC request path and loan validation.

* ``api.wire.parse_request`` on arbitrary bytes and on mutations of valid request bodies: only
  ``InvalidArgument`` (Fault 102), and what it accepts is a method name and XML-RPC values;
* the whole request path after parsing -- ``NodeManagerApi.dispatch`` as root on a real (hollow)
  node, then the response serialisation -- with arbitrary method names and parameters: every
  failure is one of the documented faults (100, 101, 102, 104, 108), never Fault 1 (a bug);
* ``core.rspec.validate_loans``: only ``InvalidLoans``, or valid ``Loan`` values.
"""

from __future__ import annotations

import tempfile
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemanager.api.faults import to_fault
from nodemanager.api.identity import TRANSPORT_UNIX, PeerIdentity
from nodemanager.api.wire import dump_fault, dump_response, parse_request
from nodemanager.config import parse_config
from nodemanager.core.authz import METHODS
from nodemanager.core.errors import InvalidArgument, InvalidLoans
from nodemanager.core.records import DELEGATED, Loan, is_valid_name
from nodemanager.core.rspec import LOANABLE, validate_loans
from nodemanager.daemon import Node, build_node
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver

from .conftest import INTERESTING_TEXT, VALUES, fuzz_settings, mutated_bytes

XMLRPC_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.binary(max_size=12).map(xmlrpc.client.Binary) | INTERESTING_TEXT,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
#: Values ``xmlrpc.client.dumps`` turns into well-formed XML (XML 1.0 forbids most control chars).
XML_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=30)
WELL_FORMED_VALUES = st.recursive(
    st.booleans() | st.integers(-(2**31), 2**31 - 1) | st.floats(allow_nan=False) | XML_TEXT
    | st.binary(max_size=12).map(xmlrpc.client.Binary),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(XML_TEXT, c, max_size=4),
    max_leaves=20,
)
METHOD_NAMES = st.sampled_from(sorted(METHODS)) | st.text(max_size=20) | st.just("system.listMethods")
SLIVERS = ["site_alpha", "site_beta", "site_deleg"]


def request_body(method: str, params: tuple[Any, ...]) -> bytes:
    return xmlrpc.client.dumps(params, method, allow_none=True).encode("utf-8")


@fuzz_settings()
@given(st.binary(max_size=600))
def test_parse_request_on_arbitrary_bytes(body: bytes) -> None:
    try:
        method, params = parse_request(body)
    except InvalidArgument:
        return
    assert isinstance(method, str) and isinstance(params, tuple)


@fuzz_settings()
@given(st.data())
def test_parse_request_on_mutated_valid_bodies(data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(sorted(METHODS)))
    params = tuple(data.draw(st.lists(XMLRPC_VALUES, max_size=3)))
    original = request_body(method, params)
    body = data.draw(mutated_bytes(original))
    try:
        parsed_method, parsed = parse_request(body)
    except InvalidArgument:
        return
    assert isinstance(parsed_method, str) and isinstance(parsed, tuple)
    dump_response(list(parsed))  # whatever it accepted can be sent back


@fuzz_settings()
@given(st.lists(WELL_FORMED_VALUES, max_size=3), st.sampled_from(sorted(METHODS)))
def test_parse_request_round_trips_valid_bodies(params: list[Any], method: str) -> None:
    parsed_method, parsed = parse_request(request_body(method, tuple(params)))
    assert parsed_method == method and len(parsed) == len(params)


@pytest.fixture(scope="module")
def node_api() -> Iterator[Node]:
    """A hollow node with three slivers (one delegated), API not served: dispatch is called
    directly, as the transport does after parsing."""
    base = Path(tempfile.mkdtemp(prefix="nm-fuzz-"))
    config = parse_config({
        "node": {"data_dir": str(base / "data"), "log_file": ""},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
        "slivers": {"backend": "hollow"},
    })
    authority = FakeAuthority()
    authority.publish([make_sliver("site_alpha"), make_sliver("site_beta"),
                       make_sliver("site_deleg", instantiation=DELEGATED)])
    manager = build_node(config, fetch=authority.fetch)
    manager.start(serve=False)
    try:
        assert manager.sync_once().ok
        yield manager
    finally:
        manager.close()
        import shutil

        shutil.rmtree(base, ignore_errors=True)


CALL_ARGS = st.lists(
    st.sampled_from(SLIVERS) | XMLRPC_VALUES
    | st.lists(st.tuples(st.sampled_from(SLIVERS) | st.text(max_size=8),
                         st.sampled_from(sorted(LOANABLE)) | st.text(max_size=8),
                         st.integers(-5, 2**40)).map(list), max_size=3),
    max_size=3,
)


@fuzz_settings()
@given(METHOD_NAMES, CALL_ARGS, st.sampled_from([0, 4242, None]))
def test_dispatch_answers_only_documented_faults(node_api: Node, method: str, params: list[Any],
                                                 uid: int | None) -> None:
    peer = PeerIdentity(TRANSPORT_UNIX, uid=uid)
    try:
        body = dump_response(node_api.api.dispatch(method, tuple(params), peer))
    except Exception as exc:  # noqa: BLE001 - the property: only documented faults
        fault = to_fault(exc, method=method)
        assert fault.faultCode in (100, 101, 102, 104, 108), (method, params, repr(exc))
        body = dump_fault(fault)
    assert body.startswith(b"<?xml")


@fuzz_settings()
@given(VALUES)
def test_validate_loans_on_arbitrary_values(raw: Any) -> None:
    try:
        loans = validate_loans(raw)
    except InvalidLoans:
        return
    check_loans(loans)


@fuzz_settings()
@given(st.lists(st.lists(st.sampled_from(SLIVERS) | st.sampled_from(sorted(LOANABLE)) | VALUES, max_size=4)
                | VALUES, max_size=5))
def test_validate_loans_on_nearly_valid_lists(raw: Any) -> None:
    try:
        loans = validate_loans(raw)
    except InvalidLoans:
        return
    check_loans(loans)
    assert len(loans) == len(raw)


def check_loans(loans: tuple[Loan, ...]) -> None:
    assert isinstance(loans, tuple)
    for loan in loans:
        assert isinstance(loan, Loan)
        assert is_valid_name(loan.recipient) and loan.resource in LOANABLE
        assert type(loan.amount) is int and loan.amount >= 0
