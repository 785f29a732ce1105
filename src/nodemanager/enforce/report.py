"""``nodemanager status --resources``: the effective RSpec beside what the kernel holds.

A pure table builder: the caller passes ``GetEffectiveRSpec``'s values and
``EnforcementSet.observed()`` and prints the rows. Agreement is judged per resource, because some
settings are not one-to-one with their RSpec value: a CPU weight raised for a guarantee holds
*at least* the share, and a guarantee is honoured when the weights give *at least* that fraction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..core.allocation import FLOOR_KBIT

HEADER = ["sliver", "resource", "effective", "kernel", "agree"]

#: resources shown, in order, and how the kernel value must relate to the effective one
_RULES: tuple[tuple[str, str], ...] = (
    ("nm_cpu_share", ">="),
    ("nm_cpu_guaranteed_share", ">="),
    ("nm_memory_max", "=="),
    ("nm_net_min_rate", "floor"),  # the HTB rate: the minimum plus a share of the spare
    ("nm_net_max_rate", "=="),
    ("nm_net_share", "=="),
    ("nm_disk_quota", "=="),
    ("nm_pids_max", "=="),
    # cores no other sliver's cpuset holds; fewer when scaled (status shows the note), and a
    # lone sliver's cores cannot be told from the shared pool
    ("nm_cpu_cores", "<="),
)
#: raw kernel figures shown in brackets after the RSpec-unit value
_RAW = {"nm_cpu_share": "cpu_weight", "nm_net_share": "htb_quantum", "nm_pids_max": "pids_current",
        "nm_cpu_cores": "cpuset_cpus"}


def _agrees(rule: str, effective: int, kernel: int) -> bool:
    if rule == ">=":
        return kernel >= effective
    if rule == "<=":
        return kernel <= effective
    if rule == "floor":  # HTB needs a positive rate: 0 is enforced as the floor
        return kernel >= max(FLOOR_KBIT, effective)
    return kernel == effective


@dataclass(frozen=True, slots=True)
class ResourceFact:
    """One (sliver, resource) comparison. ``effective``/``kernel`` are None when that side has
    no value; ``raw`` is the kernel's own figure behind ``kernel`` (name, value) where there is
    one; ``agree`` is ``ok``, ``diff`` or ``stray``, None when nothing in the kernel enforces it."""

    sliver: str
    resource: str
    effective: int | None
    kernel: int | None
    raw: tuple[str, int] | None
    agree: str | None


def resource_facts(effective: Mapping[str, Mapping[str, int]],
                   observed: Mapping[str, Mapping[str, int]]) -> list[ResourceFact]:
    """One fact per (sliver, resource) for every sliver in either mapping, sorted (the rows of
    :func:`resource_rows`, as values)."""
    facts = []
    for name in sorted(set(effective) | set(observed)):
        eff = effective.get(name, {})
        obs = observed.get(name, {})
        for resource, rule in _RULES:
            if resource not in eff and resource not in obs:
                continue
            raw_name = _RAW.get(resource)
            raw = (raw_name, obs[raw_name]) if resource in obs and raw_name and raw_name in obs else None
            if resource not in obs:
                agree = None
            elif resource not in eff:
                agree = "stray"
            else:
                agree = "ok" if _agrees(rule, eff[resource], obs[resource]) else "diff"
            facts.append(ResourceFact(name, resource, eff.get(resource), obs.get(resource), raw, agree))
    return facts


def resource_rows(effective: Mapping[str, Mapping[str, int]],
                  observed: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Header + one row per (sliver, resource) for every sliver in either mapping, sorted.

    ``kernel`` is ``-`` when nothing enforces the resource for that sliver (the enforcer is off
    or unavailable, or the sliver is unknown to the kernel); ``agree`` is then ``-``. A sliver
    the kernel knows but the RSpecs do not shows ``-`` as effective and ``stray``."""
    rows = [list(HEADER)]
    for fact in resource_facts(effective, observed):
        k_text = "-" if fact.kernel is None else str(fact.kernel)
        if fact.raw is not None:
            k_text += f" ({fact.raw[0].replace('_', ' ')} {fact.raw[1]})"
        agree = {None: "-", "diff": "DIFF"}.get(fact.agree, fact.agree)
        rows.append([fact.sliver, fact.resource, "-" if fact.effective is None else str(fact.effective),
                     k_text, str(agree)])
    return rows
