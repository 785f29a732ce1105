"""``make demo``'s pure parts: the change lines printed after each sync, and the edit that gives the
demo's login key to one slice (the demo itself runs in tests/integration/test_demo.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from nodemanager.core.records import AccountState, Phase, Sliver
from nodemanager.demologin import add_key, login_slice
from nodemanager.status import SliverFacts
from nodemanager.statuschanges import describe_changes, snapshot

ROOT = Path(__file__).resolve().parents[1]
DEMO_SLICES = ROOT / "examples" / "demo-slices.toml"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoDemoDemoDemoDemoDemoDemoDemoDemoDemoDemo nodemanager-test"


def fact(name: str, state: str = "running", *, rspec: dict[str, int] | None = None, keys: int = 1,
         applied: str = "f1", detail: str = "", instantiation: str = "plc-instantiated") -> SliverFacts:
    sliver = Sliver(name=name, slice_id=1, instantiation=instantiation, expires=2**31, timestamp=1,
                    keys=tuple(f"ssh-ed25519 K{i}" for i in range(keys)))
    account = AccountState(name=name, uid=1000, owned=True, applied=applied, phase=Phase.RUNNING)
    return SliverFacts(name, sliver, account, state, detail, rspec or {"nm_cpu_share": 1})


def test_nothing_changed_gives_no_line() -> None:
    before = snapshot([fact("a"), fact("b")])
    assert describe_changes(before, snapshot([fact("a"), fact("b")])) == []


def test_each_kind_of_change_is_one_short_line() -> None:
    before = snapshot([fact("alpha", rspec={"nm_cpu_share": 2, "nm_net_max_rate": 20000}), fact("beta"),
                       fact("gone"), fact("conf", applied="f1"), fact("keys", keys=1), fact("stop")])
    after = snapshot([fact("alpha", rspec={"nm_cpu_share": 5, "nm_net_max_rate": 20000}), fact("beta"),
                      fact("conf", applied="f2"), fact("keys", keys=2), fact("new", "pending"),
                      fact("stop", "stopped"), fact("zbroken", "failed", detail="useradd: exit 9")])
    assert describe_changes(before, after) == [
        "~ alpha: rspec nm_cpu_share 2 -> 5",
        "~ conf: reconfigured",
        "- gone: removed",
        "~ keys: keys 1 -> 2",
        "+ new: added (plc-instantiated), pending",
        "~ stop: stopped (was running)",
        "+ zbroken: added (plc-instantiated), failed: useradd: exit 9",
    ]


def test_started_and_failed_read_as_verbs_and_a_reconfigure_with_a_visible_change_says_that() -> None:
    before = snapshot([fact("a", "pending", applied=""), fact("b")])
    after = snapshot([fact("a", "running", applied="f1"), fact("b", "failed", detail="x" * 200, applied="f2")])
    lines = describe_changes(before, after)
    assert lines[0] == "~ a: started (was pending)"  # not also "reconfigured": the state says it
    assert lines[1].startswith("~ b: FAILED (was running): xxx") and len(lines[1]) < 120


def test_the_login_key_goes_to_the_first_self_instantiated_slice_keeping_comments(tmp_path: Path) -> None:
    slices = tmp_path / "slices.toml"
    slices.write_text(DEMO_SLICES.read_text())
    name = login_slice(slices)
    assert name == "site_alpha"
    add_key(slices, name, KEY)
    text = slices.read_text()
    assert text.count("#") == DEMO_SLICES.read_text().count("#")  # the user's guide to the file stays
    data = tomllib.loads(text)
    keys = {s["name"]: s.get("keys", []) for s in data["slices"]}
    original = {s["name"]: s.get("keys", []) for s in tomllib.loads(DEMO_SLICES.read_text())["slices"]}
    assert keys["site_alpha"] == [KEY, *original["site_alpha"]]
    assert {n: k for n, k in keys.items() if n != "site_alpha"} == {n: k for n, k in original.items() if n != "site_alpha"}


def test_a_slice_without_keys_gets_a_keys_line_and_a_strange_file_is_refused(tmp_path: Path) -> None:
    slices = tmp_path / "slices.toml"
    slices.write_text('[[slices]]\nname = "site_a"\nid = 1\nnodes = [2]\n\n[[slices]]\nname = "site_b"\nid = 2\n')
    assert login_slice(slices) == "site_b"  # site_a is not on node 1
    add_key(slices, "site_b", KEY)
    assert tomllib.loads(slices.read_text())["slices"][1]["keys"] == [KEY]
    inline = tmp_path / "inline.toml"
    inline.write_text('slices = [{name = "site_c", id = 3}]\n')
    before = inline.read_text()
    with pytest.raises(ValueError, match="could not add"):
        add_key(inline, "site_c", KEY)
    assert inline.read_text() == before  # nothing written
    none = tmp_path / "none.toml"
    none.write_text('[[slices]]\nname = "ctl"\nid = 4\ninstantiation = "nm-controller"\n')
    with pytest.raises(ValueError, match="no plc-instantiated slice"):
        login_slice(none)
