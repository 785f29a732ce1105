"""The bundled authority's leases: per node, ``reservation_policy``, ``lease_granularity`` and
``[[nodes.leases]]`` in the data file -> the three GetSlivers members (authority.md)::

    [[nodes]]
    id = 1
    reservation_policy = "lease_or_idle"   # none (default: no member sent) | lease_or_idle | lease_or_shared
    lease_granularity = 60                  # seconds (default 3600)
    [[nodes.leases]]
    slice = "site_alpha"                    # a slice of this file (its id is sent as slice_id)
    t_from = "+1h"                          # an epoch, or relative to the file's modification time
    t_until = "+2h"

The authority only checks what it must to build the members (a known slice, ``t_from <
t_until``); rounding to the granularity and refusing overlapping leases are the node's
(``core.leases``), so a data file can show a node refusing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ..core.leases import DEFAULT_GRANULARITY, POLICIES, POLICY_NONE


class LeaseSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    slice: str
    t_from: int | str
    t_until: int | str


@dataclass(frozen=True, slots=True)
class LeaseEntry:
    name: str
    slice_id: int
    t_from: int
    t_until: int


@dataclass(frozen=True, slots=True)
class NodeLeases:
    """What one node serves; ``policy`` "none" with no lease: no member at all (a regular node)."""

    policy: str = POLICY_NONE
    granularity: int = DEFAULT_GRANULARITY
    leases: tuple[LeaseEntry, ...] = ()

    def members(self) -> dict[str, Any]:
        if self.policy == POLICY_NONE and not self.leases:
            return {}
        return {"reservation_policy": self.policy, "lease_granularity": self.granularity,
                "leases": [{"slice_id": l.slice_id, "name": l.name, "t_from": l.t_from, "t_until": l.t_until}
                           for l in self.leases]}


def parse_node_leases(where: str, policy: str, granularity: int, specs: Sequence[LeaseSpec],
                      slice_ids: Mapping[str, int], when: Callable[[int | str], int],
                      fail: Callable[[str, str], Exception]) -> NodeLeases:
    """Validate one node's lease fields; ``when`` turns an epoch or ``+1h`` into an epoch
    (``ValueError`` when it cannot); ``fail(where, why)`` makes the error to raise."""
    if policy not in POLICIES:
        raise fail(f"{where}.reservation_policy", f"must be one of {', '.join(POLICIES)}")
    if not 0 < granularity <= 86400:
        raise fail(f"{where}.lease_granularity", "must be between 1 and 86400 seconds")
    leases = []
    for index, spec in enumerate(specs):
        at = f"{where}.leases[{index}]"
        if spec.slice not in slice_ids:
            raise fail(f"{at}.slice", f"{spec.slice!r} is not a slice of this file")
        try:
            t_from, t_until = when(spec.t_from), when(spec.t_until)
        except ValueError as exc:
            raise fail(f"{at}.t_from/t_until", str(exc)) from exc
        if t_until <= t_from:
            raise fail(f"{at}.t_until", "must be after t_from")
        leases.append(LeaseEntry(spec.slice, slice_ids[spec.slice], t_from, t_until))
    return NodeLeases(policy, granularity, tuple(leases))
