"""Disk mechanism choice and command sequences, the EnforcementSet, and the status table."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemanager.config import Config, EnforceSection
from nodemanager.core.errors import BackendError
from nodemanager.enforce.disk import DiskEnforcer
from nodemanager.enforce.report import HEADER, resource_rows
from nodemanager.enforce.set import EnforcementSet

HOMES = Path("/home")
IMAGES = Path("/var/lib/nm/images")


def test_quota_mechanism_when_the_filesystem_has_user_quotas_on(host) -> None:  # type: ignore[no-untyped-def]
    host.answers[("findmnt", "-n", "-o", "FSTYPE,OPTIONS,TARGET")] = (0, b"ext4 rw,relatime,usrquota /home\n")
    host.answers[("quotaon", "-p")] = (1, b"user quota on /home (/dev/sdb) is on\n")
    disk = DiskEnforcer(host, HOMES, IMAGES)
    assert disk.mechanism() == "quota"
    disk.apply({"a": {"nm_disk_quota": 20480}}, {"a": 1001}, {"a": HOMES / "a"})
    assert ["setquota", "-u", "1001", "0", "20480", "0", "0", "/home"] in host.commands
    host.answers[("repquota",)] = (0, b"*** Report\n#1001 -- 12 0 20480 0 3 0 0\n#0 -- 9 0 0 0 1 0 0\n")
    assert disk.observed() == {"a": {"nm_disk_quota": 20480, "disk_used": 12}}
    disk.remove("a", 1001)
    assert host.commands[-1] == ["setquota", "-u", "1001", "0", "0", "0", "0", "/home"]


def test_image_mechanism_without_quotas_creates_formats_and_mounts(host) -> None:  # type: ignore[no-untyped-def]
    host.answers[("findmnt", "-n", "-o", "FSTYPE,OPTIONS,TARGET")] = (0, b"btrfs rw,relatime /\n")
    disk = DiskEnforcer(host, HOMES, IMAGES)
    assert disk.mechanism() == "image"
    disk.prepare_home("a", 1001, 1001, HOMES / "a", 20480)
    programs = [c[0] for c in host.commands]
    assert programs.index("truncate") < programs.index("mkfs.ext4") < programs.index("mount")
    mkfs = host.commands_named("mkfs.ext4")[0]
    assert "root_owner=1001:1001" in mkfs and mkfs[-1] == str(IMAGES / "a.img.new")
    assert ["mount", "-o", "loop,nosuid,nodev", str(IMAGES / "a.img"), str(HOMES / "a")] in host.commands
    assert host.dirs[HOMES / "a"] == (1001, 1001, 0o700)


def test_image_not_created_for_an_unlimited_quota(host) -> None:  # type: ignore[no-untyped-def]
    disk = DiskEnforcer(host, HOMES, IMAGES)
    assert disk.prepare_home("a", 1001, 1001, HOMES / "a", 0) == ()
    assert host.commands_named("mkfs.ext4") == [] and host.commands_named("mount") == []


def config(**flags: bool) -> Config:
    return Config(enforce=EnforceSection(**flags))


def test_disabled_mechanisms_are_reported_not_ignored(host) -> None:  # type: ignore[no-untyped-def]
    enforcement = EnforcementSet.from_config(config(cpu=False, memory=False, bandwidth=False, disk=False), host)
    enforcement.probe()
    assert enforcement.enforcers == []
    assert len(enforcement.problems()) == 5 and all("not enforced" in p for p in enforcement.problems())
    assert enforcement.problems()[-1].startswith("pids: not enforced")  # it comes with the cgroups
    assert enforcement.place_processes({"a": 1001}) == 0 and enforcement.cgroups("a") == []


def test_unavailable_mechanism_is_a_problem_with_its_reason(host) -> None:  # type: ignore[no-untyped-def]
    host.fail_next("tc", stderr="tc: not installed")
    enforcement = EnforcementSet.from_config(config(cpu=False, memory=False, disk=False), host)
    assert host.commands == []  # building probes nothing
    enforcement.probe()
    assert enforcement.enforcers == []
    assert any(p.startswith("bandwidth:") and "tc" in p for p in enforcement.problems())


class Failing:
    name = "bandwidth"

    def __init__(self) -> None:
        self.removed: list[str] = []

    def available(self) -> str | None:
        return None

    def apply(self, rspecs, uids, homes=None):  # type: ignore[no-untyped-def]
        raise BackendError("tc exploded")

    def remove(self, name: str, uid: int) -> None:
        self.removed.append(name)

    def observed(self) -> dict[str, dict[str, int]]:
        return {"a": {"nm_net_max_rate": 8000}}


class Noting(Failing):
    name = "cpu"

    def apply(self, rspecs, uids, homes=None):  # type: ignore[no-untyped-def]
        self.applied = dict(rspecs)
        return ("guarantees scaled",)

    def observed(self) -> dict[str, dict[str, int]]:
        return {"a": {"nm_cpu_share": 2}}


def test_apply_all_runs_every_enforcer_and_reports_failures_and_notes() -> None:
    failing, noting = Failing(), Noting()
    enforcement = EnforcementSet([failing, noting])
    with pytest.raises(BackendError, match="bandwidth: tc exploded"):
        enforcement.apply_all({"a": {}}, {"a": 1001})
    assert noting.applied == {"a": {}}
    assert "guarantees scaled" in enforcement.problems()
    assert enforcement.observed() == {"a": {"nm_net_max_rate": 8000, "nm_cpu_share": 2}}
    enforcement.remove_all("a", 1001)
    assert failing.removed == noting.removed == ["a"]


def test_resource_rows_compare_effective_and_kernel() -> None:
    effective = {"a": {"nm_cpu_share": 2, "nm_cpu_guaranteed_share": 300, "nm_memory_max": 1024,
                       "nm_net_min_rate": 0, "nm_net_max_rate": 8000, "nm_net_share": 1, "nm_disk_quota": 100}}
    observed = {"a": {"nm_cpu_share": 5, "cpu_weight": 5120, "nm_cpu_guaranteed_share": 310, "nm_memory_max": 2048,
                      "nm_net_min_rate": 1200, "nm_net_max_rate": 8000},
                "ghost": {"nm_memory_max": 0}}
    rows = resource_rows(effective, observed)
    assert rows[0] == HEADER
    table = {(r[0], r[1]): r[2:] for r in rows[1:]}
    assert table[("a", "nm_cpu_share")] == ["2", "5 (cpu weight 5120)", "ok"]
    assert table[("a", "nm_cpu_guaranteed_share")][2] == "ok"
    assert table[("a", "nm_memory_max")] == ["1024", "2048", "DIFF"]
    assert table[("a", "nm_net_min_rate")][2] == "ok"
    assert table[("a", "nm_net_share")] == ["1", "-", "-"]
    assert table[("ghost", "nm_memory_max")] == ["-", "0", "stray"]
