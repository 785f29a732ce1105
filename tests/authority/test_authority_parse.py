"""GetSlivers validation: real PLCAPI answers accepted as they are, bad entries dropped alone."""

from __future__ import annotations

import copy
import xmlrpc.client
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.authority.parse import (
    load_document,
    loads_xmlrpc_response,
    parse_getslivers_with_protection,
)
from nodemanager.core.errors import DocumentRejected
from nodemanager.core.records import SOURCE_AUTHORITY, Sliver

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQDexample0123456789abcdefABCDEF+/xyz== bob@host"


def sliver_entry(name: object, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "slice_id": 7,
        "instantiation": "plc-instantiated",
        "expires": 2_000_000_000,
        "keys": [{"key_type": "ssh", "key": KEY_A}],
        "attributes": [{"tagname": "cpu_share", "value": "3"}],
        "GetSliceFamily": "lxc-f20-x86_64",
    }
    entry.update(changes)
    return entry


def plcapi_answer() -> dict[str, Any]:
    """Shaped like PLCAPI's GetSlivers on a regular node (PLC/Methods/GetSlivers.py)."""
    return {
        "timestamp": 1_700_000_000,
        "node_id": 42,
        "hostname": "planetlab1.example.edu",
        "interfaces": [
            {"interface_id": 9, "is_primary": False, "bwlimit": None, "ip": "10.0.0.1", "dns1": None},
            {"interface_id": 10, "is_primary": True, "bwlimit": 10_000_000, "ip": "192.0.2.10",
             "method": "static", "dns2": None, "hostname": None},
        ],
        "groups": ["site_nodes"],
        "conf_files": [{"source": "PlanetLabConf/sysctl.php", "dest": "/etc/sysctl.conf", "enabled": True,
                        "always_update": False, "preinstall_cmd": None}],
        "initscripts": [
            {"initscript_id": 1, "name": "hello", "enabled": True, "script": "#!/bin/sh\necho hello\n"},
            {"initscript_id": 2, "name": "off", "enabled": False, "script": "#!/bin/sh\nexit 1\n"},
        ],
        "accounts": [{"name": "root", "keys": [KEY_A, "ssh-dss AAAAB3Nza... admin"]},
                     {"name": "site_admin", "keys": []}],
        "xmpp": {"server": None, "user": None, "password": None},
        "hrn": "plc.example.planetlab1",
        "reservation_policy": "none",
        "leases": [{"slice_id": 7, "t_from": 1_700_000_000, "t_until": 1_700_003_600, "name": "site_alpha"}],
        "lease_granularity": 3600,
        "slivers": [
            sliver_entry(
                "site_alpha",
                keys=[{"key_type": "ssh", "key": KEY_A}, {"key_type": "ssh", "key": KEY_B + "\n"}],
                attributes=[
                    {"tagname": "vsys", "value": "fd_tuntap"},
                    {"tagname": "vsys", "value": "vif_up"},
                    {"tagname": "hrn", "value": "plc.example.site_alpha"},
                    {"tagname": "initscript", "value": "hello"},
                    {"tagname": "net_max_rate", "value": "5000"},
                    {"tagname": "system", "value": None},
                ],
            ),
            sliver_entry("site_off", slice_id=8, attributes=[{"tagname": "initscript", "value": "off"}]),
            sliver_entry("site_code", slice_id=9,
                         attributes=[{"tagname": "initscript_code", "value": "echo inline"},
                                     {"tagname": "initscript", "value": "hello"}]),
            sliver_entry("site_ctrl", slice_id=10, instantiation="nm-controller", keys=None, attributes=None),
            sliver_entry("other_deleg", slice_id=11, instantiation="delegated",
                         attributes=[{"tagname": "delegations", "value": " site_ctrl , pl_other"}]),
            sliver_entry("site_gone", slice_id=12, instantiation="not-instantiated", keys=[], attributes=[]),
        ],
    }


def by_name(slivers: tuple[Sliver, ...]) -> dict[str, Sliver]:
    return {s.name: s for s in slivers}


