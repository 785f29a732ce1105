"""What changed between two looks at the slivers, as short lines (``make demo`` prints them).

A full status table every poll buries the one line that changed; these lines name it: a sliver
added or removed, started or stopped (any change of its state word), its RSpec or keys changed,
or reconfigured (the node re-applied a changed record: the applied fingerprint moved while nothing
else shown here did, e.g. a new initscript or expiry). Pure: snapshots are plain values taken from
:func:`nodemanager.status.sliver_facts`, so the comparison is tested without a daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .status import SliverFacts

#: State words that read better as a verb when a sliver enters them.
_ENTERED = {"running": "started", "stopped": "stopped", "failed": "FAILED", "expired": "expired"}


@dataclass(frozen=True, slots=True)
class SliverSnapshot:
    """The parts of one sliver whose change is worth a line."""

    state: str
    detail: str
    instantiation: str
    rspec: tuple[tuple[str, int], ...]
    keys: int
    applied: str


def snapshot(facts: Iterable[SliverFacts]) -> dict[str, SliverSnapshot]:
    """Sliver name -> snapshot, from the status facts of one moment."""
    return {
        fact.name: SliverSnapshot(
            state=fact.state,
            detail=fact.detail,
            instantiation=fact.sliver.instantiation if fact.sliver else "-",
            rspec=tuple(sorted((fact.rspec or {}).items())),
            keys=len(fact.sliver.keys) if fact.sliver else 0,
            applied=fact.account.applied if fact.account else "",
        )
        for fact in facts
    }


def describe_changes(before: Mapping[str, SliverSnapshot], after: Mapping[str, SliverSnapshot]) -> list[str]:
    """One line per sliver that changed, sorted by name; empty when nothing did."""
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            assert new is not None
            lines.append(f"+ {name}: added ({new.instantiation}), {_state(new)}")
            continue
        if new is None:
            lines.append(f"- {name}: removed")
            continue
        parts = []
        if (old.state, old.detail) != (new.state, new.detail):
            verb = _ENTERED.get(new.state, new.state)
            parts.append(f"{verb} (was {old.state})" + (f": {new.detail[:80]}" if new.detail else ""))
        if old.instantiation != new.instantiation:
            parts.append(f"instantiation {old.instantiation} -> {new.instantiation}")
        if old.rspec != new.rspec:
            parts.append("rspec " + _rspec_diff(dict(old.rspec), dict(new.rspec)))
        if old.keys != new.keys:
            parts.append(f"keys {old.keys} -> {new.keys}")
        if not parts and old.applied != new.applied:
            parts.append("reconfigured")
        if parts:
            lines.append(f"~ {name}: " + ", ".join(parts))
    return lines


def _state(snap: SliverSnapshot) -> str:
    return snap.state + (f": {snap.detail[:80]}" if snap.detail else "")


def _rspec_diff(old: Mapping[str, int], new: Mapping[str, int]) -> str:
    changed = [f"{key} {old.get(key, '-')} -> {new.get(key, '-')}"
               for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    return ", ".join(changed)
