"""Leases on reservable nodes: the schedule a GetSlivers document states, and what it means at
time ``t`` (which sliver holds the node, which slivers are frozen, when the next boundary is).

The document carries three members (authority.md): ``reservation_policy`` (``none``,
``lease_or_idle``, ``lease_or_shared``), ``lease_granularity`` (seconds) and ``leases``
(``[{slice_id, name, t_from, t_until}]``). :func:`schedule_from_members` validates them where they
enter (a bad lease is dropped with its reason, never the whole schedule) into a
:class:`LeaseSchedule`:

* times are rounded to the granularity as the later node manager did: to the *nearest* multiple
  (``(t + g // 2) // g * g``, half-way rounding up), both ``t_from`` and ``t_until``; a lease that
  rounds to nothing (``t_until <= t_from``) is refused;
* leases that overlap (after rounding) are **all** refused, each with a reason naming one lease it
  overlaps; the others are kept. Back-to-back leases (one's ``t_until`` is the next one's
  ``t_from``) do not overlap: the boundary belongs to the later lease.

Meaning (resources.md "Leases"): with policy ``none`` (or unknown) leases change nothing. On a
reservable node, during a lease ``[t_from, t_until)`` the leased sliver has the node and every
other non-system sliver is frozen; outside leases ``lease_or_idle`` freezes every non-system
sliver and ``lease_or_shared`` freezes none. A lease for a slice that has no sliver here still
holds the node. System slivers (:func:`is_system`) are never frozen.

Pure: no clock (``t`` is a parameter), no I/O, no logging. The schedule round-trips through plain values
(:meth:`LeaseSchedule.to_dict`) for the store's ``leases`` meta key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .allocation import FLOOR_KBIT
from .records import is_valid_name
from .rspec import MAX_VALUE

POLICY_NONE = "none"
POLICY_IDLE = "lease_or_idle"
POLICY_SHARED = "lease_or_shared"
POLICIES = (POLICY_NONE, POLICY_IDLE, POLICY_SHARED)
RESERVABLE = frozenset({POLICY_IDLE, POLICY_SHARED})
#: The granularity when the document gives none (or a bad one): PLCAPI's initial value is 15
#: minutes; the later node manager fell back to an hour.
DEFAULT_GRANULARITY = 3600
#: The most leases one document may carry (a day of 1-minute leases is 1440).
MAX_LEASES = 10_000
#: While leased, a sliver's CPU weight is at least this many times the weights of every other
#: sliver put together (system slivers keep running: the leased one still dominates them).
LEASE_CPU_FACTOR = 9

_TIME_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Lease:
    """One accepted lease, its times rounded to the granularity: ``[t_from, t_until)``."""

    name: str
    slice_id: int
    t_from: int
    t_until: int

    def label(self) -> str:
        return f"{self.name}@{self.t_from}-{self.t_until}"


@dataclass(frozen=True, slots=True)
class RefusedLease:
    """A lease of the document that is not applied, and why (logged, shown by ``status``)."""

    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class LeaseSchedule:
    """The validated schedule: accepted leases sorted by ``t_from`` and never overlapping."""

    policy: str = POLICY_NONE
    granularity: int = DEFAULT_GRANULARITY
    leases: tuple[Lease, ...] = ()
    refused: tuple[RefusedLease, ...] = ()

    @property
    def reservable(self) -> bool:
        return self.policy in RESERVABLE

    def leased_at(self, t: float) -> Lease | None:
        """The lease holding the node at ``t`` (None outside leases or on a non-reservable node)."""
        if not self.reservable:
            return None
        for lease in self.leases:
            if lease.t_from <= t < lease.t_until:
                return lease
            if lease.t_from > t:
                break
        return None

    def next_lease(self, t: float) -> Lease | None:
        """The first lease starting after ``t``."""
        if not self.reservable:
            return None
        return next((lease for lease in self.leases if lease.t_from > t), None)

    def next_boundary(self, t: float) -> int | None:
        """The first ``t_from`` or ``t_until`` after ``t`` (None: nothing will change)."""
        if not self.reservable:
            return None
        return min((b for lease in self.leases for b in (lease.t_from, lease.t_until) if b > t), default=None)

    def frozen_at(self, t: float, slivers: Mapping[str, bool]) -> frozenset[str]:
        """The slivers to keep frozen at ``t``; ``slivers`` maps name -> is a system sliver."""
        if not self.reservable:
            return frozenset()
        lease = self.leased_at(t)
        if lease is None and self.policy == POLICY_SHARED:
            return frozenset()
        holder = lease.name if lease is not None else None
        return frozenset(name for name, system in slivers.items() if not system and name != holder)

    # --- the store's form -----------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        """Plain values (the adapter writes them as JSON in the store's ``leases`` meta key)."""
        return {
            "policy": self.policy, "granularity": self.granularity,
            "leases": [[l.name, l.slice_id, l.t_from, l.t_until] for l in self.leases],
            "refused": [[r.label, r.reason] for r in self.refused],
        }

    @classmethod
    def from_dict(cls, raw: object) -> LeaseSchedule:
        """The schedule :meth:`to_dict` made; anything unreadable is no schedule (the store's
        value is ours, but a damaged one must not stop the daemon)."""
        if not isinstance(raw, dict):
            return cls()
        try:
            return cls(str(raw.get("policy", POLICY_NONE)), int(raw.get("granularity", DEFAULT_GRANULARITY)),
                       tuple(Lease(str(n), int(s), int(f), int(u)) for n, s, f, u in raw.get("leases", ())),
                       tuple(RefusedLease(str(l), str(r)) for l, r in raw.get("refused", ())))
        except (ValueError, TypeError, AttributeError):
            return cls()


def is_system(attributes: Iterable[tuple[str, str]]) -> bool:
    """A sliver is a system sliver when it has a ``system`` tag whose (last) value is neither
    empty nor ``0`` (PLC sends ``1``; the later node manager took any non-empty value, we also
    read an explicit ``0`` as "not system")."""
    value = None
    for tag, val in attributes:
        if tag == "system":
            value = str(val).strip()
    return value not in (None, "", "0")


def round_to(t: int, granularity: int) -> int:
    """``t`` rounded to the nearest multiple of ``granularity`` (half-way up), as the later node
    manager's ``round_time``."""
    return (t + granularity // 2) // granularity * granularity


def _integer(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def schedule_from_members(members: Mapping[str, object]) -> tuple[LeaseSchedule, list[str]]:
    """The schedule of a document's members, and the problems found in its node-wide fields
    (each lease's own problem is in ``schedule.refused``). Absent members mean policy ``none``."""
    problems: list[str] = []
    policy = members.get("reservation_policy", POLICY_NONE)
    if policy is None:
        policy = POLICY_NONE
    if policy not in POLICIES:
        problems.append(f"unknown reservation_policy {str(policy)[:40]!r}: leases are not applied")
        policy = POLICY_NONE
    raw_granularity = members.get("lease_granularity")
    granularity = _integer(raw_granularity)
    if granularity is None or granularity <= 0:
        if raw_granularity is not None:
            problems.append(f"bad lease_granularity {str(raw_granularity)[:40]!r}: using {DEFAULT_GRANULARITY} s")
        granularity = DEFAULT_GRANULARITY
    raw_leases = members.get("leases")
    if raw_leases is None:
        raw_leases = []
    if not isinstance(raw_leases, list):
        problems.append("leases is not a list: no lease applied")
        raw_leases = []
    if len(raw_leases) > MAX_LEASES:
        problems.append(f"{len(raw_leases)} leases: only the first {MAX_LEASES} are read")
        raw_leases = raw_leases[:MAX_LEASES]
    candidates: list[Lease] = []
    refused: list[RefusedLease] = []
    for index, raw in enumerate(raw_leases):
        lease, reason = _lease(raw, granularity)
        if lease is None:
            label = f"leases[{index}]" + (f" {str(raw.get('name'))[:40]}" if isinstance(raw, dict) else "")
            refused.append(RefusedLease(label, reason))
        else:
            candidates.append(lease)
    accepted, overlapping = refuse_overlaps(candidates)
    return LeaseSchedule(str(policy), granularity, tuple(accepted), tuple(refused + overlapping)), problems


def _lease(raw: object, granularity: int) -> tuple[Lease | None, str]:
    if not isinstance(raw, dict):
        return None, "not a struct"
    name, slice_id = raw.get("name"), _integer(raw.get("slice_id"))
    t_from, t_until = _integer(raw.get("t_from")), _integer(raw.get("t_until"))
    if not isinstance(name, str) or not is_valid_name(name):
        return None, "bad or missing sliver name"
    if slice_id is None or slice_id < 0:
        return None, "bad or missing slice_id"
    if t_from is None or t_until is None or not 0 <= t_from <= _TIME_MAX or not 0 <= t_until <= _TIME_MAX:
        return None, "bad or missing t_from/t_until"
    start, end = round_to(t_from, granularity), round_to(t_until, granularity)
    if end <= start:
        return None, f"empty once rounded to the granularity ({granularity} s)"
    return Lease(name, slice_id, start, end), ""


def refuse_overlaps(leases: Iterable[Lease]) -> tuple[list[Lease], list[RefusedLease]]:
    """Split ``leases`` into those overlapping no other (sorted by ``t_from``) and a refusal for
    every lease that overlaps at least one other, naming one of them. O(n log n)."""
    ordered = sorted(leases, key=lambda l: (l.t_from, l.t_until, l.name))
    accepted: list[Lease] = []
    refused: list[RefusedLease] = []
    cluster: list[tuple[Lease, Lease | None]] = []  # (lease, one lease it overlaps)
    reach: Lease | None = None  # the cluster's lease that ends last

    def close() -> None:
        if len(cluster) == 1:
            accepted.append(cluster[0][0])
        else:
            for lease, other in cluster:
                partner = other if other is not None else cluster[1][0]
                refused.append(RefusedLease(lease.label(), f"overlaps the lease {partner.label()}"))
        cluster.clear()

    for lease in ordered:
        if reach is not None and lease.t_from < reach.t_until:
            cluster.append((lease, reach))
            if lease.t_until > reach.t_until:
                reach = lease
            continue
        if cluster:
            close()
        cluster.append((lease, None))
        reach = lease
    if cluster:
        close()
    return accepted, refused


def lease_rspecs(rspecs: Mapping[str, Mapping[str, int]], leased: str | None,
                 cap_kbps: int | None) -> dict[str, dict[str, int]]:
    """Effective RSpecs with the lease applied: the leased sliver's CPU weight becomes at least
    :data:`LEASE_CPU_FACTOR` times everyone else's together, its HTB ceil the node cap (when there
    is one; otherwise unbounded, i.e. the bandwidth enforcer's cap) and its minimum rate the cap
    less the other classes' floors. The others are unchanged (frozen ones use nothing anyway)."""
    result = {name: dict(rspec) for name, rspec in rspecs.items()}
    if leased is None or leased not in result:
        return result
    own = result[leased]
    others = sum(r.get("nm_cpu_share", 1) for n, r in result.items() if n != leased)
    own["nm_cpu_share"] = min(MAX_VALUE, max(own.get("nm_cpu_share", 1), LEASE_CPU_FACTOR * others))
    if cap_kbps is not None and cap_kbps > 0:
        own["nm_net_max_rate"] = cap_kbps
        room = cap_kbps - FLOOR_KBIT * len(result)
        own["nm_net_min_rate"] = max(own.get("nm_net_min_rate", 0), min(cap_kbps, room))
    else:
        own["nm_net_max_rate"] = MAX_VALUE
    return result