def test_real_plcapi_answer_is_accepted_unchanged_through_xmlrpc() -> None:
    body = xmlrpc.client.dumps((plcapi_answer(),), methodresponse=True, allow_none=True).encode()
    document, protected = load_document("https://plc.example.org/PLCAPI/", body, expected_node_id=42, max_bytes=1 << 20)
    assert document.rejected == () and protected == frozenset()
    assert (document.timestamp, document.node_id, document.hostname) == (1_700_000_000, 42, "planetlab1.example.edu")
    assert document.bwcap_kbps == 10_000  # primary interface bwlimit 10 Mbit/s, in kbit/s
    slivers = by_name(document.slivers)
    assert list(slivers) == ["site_alpha", "site_off", "site_code", "site_ctrl", "other_deleg", "site_gone"]
    alpha = slivers["site_alpha"]
    assert alpha.keys == (KEY_A, KEY_B)  # the trailing newline is stripped, not injected
    assert alpha.attributes[:3] == (("vsys", "fd_tuntap"), ("vsys", "vif_up"), ("hrn", "plc.example.site_alpha"))
    assert ("system", "") in alpha.attributes
    assert alpha.initscript == "#!/bin/sh\necho hello\n"
    assert (alpha.source, alpha.timestamp, alpha.slice_id, alpha.expires) == (SOURCE_AUTHORITY, 1_700_000_000, 7, 2_000_000_000)
    assert slivers["site_off"].initscript == ""  # a disabled initscript is not used
    assert slivers["site_code"].initscript == "echo inline"
    assert slivers["site_ctrl"].keys == () and slivers["site_ctrl"].attributes == ()
    assert slivers["other_deleg"].controller == "site_ctrl"
    assert slivers["site_gone"].instantiation == "not-instantiated"


def test_every_top_level_member_is_used_handed_on_or_ignored_with_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    """authority.md: every member a real PLCAPI sends is used or explicitly ignored; none breaks
    a sync, none is silently half-used. ``accounts``, ``conf_files`` and the lease members
    (``reservation_policy``, ``lease_granularity``, ``leases``) go to the node-wide handlers
    untouched (they validate them); the rest is named in a debug line with a reason."""
    answer = plcapi_answer()
    answer["future_member"] = {"x": 1}
    answer["conf_files"] = None  # nil on a regular node: as if absent
    with caplog.at_level("DEBUG", logger="nodemanager.authority.parse"):
        document, _ = parse_getslivers_with_protection(answer, expected_node_id=42)
    assert set(document.members) == {"accounts", "reservation_policy", "leases", "lease_granularity"}
    assert document.members["accounts"] is answer["accounts"]
    assert document.members["leases"] is answer["leases"]
    ignored = {r.getMessage().split("member=")[1].split()[0] for r in caplog.records if "member-ignored" in r.getMessage()}
    assert ignored == {"groups", "xmpp", "hrn", "future_member"}


def test_bwcap_member_wins_over_interfaces_and_nil_bwlimit_means_no_cap() -> None:
    data = plcapi_answer()
    data["bwcap"] = 777
    assert parse_getslivers_with_protection(data, expected_node_id=42)[0].bwcap_kbps == 777
    data = plcapi_answer()
    data["interfaces"][1]["bwlimit"] = None
    assert parse_getslivers_with_protection(data, expected_node_id=42)[0].bwcap_kbps is None
    data["interfaces"] = None
    assert parse_getslivers_with_protection(data, expected_node_id=42)[0].bwcap_kbps is None


@pytest.mark.parametrize(
    "bad_name",
    ["../x", "root", "a;b", "site_" + "x" * 195, "Site_Upper", "site_a.b", "site_with_a_very_long_name_of_40_chars",
     "", "_site", "site_", "9site_x", "site x", 12, None, "site_é", "site_a\x00"],
)
def test_invalid_name_is_dropped_with_a_reason_while_siblings_proceed(bad_name: object) -> None:
    data = plcapi_answer()
    data["slivers"].insert(1, sliver_entry(bad_name))
    document, protected = parse_getslivers_with_protection(data, expected_node_id=42)
    assert [s.name for s in document.slivers][:2] == ["site_alpha", "site_off"]
    assert len(document.slivers) == 6
    assert len(document.rejected) == 1
    rejection = document.rejected[0]
    assert rejection.label.startswith("#1")
    assert "name" in rejection.reason
    assert protected == frozenset()  # an invalid name protects nothing


