"""The bundled authority: its TOML data model, the demo file and the HTTP surface."""

from __future__ import annotations

import http.client
import os
import threading
import xmlrpc.client
from pathlib import Path
from typing import Any

import pytest

from nodemanager.authority.auth import hmac_auth
from nodemanager.authority.parse import parse_getslivers_with_protection, parse_slices_xml
from nodemanager.core.errors import ConfigError, NotAllowedForSliver
from nodemanager.core.records import DELEGATED, NM_CONTROLLER, NOT_INSTANTIATED, PLC_INSTANTIATED
from nodemanager.plc.model import getslivers_struct, load_authority_text, slices_xml
from nodemanager.plc.server import AuthorityServer, serve

pytestmark = pytest.mark.timeout(30)

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo-slices.toml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
NODE = '[[nodes]]\nid = 1\nkey = "k"\n'


def load(text: str, timestamp: int = 1000, base_time: int = 1000) -> Any:
    return load_authority_text(text, timestamp=timestamp, base_time=base_time, origin="test.toml")


def request(server: AuthorityServer, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def call(server: AuthorityServer, method: str, *params: Any) -> Any:
    status, body = request(server, "POST", "/PLCAPI/", xmlrpc.client.dumps(params, method, allow_none=True).encode())
    assert status == 200
    return xmlrpc.client.loads(body)[0][0]


# --------------------------------------------------------------------------- model


def test_relative_expiry_counts_from_the_file_time_and_ints_become_strings() -> None:
    data = load(NODE + f'[[slices]]\nname = "site_a"\nid = 1\nexpires = "+2h"\nkeys = ["{KEY}"]\n'
                '[slices.attributes]\nnm_cpu_share = 3\nvsys = ["x", 5]\n', base_time=5000)
    [entry] = data.slices
    assert entry.expires == 4 * 3600  # 5000 + 2 h = 12200, rounded up to a whole hour (relative_expiry)
    assert entry.attributes == (("nm_cpu_share", "3"), ("vsys", "x"), ("vsys", "5"))
    assert entry.nodes is None and entry.instantiation == PLC_INSTANTIATED and data.timestamp == 1000


def test_a_fixed_timestamp_wins() -> None:
    assert load("[authority]\ntimestamp = 77\n" + NODE).timestamp == 77


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (NODE + '[[slices]]\nname = "Bad.Name"\nid = 1\n', "slices[0] ('Bad.Name').name"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\nexpires = "tomorrow"\n', "slices[0] ('site_a').expires"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\nnodes = [1, 9]\n', "slices[0] ('site_a').nodes"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\nkeys = ["not a key"]\n', "slices[0] ('site_a').keys[0]"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\ninstantiation = "sometimes"\n', "instantiation"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\ncolour = "red"\n', "slices[0] ('site_a')"),
        (NODE + '[[slices]]\nname = "site_a"\nid = "one"\n', "slices[0] ('site_a').id"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\n[slices.attributes]\nnm_enabled = true\n', "attributes"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\n[slices.attributes]\ncontroller = "x_y"\n', "attributes"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\n[[slices]]\nname = "site_a"\nid = 2\n', "slices[1] ('site_a').name"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\n[[slices]]\nname = "site_b"\nid = 1\n', "slices[1] ('site_b').id"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\ninstantiation = "delegated"\ncontroller = "site_a"\n',
         "controller"),
        (NODE + '[[slices]]\nname = "site_a"\nid = 1\ncontroller = "site_b"\n', "controller"),
        (NODE + NODE, "nodes[1] (id 1).id"),
        ('[[nodes]]\nid = 1\nkey = ""\n', "key"),
        ("[authority]\ntimestamp = \"yesterday\"\n", "authority.timestamp"),
        ("slices = [", "not valid TOML"),
    ],
)
def test_invalid_data_names_the_slice_and_field(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(text)
    assert where in str(info.value) and "test.toml" in str(info.value)


def test_documents_round_trip_through_the_node_parsers() -> None:
    data = load(NODE + '[[nodes]]\nid = 2\nkey = "k2"\nbwcap = 900\n'
                f'[[slices]]\nname = "site_a"\nid = 1\nnodes = [2]\nkeys = ["{KEY}"]\ninitscript = "echo <&>\\n"\n'
                '[[slices]]\nname = "site_c"\nid = 2\ninstantiation = "nm-controller"\n'
                '[[slices]]\nname = "site_d"\nid = 3\ninstantiation = "delegated"\ncontroller = "site_c"\n')
    from_xmlrpc = parse_getslivers_with_protection(getslivers_struct(data, 2), expected_node_id=2)[0]
    from_xml, _ = parse_slices_xml(slices_xml(data, 2), expected_node_id=2)
    assert from_xml == from_xmlrpc
    assert [s.name for s in from_xml.slivers] == ["site_a", "site_c", "site_d"]
    assert from_xml.slivers[0].initscript == "echo <&>\n" and from_xml.bwcap_kbps == 900
    assert from_xml.slivers[2].controller == "site_c"
    assert [s.name for s in parse_getslivers_with_protection(getslivers_struct(data, 1), expected_node_id=1)[0].slivers] == ["site_c", "site_d"]
    with pytest.raises(KeyError):
        getslivers_struct(data, 3)


def test_the_demo_file() -> None:
    data = load(DEMO.read_text())
    assert data.node_keys == {1: "demo-node-key"}
    kinds = {entry.name: entry.instantiation for entry in data.slices}
    assert 4 <= len(kinds) <= 5
    assert kinds["demo_ctrl"] == NM_CONTROLLER and kinds["demo_deleg"] == DELEGATED
    assert NOT_INSTANTIATED in kinds.values() and PLC_INSTANTIATED in kinds.values()
    assert {entry.name: entry.controller for entry in data.slices}["demo_deleg"] == "demo_ctrl"
    assert all(len("demo" + name) <= 32 for name in kinds)
    assert all(entry.keys and entry.keys[0].startswith("ssh-ed25519 ") for entry in data.slices)
    document = parse_getslivers_with_protection(getslivers_struct(data, 1), expected_node_id=1)[0]
    assert document.rejected == () and len(document.slivers) == len(kinds)


# --------------------------------------------------------------------------- HTTP surface


def test_getslivers_over_xmlrpc(authority: AuthorityServer) -> None:
    answer = call(authority, "GetSlivers", hmac_auth(1, "node-one-key"))
    assert answer["node_id"] == 1 and [s["name"] for s in answer["slivers"]] == ["site_alpha", "site_ctrl"]
    assert call(authority, "GetSlivers", hmac_auth(1, "node-one-key", [1]), 1)["node_id"] == 1


@pytest.mark.parametrize(
    ("method", "params", "code"),
    [
        ("GetSlivers", (hmac_auth(1, "bad"),), 108),
        ("GetSlivers", (hmac_auth(1, "node-one-key", [2]), 2), 108),
        ("GetSlivers", (), 101),
        ("DeleteEverything", (), 100),
    ],
)
def test_faults(authority: AuthorityServer, method: str, params: tuple[Any, ...], code: int) -> None:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(authority, method, *params)
    assert info.value.faultCode == code


def test_a_registered_method_is_served(authority: AuthorityServer) -> None:
    def refuse(server: AuthorityServer, params: Any) -> Any:
        raise NotAllowedForSliver(f"no ticket for {params[1]}")

    authority.register_method("Echo", lambda server, params: [len(server.data().slices), *params])
    authority.register_method("GetSliceTicket", refuse)
    assert call(authority, "Echo", "x") == [3, "x"]
    with pytest.raises(xmlrpc.client.Fault, match="no ticket for site_x") as info:
        call(authority, "GetSliceTicket", {}, "site_x")
    assert info.value.faultCode == 104


def test_an_internal_error_is_a_generic_fault(authority: AuthorityServer) -> None:
    authority.register_method("Boom", lambda server, params: 1 / 0)
    with pytest.raises(xmlrpc.client.Fault, match="internal error"):
        call(authority, "Boom")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/PLCAPI/", b"<methodCall><methodName>GetSlivers", 400),
        ("POST", "/PLCAPI/", b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><methodCall/>', 400),
        ("POST", "/other", b"<methodCall/>", 404),
        ("GET", "/slices.xml?node_id=9", None, 404),
        ("GET", "/slices.xml", None, 400),
        ("GET", "/slices.xml?node_id=abc", None, 400),
        ("GET", "/nodes/1/../../etc/passwd", None, 404),
        ("GET", "/", None, 404),
    ],
)
def test_bad_requests(authority: AuthorityServer, method: str, path: str, body: bytes | None, status: int) -> None:
    assert request(authority, method, path, body)[0] == status


