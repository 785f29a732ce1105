"""``nodemanager status --resources``: the effective RSpec beside what the kernel holds.

A pure table builder: the caller passes ``GetEffectiveRSpec``'s values and
``EnforcementSet.observed()`` and prints the rows. Agreement is judged per resource, because some
settings are not one-to-one with their RSpec value: a CPU weight raised for a guarantee holds
*at least* the share, and a guarantee is honoured when the weights give *at least* that fraction.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def resource_rows(effective: Mapping[str, Mapping[str, int]],
                  observed: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """Header + one row per (sliver, resource) for every sliver in either mapping, sorted.

    ``kernel`` is ``-`` when nothing enforces the resource for that sliver (the enforcer is off
    or unavailable, or the sliver is unknown to the kernel); ``agree`` is then ``-``. A sliver
    the kernel knows but the RSpecs do not shows ``-`` as effective and ``stray``."""
    rows = [list(HEADER)]
    for name in sorted(set(effective) | set(observed)):
        eff = effective.get(name, {})
        obs = observed.get(name, {})
        for resource, rule in _RULES:
            if resource not in eff and resource not in obs:
                continue
            e_text = str(eff[resource]) if resource in eff else "-"
            if resource in obs:
                k_text = str(obs[resource])
                raw = _RAW.get(resource)
                if raw and raw in obs:
                    k_text += f" ({raw.replace('_', ' ')} {obs[raw]})"
            else:
                k_text = "-"
            if resource not in obs:
                agree = "-"
            elif resource not in eff:
                agree = "stray"
            else:
                agree = "ok" if _agrees(rule, eff[resource], obs[resource]) else "DIFF"
            rows.append([name, resource, e_text, k_text, agree])
    return rows