def test_label_shows_only_a_short_printable_name() -> None:
    data = plcapi_answer()
    data["slivers"] = [sliver_entry("a;b"), sliver_entry("bad\nname"), sliver_entry("y" * 100)]
    labels = [r.label for r in parse_getslivers_with_protection(data, expected_node_id=42)[0].rejected]
    assert labels == ["#0 'a;b'", "#1", "#2"]


WRONG_ENTRIES: list[tuple[dict[str, Any], str]] = [
    ({"slice_id": "12"}, "slice_id"),
    ({"slice_id": True}, "slice_id"),
    ({"slice_id": -1}, "slice_id"),
    ({"slice_id": None}, "slice_id"),
    ({"expires": 1.5}, "expires"),
    ({"expires": "2000000000"}, "expires"),
    ({"instantiation": "bogus"}, "instantiation"),
    ({"instantiation": ["plc-instantiated"]}, "instantiation"),
    ({"keys": "ssh-ed25519 AAAA"}, "keys"),
    ({"keys": [KEY_A]}, "key #0"),
    ({"keys": [{"key": KEY_A}]}, "key_type"),
    ({"keys": [{"key_type": "ssh", "key": KEY_A + "\nssh-ed25519 AAAAinjected evil"}]}, "OpenSSH"),
    ({"keys": [{"key_type": "ssh", "key": 'command="/bin/sh" ' + KEY_A}]}, "OpenSSH"),
    ({"keys": [{"key_type": "ssh", "key": KEY_A.replace("alice", "al\x00ice")}]}, "OpenSSH"),
    ({"keys": [{"key_type": "ssh", "key": "not a key"}]}, "OpenSSH"),
    ({"keys": [{"key_type": "ssh", "key": 5}]}, "key #0"),
    ({"attributes": {"cpu_share": "2"}}, "attributes"),
    ({"attributes": [["cpu_share", "2"]]}, "attribute #0"),
    ({"attributes": [{"tagname": "cpu share", "value": "2"}]}, "tagname"),
    ({"attributes": [{"tagname": None, "value": "2"}]}, "tagname"),
    ({"attributes": [{"tagname": "cpu_share", "value": 2}]}, "string value"),
    ({"attributes": [{"tagname": "initscript_code", "value": "a\x00b"}]}, "NUL"),
    ({"attributes": [{"tagname": "controller", "value": "../etc"}]}, "controller"),
]


@pytest.mark.parametrize(("changes", "why"), WRONG_ENTRIES)
def test_wrong_types_reject_the_entry_and_protect_its_valid_name(changes: dict[str, Any], why: str) -> None:
    data = plcapi_answer()
    data["slivers"].append(sliver_entry("site_bad", **changes))
    document, protected = parse_getslivers_with_protection(data, expected_node_id=42)
    assert "site_bad" not in by_name(document.slivers)
    assert len(document.slivers) == 6
    assert [r.label for r in document.rejected] == ["#6 'site_bad'"]
    assert why in document.rejected[0].reason
    assert protected == frozenset({"site_bad"})


def test_non_struct_entries_are_rejected() -> None:
    data = plcapi_answer()
    data["slivers"] += ["site_str", None, 5]
    document, protected = parse_getslivers_with_protection(data, expected_node_id=42)
    assert [r.label for r in document.rejected] == ["#6", "#7", "#8"]
    assert len(document.slivers) == 6 and protected == frozenset()


def test_duplicate_names_reject_every_entry_of_that_name() -> None:
    data = plcapi_answer()
    data["slivers"].append(sliver_entry("site_alpha", slice_id=99))
    document, protected = parse_getslivers_with_protection(data, expected_node_id=42)
    assert "site_alpha" not in by_name(document.slivers)
    assert [r.label for r in document.rejected] == ["#0 'site_alpha'", "#6 'site_alpha'"]
    assert all("more than once" in r.reason for r in document.rejected)
    assert protected == frozenset({"site_alpha"})


