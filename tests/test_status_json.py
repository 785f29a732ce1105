"""``status --json`` and ``plan --json`` (docs/json.md): every field always present with its
type, the same facts as the text tables, and the commands end to end (issue 15, section 3).

The specs below pin schema 1: a field added to the documents must be added here and to
docs/json.md; one renamed or removed fails here (within a schema, fields are only added)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nodemanager.adminkeys import dump_outcomes
from nodemanager.cli import main
from nodemanager.conffiles import encode_state
from nodemanager.core.adminkeys import AccountOutcome, Hold
from nodemanager.core.bwbudget import Accounting
from nodemanager.core.conffiles import EntryOutcome, EntryState
from nodemanager.core.leases import Lease, LeaseSchedule, RefusedLease
from nodemanager.core.records import AccountState, Phase, ValveState
from nodemanager.datadir import Meta
from nodemanager.enforce.set import EnforcementSet
from nodemanager.leasing import dump_schedule
from nodemanager.status import COLUMNS, collect_resources, collect_status, render_status
from nodemanager.statusjson import SCHEMA, status_document
from nodemanager.store import Store
from nodemanager.testing.daemonproc import run_nodemanager, write_daemon_config, write_slivers_document
from nodemanager.testing.fakeauthority import make_sliver, stable_slice_id

NOW = 1_700_000_000
DOCS = Path(__file__).resolve().parents[1] / "docs" / "json.md"

# --- the type specs: a type or tuple of types, a dict (exact keys), or a one-item list ----------
OPT_INT = (int, type(None))
OPT_STR = (str, type(None))
OPT_NUM = (int, float, type(None))
STATE = {"state": OPT_STR, "detail": OPT_STR}
LEASE = {"name": str, "slice_id": int, "t_from": int, "t_until": int}
SLIVER = {
    "name": str, "state": str, "detail": OPT_STR, "instantiation": OPT_STR, "slice_id": OPT_INT,
    "source": OPT_STR, "expires": OPT_INT, "phase": OPT_STR, "owned": bool, "uid": OPT_INT, "failures": int,
    "last_error": OPT_STR, "retry_at": OPT_NUM, "create_requested": bool, "start_pending": bool,
    "rspec": (dict, type(None)),
}
STATUS = {
    "schema": int,
    "generated_at": (int, float),
    "node": {"backend": OPT_STR, "hollow": bool, "bwcap_kbps": OPT_INT, "sshd": STATE, "enforcement": STATE},
    "sync": {"last_sync": OPT_NUM, "outcome": OPT_STR, "last_good_sync": OPT_NUM, "authority_timestamp": OPT_INT,
             "authority_watch": {"mode": OPT_STR, "detail": OPT_STR}},
    "safety_valve": {"held": [str], "seen": int},
    "slivers": [SLIVER],
    "problems": [{"kind": str, "name": OPT_STR, "message": str}],
    "admin_keys": {"confirm_after": OPT_INT, "accounts": [{
        "name": str, "keys": int, "changed_at": OPT_NUM, "document_timestamp": OPT_INT,
        "hold": ({"count": int, "seen": int, "digest": str}, type(None)), "problem": OPT_STR,
        "rejections": [str]}]},
    "conf_files": {"time": OPT_NUM, "counts": dict,
                   "entries": [{"dest": str, "state": str, "reason": OPT_STR}]},
    "leases": {"policy": str, "reservable": bool, "granularity": int, "current": (LEASE, type(None)),
               "next": (LEASE, type(None)), "frozen": [str], "leases": [LEASE],
               "refused": [{"label": str, "reason": str}]},
    "byte_budgets": [{"name": str, "period_start": OPT_NUM, "used_bytes": int, "max_bytes": int,
                      "thresh_bytes": int, "capped": bool, "cap_kbit": OPT_INT}],
    "resources": ({"enforced": bool, "mechanisms": dict, "problems": [str],
                   "ignored": [{"name": str, "reason": str}],
                   "rows": [{"sliver": str, "resource": str, "effective": OPT_INT, "kernel": OPT_INT,
                             "kernel_raw": ({"name": str, "value": int}, type(None)), "agree": OPT_STR}]},
                  type(None)),
}
PLAN = {
    "schema": int,
    "document": {"timestamp": OPT_INT, "result": str, "stale": bool, "slivers": int, "rejected": int,
                 "rejections": [{"label": str, "reason": str}], "held": [str], "valve_tripped": bool},
    "actions": [{"kind": str, "name": str, "reason": str, "start": bool}],
}


def check(value: Any, spec: Any, where: str = "$") -> None:
    """Fail unless ``value`` has ``spec``'s shape; a tuple of alternatives tries each."""
    if isinstance(spec, tuple) and any(isinstance(s, (dict, list)) for s in spec):
        errors = []
        for alternative in spec:
            try:
                check(value, alternative, where)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(f"{where}: none of the alternatives: {errors}")
    if isinstance(spec, dict):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        assert set(value) == set(spec), f"{where}: keys {sorted(value)} != {sorted(spec)}"
        for key, sub in spec.items():
            check(value[key], sub, f"{where}.{key}")
    elif isinstance(spec, list):
        assert isinstance(value, list), f"{where}: {value!r} is not an array"
        for i, item in enumerate(value):
            check(item, spec[0], f"{where}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        # bool is an int in Python, never in the documents' meaning
        assert isinstance(value, types) and (bool in types or not isinstance(value, bool)), \
            f"{where}: {value!r} is not {spec}"


def spec_keys(spec: Any) -> set[str]:
    if isinstance(spec, dict):
        return set(spec) | {k for sub in spec.values() for k in spec_keys(sub)}
    if isinstance(spec, (list, tuple)):
        return {k for sub in spec for k in spec_keys(sub)}
    return set()


def no_empty_arrays_unchecked(doc: dict[str, Any]) -> None:
    """The rich store fills every array the spec checks items of (an empty one checks nothing)."""
    for path in ("slivers", "problems", "byte_budgets"):
        assert doc[path], path
    for section, key in (("admin_keys", "accounts"), ("conf_files", "entries"), ("leases", "leases"),
                         ("leases", "refused"), ("leases", "frozen"), ("safety_valve", "held")):
        assert doc[section][key], f"{section}.{key}"


# --- a store with slivers in every phase and every handler's state ------------------------------
def rich_store(path: Path) -> Store:
    store = Store(path)
    store.open()
    slivers = [
        make_sliver("site_run", attributes=[("cpu_share", "3"), ("net_max_rate", "5000")]),
        make_sliver("site_stop"),
        make_sliver("site_fail"),
        make_sliver("site_deleg", instantiation="delegated"),
        make_sliver("site_off", instantiation="not-instantiated"),
        make_sliver("site_pend"),
        make_sliver("site_exp", expires=NOW - 10),
        make_sliver("site_gone"),
        make_sliver("site_sys", attributes=[("system", "1")]),
    ]
    store.apply_records(slivers, [], {
        Meta.BACKEND: "account", Meta.LAST_SYNC: str(NOW - 60), Meta.LAST_GOOD: str(NOW - 3600),
        Meta.LAST_OUTCOME: "authority unavailable: no route", Meta.AUTHORITY_TIMESTAMP: "1699990000",
        Meta.BWCAP: "100000", Meta.SSHD: "AuthorizedKeysFile is not root-owned",
        Meta.ENFORCEMENT: "cpu: not enforced ([enforce] cpu = false)",
        Meta.AUTHORITY_WATCH: "watching: blocking queries of up to 300 s",
    })
    accounts = [
        AccountState("site_run", uid=200001, owned=True, phase=Phase.RUNNING),
        AccountState("site_stop", uid=200002, owned=True, phase=Phase.STOPPED),
        AccountState("site_fail", uid=200003, owned=True, phase=Phase.FAILED, failures=3,
                     last_error="useradd exited with status 9", retry_at=NOW + 30.5),
        AccountState("site_gone", uid=200004, owned=True, phase=Phase.DESTROYING, failures=1,
                     last_error="userdel: user is logged in"),
        AccountState("site_orphan", uid=200005, owned=True, phase=Phase.STOPPED),
        AccountState("site_sys", uid=200006, owned=True, phase=Phase.RUNNING, start_pending=True),
        AccountState("site_deleg", create_requested=True),
    ]
    for account in accounts:
        store.put_account(account)
    store.set_valve(ValveState(frozenset({"site_x", "site_y"}), 1))
    store.set_meta({
        Meta.ADMIN_KEYS: dump_outcomes({
            "site_admin": AccountOutcome(2, NOW - 100.25, 1699990000, None, "", ("key 3: not a key",)),
            "site_held": AccountOutcome(1, NOW - 200, 1699990000, Hold("abc", 1, 1), ""),
            "nobody_here": AccountOutcome(0, 0.0, 0, None, "account nobody_here does not exist"),
        }, 2),
        Meta.CONF_FILES: encode_state([
            EntryOutcome("/etc/motd", EntryState.INSTALLED),
            EntryOutcome("/etc/hosts", EntryState.UNCHANGED),
            EntryOutcome("/etc/bad", EntryState.FAILED, "preinstall_cmd exited with status 3"),
            EntryOutcome("#2 ../x", EntryState.REFUSED, "dest is outside the allowed directories"),
        ], NOW - 50),
        Meta.LEASES: dump_schedule(LeaseSchedule(
            "lease_or_idle", 60,
            (Lease("site_run", stable_slice_id("site_run"), NOW - 600, NOW + 600),
             Lease("site_stop", stable_slice_id("site_stop"), NOW + 600, NOW + 1200)),
            (RefusedLease("site_fail@1-2", "overlaps the lease of site_run"),))),
    })
    store.put_byte_budgets([Accounting("site_run", NOW - 3000.0, used=1500, counter=1500, max_bytes=2000,
                                       thresh_bytes=1000, cap_kbit=800),
                            Accounting("site_stop", NOW - 3000.0)])
    return store


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = rich_store(tmp_path / "nm.sqlite")
    yield store
    store.close()


def test_every_field_is_present_with_its_type(store: Store) -> None:
    doc = status_document(collect_status(store, NOW), collect_resources(store, EnforcementSet([])))
    check(doc, STATUS)
    no_empty_arrays_unchecked(doc)
    assert doc["schema"] == SCHEMA == 1 and doc["generated_at"] == NOW
    # the resources form when nothing enforces, and without --resources
    check(status_document(collect_status(store, NOW), collect_resources(store, None)), STATUS)
    assert status_document(collect_status(store, NOW))["resources"] is None
    json.dumps(doc, allow_nan=False)  # plain JSON: no NaN, no objects


def test_the_values_are_the_stored_facts(store: Store) -> None:
    doc = status_document(collect_status(store, NOW))
    slivers = {s["name"]: s for s in doc["slivers"]}
    assert {name: s["state"] for name, s in slivers.items()} == {
        "site_run": "running", "site_stop": "stopped", "site_fail": "failed", "site_deleg": "awaiting-create",
        "site_off": "not-instantiated", "site_pend": "pending", "site_exp": "expired",
        "site_gone": "destroying-failed", "site_orphan": "orphan", "site_sys": "running"}
    assert slivers["site_fail"] == {
        "name": "site_fail", "state": "failed", "detail": "useradd exited with status 9",
        "instantiation": "plc-instantiated", "slice_id": stable_slice_id("site_fail"), "source": "authority",
        "expires": 4_000_000_000, "phase": "failed", "owned": True, "uid": 200003, "failures": 3,
        "last_error": "useradd exited with status 9", "retry_at": NOW + 30.5, "create_requested": False,
        "start_pending": False, "rspec": slivers["site_fail"]["rspec"]}
    assert slivers["site_orphan"]["instantiation"] is None and slivers["site_orphan"]["rspec"] is None
    assert slivers["site_pend"]["phase"] is None and slivers["site_pend"]["failures"] == 0
    assert slivers["site_run"]["rspec"]["nm_cpu_share"] == 3 and slivers["site_run"]["rspec"]["nm_net_max_rate"] == 5000
    assert slivers["site_deleg"]["create_requested"] and slivers["site_sys"]["start_pending"]
    assert doc["node"] == {"backend": "account", "hollow": False, "bwcap_kbps": 100000,
                           "sshd": {"state": "not-set-up", "detail": "AuthorizedKeysFile is not root-owned"},
                           "enforcement": {"state": "not-enforced",
                                           "detail": "cpu: not enforced ([enforce] cpu = false)"}}
    assert doc["sync"] == {"last_sync": NOW - 60, "outcome": "authority unavailable: no route",
                           "last_good_sync": NOW - 3600, "authority_timestamp": 1699990000,
                           "authority_watch": {"mode": "watching", "detail": "blocking queries of up to 300 s"}}
    assert doc["safety_valve"] == {"held": ["site_x", "site_y"], "seen": 1}
    admin = {a["name"]: a for a in doc["admin_keys"]["accounts"]}
    assert doc["admin_keys"]["confirm_after"] == 2
    assert admin["site_admin"]["changed_at"] == NOW - 100.25 and admin["site_admin"]["rejections"] == ["key 3: not a key"]
    assert admin["site_held"]["hold"] == {"count": 1, "seen": 1, "digest": "abc"}
    assert admin["nobody_here"]["changed_at"] is None and admin["nobody_here"]["document_timestamp"] is None
    assert doc["conf_files"]["time"] == NOW - 50
    assert doc["conf_files"]["counts"] == {"installed": 1, "unchanged": 1, "refused": 1, "failed": 1, "disabled": 0}
    leases = doc["leases"]
    assert leases["policy"] == "lease_or_idle" and leases["reservable"] and leases["granularity"] == 60
    assert leases["current"]["name"] == "site_run" and leases["next"]["t_from"] == NOW + 600
    assert "site_run" not in leases["frozen"] and "site_sys" not in leases["frozen"] and "site_stop" in leases["frozen"]
    assert doc["byte_budgets"][0] == {"name": "site_run", "period_start": NOW - 3000, "used_bytes": 1500,
                                      "max_bytes": 2000, "thresh_bytes": 1000, "capped": True, "cap_kbit": 800}
    assert doc["byte_budgets"][1]["capped"] is False and doc["byte_budgets"][1]["cap_kbit"] is None
    problems = {(p["kind"], p["name"]) for p in doc["problems"]}
    assert problems == {("sshd", None), ("enforcement", None), ("safety-valve", None),
                        ("admin-keys", "site_held"), ("admin-keys", "nobody_here"), ("conf-file", "/etc/bad"),
                        ("conf-file", "#2 ../x"), ("lease", "site_fail@1-2"), ("sliver", "site_fail"),
                        ("sliver", "site_gone")}


def test_text_and_json_state_the_same_facts(store: Store) -> None:
    text = render_status(store, NOW)
    doc = status_document(collect_status(store, NOW))
    head, table, count = text.split("\n\n")
    assert count == f"{len(doc['slivers'])} sliver(s)"
    assert f"authority data: timestamp {doc['sync']['authority_timestamp']}" in head
    watch = doc["sync"]["authority_watch"]
    assert f"authority:      {watch['mode']} ({watch['detail']})" in head
    assert f"backend:        {doc['node']['backend']}" in head
    assert f"SAFETY VALVE:   {len(doc['safety_valve']['held'])} removals held" in head
    assert f"SSHD NOT SET UP: {doc['node']['sshd']['detail']}" in head
    lines = table.splitlines()
    starts = [lines[0].index(column) for column in COLUMNS]
    rows = [[line[a:b].strip() for a, b in zip(starts, [*starts[1:], None])] for line in lines[1:]]
    assert [row[0] for row in rows] == [s["name"] for s in doc["slivers"]]
    for row, sliver in zip(rows, doc["slivers"]):
        assert row[1] == (sliver["instantiation"] or "-")
        assert row[2] == ("-" if sliver["uid"] is None else str(sliver["uid"]))
        assert row[3].split(":")[0].split(" ")[0].rstrip(",") == {
            "destroying-failed": "destroying"}.get(sliver["state"], sliver["state"])
        if sliver["rspec"] is not None:
            assert row[5] == str(sliver["rspec"]["nm_cpu_share"])


def test_a_fresh_store_gives_nulls_not_missing_keys(tmp_path: Path) -> None:
    with Store(tmp_path / "nm.sqlite") as empty:
        doc = status_document(collect_status(empty, NOW))
    check(doc, STATUS)
    assert doc["sync"] == {"last_sync": None, "outcome": None, "last_good_sync": None, "authority_timestamp": None,
                           "authority_watch": {"mode": None, "detail": None}}
    assert doc["node"]["backend"] is None and doc["node"]["sshd"] == {"state": None, "detail": None}
    assert doc["admin_keys"] == {"confirm_after": None, "accounts": []}
    assert doc["conf_files"]["time"] is None and doc["conf_files"]["entries"] == []
    assert doc["leases"]["policy"] == "none" and doc["leases"]["current"] is None
    assert doc["slivers"] == [] and doc["problems"] == [] and doc["byte_budgets"] == []


def test_docs_json_md_names_every_field() -> None:
    documented = set(re.findall(r'"([a-z_]+)"\s*:', DOCS.read_text()))
    missing = (spec_keys(STATUS) | spec_keys(PLAN)) - documented
    assert not missing, f"docs/json.md does not show {sorted(missing)}"
    assert "fields are only added, never renamed or removed within schema 1" in " ".join(DOCS.read_text().split()).lower()


# --- the commands ---------------------------------------------------------------------------------
def raw_document(path: Path, timestamp: int, names: list[str], bad: bool = False) -> None:
    write_slivers_document(path, names, timestamp)
    if bad:
        data = json.loads(path.read_text())
        data["slivers"].append({**data["slivers"][0], "name": "../escape"})
        path.write_text(json.dumps(data))


def test_status_and_plan_json_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "slivers.json"
    raw_document(doc, 1000, ["site_alpha", "site_beta"])
    config = write_daemon_config(tmp_path, doc, slivers={"backend": "hollow"})
    assert run_nodemanager(config, "sync", "--once").returncode == 0

    status = run_nodemanager(config, "status", "--json")
    assert status.returncode == 0, status.stderr
    parsed = json.loads(status.stdout)
    check(parsed, STATUS)
    assert status.stdout == json.dumps(parsed, indent=2, sort_keys=True) + "\n"
    assert parsed["node"]["hollow"] and parsed["node"]["enforcement"]["state"] == "none"
    assert parsed["sync"]["authority_timestamp"] == 1000 and parsed["sync"]["last_sync"] is not None
    assert [s["name"] for s in parsed["slivers"]] == ["site_alpha", "site_beta"]
    with_resources = json.loads(run_nodemanager(config, "status", "--resources", "--json").stdout)
    check(with_resources, STATUS)
    assert with_resources["resources"]["enforced"] is False  # hollow: nothing to enforce

    raw_document(doc, 2000, ["site_alpha", "site_gamma"], bad=True)
    plan = run_nodemanager(config, "plan", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    check(planned, PLAN)
    assert planned["schema"] == 1
    document = planned["document"]
    assert document["timestamp"] == 2000 and document["slivers"] == 2 and document["rejected"] == 1
    assert document["result"] == "ok" and not document["stale"] and len(document["rejections"]) == 1
    kinds = {(a["kind"], a["name"], a["start"]) for a in planned["actions"]}
    assert {("destroy", "site_beta", False), ("create", "site_gamma", True)} <= kinds
    assert planned["actions"][0]["kind"] == "destroy"  # plan order: destroys first
    assert all(a["reason"] for a in planned["actions"])
    # plan changed nothing; the text form states the same actions
    assert [s["name"] for s in json.loads(run_nodemanager(config, "status", "--json").stdout)["slivers"]] == [
        "site_alpha", "site_beta"]
    text = run_nodemanager(config, "plan").stdout
    lines = [line for line in text.splitlines() if line.split(" ")[0] in ("destroy", "create", "configure", "conflict")]
    assert lines == [f"{a['kind']:<9} {a['name']}  {a['reason']}" + (" (then start)" if a["start"] else "")
                     for a in planned["actions"]]


def test_plan_json_of_a_stale_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "slivers.json"
    raw_document(doc, 1000, ["site_alpha"])
    config = write_daemon_config(tmp_path, doc, slivers={"backend": "hollow"})
    assert main(["-c", str(config), "sync", "--once"]) == 0
    raw_document(doc, 500, [])
    capsys.readouterr()
    assert main(["-c", str(config), "plan", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    check(planned, PLAN)
    assert planned["document"]["stale"] and planned["document"]["result"] == "stale"
    assert planned["document"]["timestamp"] == 500
    assert not [a for a in planned["actions"] if a["kind"] == "destroy"]  # a stale document removes nothing
