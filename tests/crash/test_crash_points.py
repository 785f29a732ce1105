"""The node crashed at every effect of every scenario recovers with every invariant intact.

See ``harness`` (how a crash is simulated and explored) and ``invariants`` (what must hold).
The short profile (``make test``) explores every crash point of the scenarios with two slivers
on two cgroup layouts; ``make crash`` (``--crash-profile=long``) larger scenarios with several
seeds on every layout. Crash points are explored in parallel, one process per CPU (``fanout``).
"""

from __future__ import annotations

import pytest

from nodemanager.core.lifecycle import TRANSITIONS
from nodemanager.core.records import Phase

from .harness import Exploration, explore
from .invariants import check_invariants
from .scenarios import scenarios

#: (slivers, seed, cgroup layout) per profile: ``make test`` runs "short", ``make crash`` "long".
#: The short one covers this machine's hybrid layout and pure v1 (the freezer, no cgroup.kill).
PROFILES = {"short": [(2, 0, "hybrid"), (2, 1, "v1")],
            "long": [(3, 0, "hybrid"), (4, 1, "v2"), (3, 2, "v1"), (5, 3, "hybrid")]}
NAMES = [s.name for s in scenarios()]
EXPLORED: dict[tuple[str, str], Exploration] = {}


def _explore(name: str, profile: str) -> list[Exploration]:
    results = []
    for size, seed, layout in PROFILES[profile]:
        key = (f"{name}/{size}/{seed}/{layout}", profile)
        if key not in EXPLORED:
            scenario = next(s for s in scenarios(size, seed, layout) if s.name == name)
            EXPLORED[key] = explore(scenario, check_invariants)
        results.append(EXPLORED[key])
    return results


@pytest.mark.parametrize("name", NAMES)
def test_every_crash_point_recovers(name: str, crash_profile: str) -> None:
    results = _explore(name, crash_profile)
    points = sum(r.crash_points for r in results)
    print(f"\n{name}: {points} crash points explored ({', '.join(str(r.effects) for r in results)} effects)")
    failures = [f for r in results for f in r.failures]
    assert points > 0
    assert not failures, "\n".join(failures[:20])


def test_lifecycle_table_is_what_crashes_can_reach(crash_profile: str) -> None:
    """The table of ``core.lifecycle`` admits exactly the phase changes the simulation makes
    (nothing reachable is illegal, nothing legal is unreachable)."""
    reached: set[tuple[Phase, Phase]] = set()
    points = 0
    for name in NAMES:
        for result in _explore(name, crash_profile):
            reached |= result.transitions
            points += result.crash_points
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets if a is not b}
    print(f"\n{points} crash points explored in all; {len(reached)} phase changes reached")
    assert reached - table == set(), f"reached but illegal: {sorted((a.value, b.value) for a, b in reached - table)}"
    assert table - reached == set(), f"legal but unreachable: {sorted((a.value, b.value) for a, b in table - reached)}"