def test_unhashable_name_does_not_break_duplicate_detection() -> None:
    data = plcapi_answer()
    data["slivers"].append(sliver_entry(["site_alpha"]))
    document = parse_getslivers_with_protection(data, expected_node_id=42)[0]
    assert len(document.slivers) == 6 and len(document.rejected) == 1


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d.pop("timestamp"), "no timestamp"),
        (lambda d: d.update(timestamp=None), "no timestamp"),
        (lambda d: d.update(timestamp="1700000000"), "timestamp"),
        (lambda d: d.update(timestamp=True), "timestamp"),
        (lambda d: d.update(timestamp=-5), "timestamp"),
        (lambda d: d.update(node_id=43), "node 43"),
        (lambda d: d.update(node_id="42"), "node_id"),
        (lambda d: d.pop("slivers"), "slivers"),
        (lambda d: d.update(slivers={"site_alpha": {}}), "slivers"),
        (lambda d: d.update(slivers=None), "slivers"),
        (lambda d: d.update(hostname=5), "hostname"),
        (lambda d: d.update(hostname="evil\nlog line"), "hostname"),
        (lambda d: d.update(bwcap="100"), "bwcap"),
        (lambda d: d.update(bwcap=0), "bwcap"),
    ],
)
def test_document_malformed_as_a_whole_is_rejected(mutate: Any, why: str) -> None:
    data = plcapi_answer()
    mutate(data)
    with pytest.raises(DocumentRejected, match=why):
        parse_getslivers_with_protection(data, expected_node_id=42)[0]


@pytest.mark.parametrize("data", [[], "doc", None, 5])
def test_a_document_that_is_not_a_struct_is_rejected(data: Any) -> None:
    with pytest.raises(DocumentRejected, match="struct"):
        parse_getslivers_with_protection(data, expected_node_id=None)[0]


def test_node_id_is_optional_and_unchecked_without_an_expected_id() -> None:
    data = plcapi_answer()
    assert parse_getslivers_with_protection(data, expected_node_id=None)[0].node_id == 42
    del data["node_id"]
    assert parse_getslivers_with_protection(data, expected_node_id=42)[0].node_id is None


def test_now_leaves_out_expired_entries_without_protecting_them() -> None:
    data = plcapi_answer()
    data["slivers"][0]["expires"] = 1_600_000_000
    document, protected = parse_getslivers_with_protection(data, expected_node_id=42, now=1_700_000_000)
    assert "site_alpha" not in by_name(document.slivers)
    assert document.rejected == () and protected == frozenset()


def test_input_is_not_modified() -> None:
    data = plcapi_answer()
    before = copy.deepcopy(data)
    parse_getslivers_with_protection(data, expected_node_id=42)[0]
    assert data == before


def test_an_empty_sliver_list_is_a_valid_document() -> None:
    data = plcapi_answer()
    data["slivers"] = []
    document = parse_getslivers_with_protection(data, expected_node_id=42)[0]
    assert document.slivers == () and document.timestamp == 1_700_000_000


def test_loads_then_parse_matches_the_xmlrpc_path_of_load_document() -> None:
    body = xmlrpc.client.dumps((plcapi_answer(),), methodresponse=True, allow_none=True).encode()
    direct = parse_getslivers_with_protection(loads_xmlrpc_response(body, 1 << 20), expected_node_id=42)[0]
    assert direct == load_document("http://plc/PLCAPI/", body, expected_node_id=42, max_bytes=1 << 20)[0]


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.sampled_from(["site_alpha", "plc-instantiated", "ssh", KEY_A, "tagname", "key", "name"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "slice_id", "instantiation", "expires", "keys", "attributes", "key_type",
                         "key", "tagname", "value", "x"]), children, max_size=6),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_ANY, max_size=6))
def test_arbitrary_entries_never_crash_the_validation(entries: list[Any]) -> None:
    data = {"timestamp": 5, "slivers": entries}
    document, protected = parse_getslivers_with_protection(data, expected_node_id=None)
    assert len(document.slivers) + len(document.rejected) == len(entries)
    assert protected <= {e.get("name") for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)}
