"""Which enforcer a change concerns, and for which slivers: what makes a loan cost only the
enforcement work it changes. Pure.

Each enforcer reads a few resources of the effective RSpec (and the bandwidth and disk ones
also the uid or the home); a pass after a poke compares what it is about to apply with what was
last applied and calls an enforcer only when one of *its* inputs moved, for the slivers whose
inputs moved. An enforcer not listed here is always called with everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: enforcer name -> the RSpec resources it enforces
RESOURCES_OF: dict[str, frozenset[str]] = {
    "cpu": frozenset({"nm_cpu_share", "nm_cpu_guaranteed_share"}),
    # one sliver's cores move everyone's shared pool: CpusetEnforcer recomputes all whatever the names
    "cpuset": frozenset({"nm_cpu_cores", "nm_cpu_cores_besteffort"}),
    "memory": frozenset({"nm_memory_max"}),
    "pids": frozenset({"nm_pids_max"}),
    "bandwidth": frozenset({"nm_net_min_rate", "nm_net_max_rate", "nm_net_share"}),
    "disk": frozenset({"nm_disk_quota"}),
}
#: enforcers that name kernel objects by uid (nft rules) or act on the home (disk images)
USES_UID = frozenset({"bandwidth", "disk"})
USES_HOME = frozenset({"disk"})


@dataclass(frozen=True, slots=True)
class Targets:
    """What a pass applies: effective RSpecs, uids and homes by account name."""

    rspecs: Mapping[str, Mapping[str, int]]
    uids: Mapping[str, int] = field(default_factory=dict)
    homes: Mapping[str, Path] = field(default_factory=dict)


def changed_slivers(enforcer: str, before: Targets, after: Targets) -> frozenset[str] | None:
    """The slivers whose inputs to ``enforcer`` differ between ``before`` and ``after`` (a
    sliver that appears or goes counts); None when ``enforcer`` is unknown here (call it with
    everything)."""
    resources = RESOURCES_OF.get(enforcer)
    if resources is None:
        return None
    changed = set(before.rspecs) ^ set(after.rspecs)
    for name in set(before.rspecs) & set(after.rspecs):
        old, new = before.rspecs[name], after.rspecs[name]
        if any(old.get(r) != new.get(r) for r in resources):
            changed.add(name)
        elif enforcer in USES_UID and before.uids.get(name) != after.uids.get(name):
            changed.add(name)
        elif enforcer in USES_HOME and before.homes.get(name) != after.homes.get(name):
            changed.add(name)
    return frozenset(changed)