def test_an_oversized_request_is_refused_before_reading_it(authority: AuthorityServer) -> None:
    # Only the announced length matters: the body is never read, so the test sends a short one.
    assert request(authority, "POST", "/PLCAPI/", b"x" * 10, {"Content-Length": str(1024 * 1024 + 1)})[0] == 413


def test_slices_xml_paths(authority: AuthorityServer) -> None:
    status, body = request(authority, "GET", "/nodes/2/slices.xml")
    assert status == 200
    document, _ = parse_slices_xml(body, expected_node_id=2)
    assert [s.name for s in document.slivers] == ["site_ctrl", "site_deleg"]
    assert request(authority, "GET", "/slices.xml?node_id=2") == (status, body)


def test_timestamps_increase_with_every_edit(authority: AuthorityServer, authority_file: Path) -> None:
    stamps = [authority.data().timestamp]
    for n in range(3):
        authority_file.write_text(authority_file.read_text() + f"\n# edit {n}\n")
        stamps.append(authority.data().timestamp)
    assert stamps == sorted(set(stamps)) and len(stamps) == 4
    assert authority.data().timestamp == stamps[-1]  # unchanged file: same document timestamp


def test_an_unreadable_start_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        AuthorityServer(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text('[[slices]]\nname = "x"\nid = 1\n')
    with pytest.raises(ConfigError, match="slices\\[0\\]"):
        AuthorityServer(tmp_path / "bad.toml")


def test_deleting_the_file_keeps_the_last_good_data(authority: AuthorityServer, authority_file: Path) -> None:
    before = authority.data()
    os.unlink(authority_file)
    assert authority.data() == before


def test_serve_until_stopped(authority_file: Path) -> None:
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(authority_file, "127.0.0.1", 0, ready=ready, stop=stop)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(5)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive() and errors == []
