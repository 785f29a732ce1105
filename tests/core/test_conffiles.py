"""``core.conffiles``: entry validation, the dest confinement rule, the install plan."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.conffiles import (
    MAX_ENTRIES,
    ConfFile,
    Confined,
    EntryState,
    InstalledFile,
    Step,
    StepKind,
    after_failure,
    confine_dest,
    count_states,
    install_steps,
    needs_install,
    normalise_dir,
    parse_mode,
    source_url,
    validate_entries,
    validate_entry,
)

ALLOWED = ["/etc/planetlab", "/etc/nm/", "/var/lib/nm/conf"]


def plc_entry(**changes: object) -> dict[str, object]:
    """An entry as a real PLCAPI sends it."""
    entry: dict[str, object] = {
        "conf_file_id": 7, "enabled": True, "source": "PlanetLabConf/sysctl.conf", "dest": "/etc/planetlab/sysctl.conf",
        "file_permissions": "644", "file_owner": "root", "file_group": "root", "preinstall_cmd": "",
        "postinstall_cmd": "/sbin/sysctl -e -p /etc/planetlab/sysctl.conf", "error_cmd": None,
        "ignore_cmd_errors": False, "always_update": False, "node_ids": [1], "nodegroup_ids": [],
    }
    entry.update(changes)
    return entry


# --- confinement ---------------------------------------------------------------------------
@pytest.mark.parametrize(("dest", "root", "parts"), [
    ("/etc/planetlab/sysctl.conf", "/etc/planetlab", ("sysctl.conf",)),
    ("/etc/nm/a/b/c", "/etc/nm", ("a", "b", "c")),
    ("/var/lib/nm/conf/x", "/var/lib/nm/conf", ("x",)),
])
def test_dest_inside_an_allowed_dir_is_confined(dest: str, root: str, parts: tuple[str, ...]) -> None:
    confined = confine_dest(dest, ALLOWED)
    assert confined == Confined(root, parts) and confined.dest == dest


@pytest.mark.parametrize(("dest", "why"), [
    ("etc/planetlab/x", "absolute"),
    ("/etc/planetlab/../shadow", "normalised"),
    ("/etc/planetlab/./x", "normalised"),
    ("/etc/planetlab//x", "normalised"),
    ("/etc/planetlab/x/", "normalised"),
    ("/etc/planetlab", "not inside"),  # the directory itself is not a file inside it
    ("/etc/planetlabx/y", "not inside"),
    ("/etc/shadow", "not inside"),
    ("/", "normalised"),
    ("", "characters"),
    ("/etc/planetlab/a\nb", "control"),
    ("/etc/planetlab/" + "a" * 256, "longer than 255"),
    (None, "must be a string"),
    (5, "must be a string"),
])
def test_bad_dest_is_refused_with_a_reason(dest: object, why: str) -> None:
    reason = confine_dest(dest, ALLOWED)
    assert isinstance(reason, str) and why in reason


def test_the_most_specific_allowed_dir_is_chosen() -> None:
    assert confine_dest("/etc/nm/sub/x", ["/etc", "/etc/nm/sub", "/etc/nm"]) == Confined("/etc/nm/sub", ("x",))


def test_allowed_dirs_are_normalised_and_bad_ones_ignored() -> None:
    assert normalise_dir("/etc//nm/./") == ("etc", "nm")
    assert normalise_dir("/") is None and normalise_dir("etc") is None and normalise_dir("/etc/../x") is None
    assert isinstance(confine_dest("/x/y", ["/etc/../x"]), str)


_COMPONENT = st.sampled_from(["", ".", "..", "etc", "nm", "planetlab", "conf", "x", "a.b", "...", ".x", "etc2"])


@settings(max_examples=3000, deadline=None)
@given(parts=st.lists(_COMPONENT, max_size=8), lead=st.sampled_from(["/", "", "//"]),
       allowed=st.lists(st.lists(_COMPONENT, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p)),
                        min_size=1, max_size=3))
def test_no_generated_dest_resolves_outside_the_allowed_dirs(parts: list[str], lead: str,
                                                             allowed: list[str]) -> None:
    dest = lead + "/".join(parts)
    result = confine_dest(dest, allowed)
    if isinstance(result, str):
        return
    resolved = posixpath.normpath(dest)
    assert resolved == dest == result.dest  # accepted only when already normalised
    roots = ["/" + posixpath.normpath(a).lstrip("/") for a in allowed if normalise_dir(a) is not None]
    assert any(resolved.startswith(root.rstrip("/") + "/") and resolved != root for root in roots)
    assert ".." not in result.parts and "." not in result.parts and "" not in result.parts
    assert posixpath.normpath(posixpath.join(result.root, *result.parts)) == resolved


@settings(max_examples=1000, deadline=None)
@given(dest=st.text(alphabet=st.sampled_from("/.etcnmx\x00\n"), max_size=30))
def test_arbitrary_text_never_escapes(dest: str) -> None:
    result = confine_dest(dest, ["/etc/nm"])
    if not isinstance(result, str):
        assert posixpath.normpath(dest).startswith("/etc/nm/") and "\x00" not in dest


# --- values --------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "mode"), [("644", 0o644), ("0644", 0o644), ("755", 0o755), ("1777", 0o1777),
                                             ("0", 0), (644, 0o644), (" 600 ", 0o600)])
def test_modes_are_octal(value: object, mode: int) -> None:
    assert parse_mode(value) == mode


@pytest.mark.parametrize(("value", "why"), [("4755", "setuid"), ("2755", "setuid"), ("6644", "setuid"),
                                            ("888", "octal"), ("17777", "octal"), ("", "octal"), ("rw-r--r--", "octal"),
                                            (None, "octal string"), (True, "octal string"), (6.44, "octal string")])
def test_bad_or_privileged_modes_are_refused(value: object, why: str) -> None:
    reason = parse_mode(value)
    assert isinstance(reason, str) and why in reason


def test_a_plc_entry_validates() -> None:
    entry = validate_entry(plc_entry(), ALLOWED)
    assert isinstance(entry, ConfFile)
    assert entry.mode == 0o644 and entry.owner == entry.group == "root" and entry.error_cmd == ""
    assert entry.postinstall_cmd.startswith("/sbin/sysctl") and not entry.always_update


@pytest.mark.parametrize(("changes", "why"), [
    ({"dest": "/etc/passwd"}, "allowed_dirs"),
    ({"source": "http://evil.example/x"}, "source"),
    ({"source": "//evil.example/x"}, "source"),
    ({"source": "a/../../x"}, "source"),
    ({"source": "a b"}, "source"),
    ({"source": ""}, "source"),
    ({"source": None}, "source"),
    ({"file_owner": "Root;rm"}, "file_owner"),
    ({"file_group": None}, "file_group"),
    ({"file_permissions": "4755"}, "setuid"),
    ({"preinstall_cmd": 3}, "preinstall_cmd"),
    ({"postinstall_cmd": "x" * 5000}, "postinstall_cmd"),
    ({"error_cmd": "a\x00b"}, "error_cmd"),
    ({"always_update": "yes"}, "always_update"),
    ({"enabled": "true"}, "enabled"),
])
def test_bad_entries_are_refused_with_their_reason(changes: dict[str, object], why: str) -> None:
    reason = validate_entry(plc_entry(**changes), ALLOWED)
    assert isinstance(reason, str) and why in reason


def test_sources_with_a_query_are_accepted_and_node_id_is_appended() -> None:
    entry = validate_entry(plc_entry(source="PlanetLabConf/get_plc_config.php?python"), ALLOWED)
    assert isinstance(entry, ConfFile)
    assert source_url("https://boot/", entry.source, 7) == "https://boot/PlanetLabConf/get_plc_config.php?python&node_id=7"
    assert source_url("https://boot", "/a/b", None) == "https://boot/a/b"
    assert source_url("http://h:8/x/", "a", 3) == "http://h:8/x/a?node_id=3"


def test_disabled_entries_are_skipped_without_validation() -> None:
    assert validate_entry(plc_entry(enabled=False, dest="/etc/shadow"), ALLOWED) is None


def test_each_entry_is_judged_alone() -> None:
    raw = [plc_entry(), "garbage", plc_entry(dest="/etc/nm/a", file_permissions="4755"),
           plc_entry(enabled=False, dest="/etc/nm/off"), plc_entry(dest="/etc/nm/b"),
           plc_entry(dest="/etc/nm/b", source="other"), {"dest": "/etc/nm/\x00"}]
    result = validate_entries(raw, ALLOWED)
    assert [e.dest.dest for e in result.entries] == ["/etc/planetlab/sysctl.conf", "/etc/nm/b"]
    states = [(o.dest, o.state, o.reason.split(" ")[0]) for o in result.outcomes]
    assert states[0] == ("#1", EntryState.REFUSED, "entry")
    assert states[1][:2] == ("/etc/nm/a", EntryState.REFUSED)
    assert states[2] == ("/etc/nm/off", EntryState.DISABLED, "")
    assert states[3][:2] == ("/etc/nm/b", EntryState.REFUSED) and "earlier entry" in result.outcomes[3].reason
    assert states[4][0].startswith("#6") and "\x00" not in states[4][0]


def test_not_an_array_is_one_refusal() -> None:
    result = validate_entries({"dest": "/etc/nm/x"}, ALLOWED)
    assert result.entries == () and result.outcomes[0].state is EntryState.REFUSED


def test_entries_beyond_the_cap_are_refused() -> None:
    raw = [plc_entry(dest=f"/etc/nm/f{i}") for i in range(MAX_ENTRIES + 3)]
    result = validate_entries(raw, ALLOWED)
    assert len(result.entries) == MAX_ENTRIES
    assert [o.dest for o in result.outcomes] == [f"/etc/nm/f{i}" for i in range(MAX_ENTRIES, MAX_ENTRIES + 3)]
    assert all("cap" in o.reason for o in result.outcomes)


# --- the plan ------------------------------------------------------------------------------
def _entry(**changes: object) -> ConfFile:
    entry = validate_entry(plc_entry(**changes), ALLOWED)
    assert isinstance(entry, ConfFile)
    return entry


def test_same_content_and_metadata_needs_nothing() -> None:
    entry = _entry()
    same = InstalledFile(0, 0, 0o644, b"data")
    assert not needs_install(entry, b"data", same, 0, 0)
    assert needs_install(_entry(always_update=True), b"data", same, 0, 0)
    assert needs_install(entry, b"other", same, 0, 0)
    assert needs_install(entry, b"data", InstalledFile(0, 0, 0o600, b"data"), 0, 0)
    assert needs_install(entry, b"data", InstalledFile(1, 0, 0o644, b"data"), 0, 0)
    assert needs_install(entry, b"data", InstalledFile(0, 0, 0o644, None), 0, 0)  # a link, a FIFO, too big
    assert needs_install(entry, b"data", None, 0, 0)


def test_steps_leave_out_empty_commands() -> None:
    assert install_steps(_entry(postinstall_cmd="")) == (Step(StepKind.WRITE),)
    assert install_steps(_entry(preinstall_cmd="pre", postinstall_cmd=None)) == (
        Step(StepKind.PREINSTALL, "pre"), Step(StepKind.WRITE))
    assert [s.kind for s in install_steps(_entry(preinstall_cmd="pre"))] == [
        StepKind.PREINSTALL, StepKind.WRITE, StepKind.POSTINSTALL]


def test_failure_policy() -> None:
    strict, lax = _entry(error_cmd="oops"), _entry(ignore_cmd_errors=True)
    assert after_failure(strict, StepKind.PREINSTALL) == after_failure(strict, StepKind.POSTINSTALL)
    assert after_failure(strict, StepKind.PREINSTALL).run_error_cmd and not after_failure(
        strict, StepKind.PREINSTALL).proceed
    assert after_failure(lax, StepKind.PREINSTALL).proceed and not after_failure(lax, StepKind.PREINSTALL).run_error_cmd
    assert not after_failure(lax, StepKind.WRITE).proceed and not after_failure(strict, StepKind.WRITE).run_error_cmd


def test_count_states_names_every_state() -> None:
    result = validate_entries([plc_entry(), plc_entry(enabled=False)], ALLOWED)
    assert count_states(result.outcomes) == {"installed": 0, "unchanged": 0, "refused": 0, "failed": 0, "disabled": 1}
