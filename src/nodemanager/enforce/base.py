"""The Enforcer port: make every sliver's effective RSpec real on the machine.

Enforcers receive the *effective* RSpecs (after loans, resources.md) of ALL slivers whenever any
of them changes, and a removal when a sliver goes. Every method is idempotent; a restart
re-applies everything, so implementations diff against the kernel's current state rather than
remembering what they did: ``apply`` reads what the kernel holds, computes what it should hold,
and changes only the difference, in one batch where the tool allows it (``tc -batch``,
``nft -f``). Re-applying the same RSpecs changes nothing.

Every method is called from one thread at a time (the daemon's enforcement loop); none of them
may be called concurrently with another method of the same enforcer.

Incremental passes (``EnforcementSet.apply_changes``): an enforcer is called only when one of the
resources it enforces (``enforce.changes.RESOURCES_OF``) changed for some sliver, or a sliver came
or went. The cgroup enforcers (``enforce.limits``) also offer ``apply_some(rspecs, names)``,
writing only the named slivers; the others get the full ``apply``. Groups of slivers that are gone
are removed by the sweep (``EnforcementSet.sweep``), not by ``apply``: a sliver being created has
its groups before it is in ``rspecs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

#: name -> effective RSpec (every resource of ``core.rspec.RESOURCES``).
RSpecs = Mapping[str, Mapping[str, int]]


class Enforcer(Protocol):
    #: "cpu", "memory", "bandwidth" or "disk": shown by ``status --resources``.
    name: str

    def available(self) -> str | None:
        """None when the mechanism works on this machine; else the reason it cannot (reported
        at start-up and by ``status``, never silently ignored). May prepare the enforcer's own
        top-level state (a parent cgroup, an images directory). Idempotent."""
        ...

    def apply(
        self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None
    ) -> tuple[str, ...]:
        """Make the kernel match ``rspecs`` (every sliver's effective RSpec; ``uids`` and
        ``homes`` by sliver name). Slivers absent from ``rspecs`` lose their settings, except
        that nothing holding a sliver's data or processes is destroyed here (that is
        ``remove``'s job). Returns notes on what had to be scaled or capped (for the log and
        ``status``). A failure for one sliver does not stop the others: every failure is
        collected into one ``BackendError`` raised at the end. Idempotent."""
        ...

    def remove(self, name: str, uid: int) -> None:
        """Remove everything of one sliver (its cgroup and processes, class, rules, quota or
        image). Idempotent: removing what is not there succeeds."""
        ...

    def observed(self) -> dict[str, dict[str, int]]:
        """What the kernel holds now, per sliver, in RSpec units and under RSpec names where
        there is one (``status --resources`` shows it beside the effective RSpec)."""
        ...
