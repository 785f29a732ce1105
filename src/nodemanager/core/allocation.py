"""Pure arithmetic of resource enforcement: CPU weights, HTB classes, class ids.

The enforcers (``nodemanager.enforce``) read and write the kernel; every number they write is
decided here, from the effective RSpecs alone, so that the decisions are exhaustively testable
and a restart recomputes exactly the same state (resources.md, "Enforcement details").

CPU model. Under full contention the node's CPU is shared by weight among the slivers and "the
rest of the node", which counts as ONE competitor of the unmanaged default weight (1024 on cgroup
v1, 100 on v2). A sliver's base weight is ``unit x share`` (a share-1 sliver weighs as much as an
unmanaged group). A guarantee ``g`` (thousandths) raises the weight until
``weight / (other + sum of weights) >= g / 1000``. Guarantees adding up to more than the node can
give (``1000 x max/(max + other)``, just under 1000) are scaled down proportionally, and a note
says so. The slivers live under one parent group whose weight is the sum of theirs, so the
parent competes with the rest of the node as if the slivers were flat siblings of it; the kernel's
maximum weight caps the parent (and, proportionally, the children), with a note.

HTB model. One root class at the node cap; a default class for unclassified traffic (rate
:data:`FLOOR_KBIT`, ceil the cap, quantum of a share-1 sliver); one class per sliver with
``ceil = min(cap, nm_net_max_rate)``, a quantum proportional to ``nm_net_share`` (never below
the MTU, never above HTB's 200000), and ``rate = max(FLOOR, nm_net_min_rate)`` PLUS its
share-proportional part of the cap nobody reserved (water-filled under the ceils). Why rates
and not only quanta: HTB's deficit round robin sends a whole packet per turn however small the
quantum, and with GSO/TSO a packet is up to 64 KB, so quanta of 1514 vs 4542 measured a 0.51/0.49
split for shares 1:3; rates are token buckets, exact for any packet size, so under full
contention every sliver gets its reserved minimum plus its share of the rest. Quanta still
weight the borrowing of bandwidth left idle. When the minimum rates add up to more than the cap,
the part above the floor is scaled down proportionally (no share part then), with a note.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: Smallest HTB rate/ceil we ever write, kbit/s (the RSpec minimum of ``nm_net_max_rate``).
FLOOR_KBIT = 8
#: One Ethernet frame: the smallest useful DRR quantum (silences HTB's "quantum is small").
MTU_QUANTUM = 1514
#: HTB warns above this quantum ("quantum of class is big").
MAX_QUANTUM = 200_000
#: HTB minor ids: 1 is the root class, 2 the default class, sliver classes use the rest.
ROOT_MINOR = 0x1
DEFAULT_MINOR = 0x2
FIRST_SLIVER_MINOR = 0x10
LAST_SLIVER_MINOR = 0xFFFE
_SPAN = LAST_SLIVER_MINOR - FIRST_SLIVER_MINOR + 1


@dataclass(frozen=True, slots=True)
class WeightScale:
    """How one cgroup version expresses CPU weight."""

    unit: int  # weight of share 1 (= an unmanaged group)
    minimum: int
    maximum: int


#: cgroup v1 ``cpu.shares`` and v2 ``cpu.weight``.
V1_WEIGHTS = WeightScale(unit=1024, minimum=2, maximum=262_144)
V2_WEIGHTS = WeightScale(unit=100, minimum=1, maximum=10_000)


@dataclass(frozen=True, slots=True)
class CpuWeights:
    """The weights to write: ``children`` per sliver and the slivers' ``parent`` group.

    ``flat`` are the ideal weights before the kernel's limits (what the guarantees were computed
    against); ``guarantees`` the guarantees actually honoured (after any scaling); ``notes`` say
    what had to be scaled or capped, one sentence each."""

    children: dict[str, int]
    parent: int
    flat: dict[str, int]
    guarantees: dict[str, int]
    notes: tuple[str, ...] = ()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def scale_guarantees(guarantees: Mapping[str, int], budget: int) -> tuple[dict[str, int], bool]:
    """Guarantees scaled down proportionally (rounding down) so that they add up to at most
    ``budget``; the flag says whether scaling happened. Negative values count as 0."""
    clean = {name: max(0, g) for name, g in guarantees.items()}
    total = sum(clean.values())
    if total <= budget:
        return clean, False
    return {name: g * budget // total for name, g in clean.items()}, True


def cpu_weights(
    shares: Mapping[str, int],
    guarantees: Mapping[str, int],
    scale: WeightScale,
    other_weight: int | None = None,
) -> CpuWeights:
    """Weights for every sliver of ``shares`` (guarantees of slivers not in ``shares`` are ignored).

    Contract (``flat``, ``guarantees`` as returned; ``other`` defaults to ``scale.unit``):
    ``flat[s] >= scale.unit * max(1, shares[s])`` and ``flat[s] * 1000 >= guarantees[s] * (other
    + sum(flat))`` for every sliver; ``sum(guarantees) <= 1000 * max/(max+other)``. The children
    keep the ratios of ``flat`` (exactly when no weight exceeds ``scale.maximum``) within
    ``[minimum, maximum]``; ``parent = clamp(sum(flat))``.
    """
    other = scale.unit if other_weight is None else max(1, other_weight)
    names = sorted(shares)
    notes: list[str] = []
    base = {n: scale.unit * max(1, shares[n]) for n in names}
    budget = 1000 * scale.maximum // (scale.maximum + other)
    granted, scaled = scale_guarantees({n: guarantees.get(n, 0) for n in names}, budget)
    if scaled:
        asked = sum(max(0, guarantees.get(n, 0)) for n in names)
        notes.append(f"CPU guarantees add up to {asked}/1000, more than the node can give "
                     f"({budget}/1000): scaled down proportionally")
    flat = _raise_for_guarantees(base, granted, other)
    total = sum(flat.values())
    children = dict(flat)
    biggest = max(flat.values(), default=0)
    if biggest > scale.maximum:
        children = {n: max(scale.minimum, w * scale.maximum // biggest) for n, w in flat.items()}
        notes.append(f"sliver CPU weights exceed the kernel maximum {scale.maximum}: "
                     "scaled down proportionally")
    parent = min(scale.maximum, max(scale.minimum, total if names else scale.unit))
    if total > scale.maximum:
        notes.append(f"slivers' total CPU weight {total} exceeds the kernel maximum "
                     f"{scale.maximum}: together they get less than their shares against the node")
    return CpuWeights(children, parent, flat, granted, tuple(notes))


def _raise_for_guarantees(base: Mapping[str, int], granted: Mapping[str, int], other: int) -> dict[str, int]:
    """Smallest-ish integer weights >= ``base`` with ``w_i * 1000 >= g_i * (other + sum w)``.

    With a fixed binding set B (slivers whose guarantee exceeds their base), the exact total is
    ``T* = (other + sum_{not B} base) / (1 - sum_B g / 1000)``; B grows until stable. Rounding each
    binding weight up adds at most one per guaranteed sliver, and the total grows at slope at most
    ``G/1000`` in T, so choosing ``T = T* + n_g * 1000 / (1000 - G)`` (rounded up) gives
    ``other + sum(w) <= T``, which makes every guarantee hold against the actual total."""
    weights = dict(base)
    positive = {n: g for n, g in granted.items() if g > 0}
    if not positive:
        return weights
    g_total = sum(positive.values())  # < 1000 by the budget
    binding: set[str] = set()
    while True:
        free = other + sum(w for n, w in base.items() if n not in binding)
        bound = sum(positive[n] for n in binding)
        # T* as a fraction num/den: free / (1 - bound/1000)
        num, den = free * 1000, 1000 - bound
        grown = {n for n, g in positive.items() if base[n] * den * 1000 < g * num}
        if grown <= binding:
            break
        binding |= grown
    # T = ceil(num/den + n_g * 1000 / (1000 - G))
    slack_den = 1000 - g_total
    target = _ceil_div(num * slack_den + len(positive) * 1000 * den, den * slack_den)
    for n, g in positive.items():
        weights[n] = max(base[n], _ceil_div(g * target, 1000))
    return weights


def full_contention_permille(
    weights: Mapping[str, int], other_weight: int, parent_weight: int | None = None
) -> dict[str, int]:
    """Each sliver's CPU under full contention, in thousandths (rounded down): what the kernel's
    weights actually guarantee. Used to compare the kernel with ``nm_cpu_guaranteed_share``.

    Flat (``parent_weight`` None): the slivers compete with the rest of the node, of weight
    ``other_weight``, side by side. Nested: the slivers share their parent group, whose weight
    ``parent_weight`` competes with the rest of the node's ``other_weight``."""
    total = sum(weights.values())
    if parent_weight is None:
        return {n: w * 1000 // (other_weight + total) for n, w in weights.items()}
    total = total or 1
    return {n: 1000 * parent_weight * w // ((parent_weight + other_weight) * total) for n, w in weights.items()}


# --- HTB ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class HtbClass:
    minor: int
    rate_kbit: int
    ceil_kbit: int
    quantum: int

    @property
    def classid(self) -> str:
        """tc's spelling, minor in hex: ``1:3f1``."""
        return f"1:{self.minor:x}"


@dataclass(frozen=True, slots=True)
class HtbPlan:
    """The whole HTB tree of the uplink: ``root`` (1:1), ``default`` (1:2), one class per sliver."""

    cap_kbit: int
    root: HtbClass
    default: HtbClass
    slivers: dict[str, HtbClass]
    notes: tuple[str, ...] = field(default=())


def classid_minors(uids: Mapping[str, int]) -> dict[str, int]:
    """A stable HTB minor id per sliver, derived from its uid.

    The preferred minor is ``FIRST_SLIVER_MINOR + uid mod span``; two slivers whose uids collide
    modulo the span are resolved by linear probing in (uid, name) order, so the result depends
    only on the set of slivers, never on timing or history. With uids below ~65,000 there are no
    collisions and a sliver keeps its class for life."""
    taken: set[int] = set()
    result: dict[str, int] = {}
    for name, uid in sorted(uids.items(), key=lambda item: (item[1], item[0])):
        if len(taken) >= _SPAN:
            break  # more slivers than class ids: the rest stay unclassified (default class)
        offset = uid % _SPAN
        while FIRST_SLIVER_MINOR + offset in taken:
            offset = (offset + 1) % _SPAN
        minor = FIRST_SLIVER_MINOR + offset
        taken.add(minor)
        result[name] = minor
    return result


def quantum_unit(shares: Mapping[str, int]) -> int:
    """Bytes of quantum per share unit: the MTU, lowered when the largest share would push a
    quantum over :data:`MAX_QUANTUM`."""
    biggest = max((max(1, s) for s in shares.values()), default=1)
    return max(1, min(MTU_QUANTUM, MAX_QUANTUM // biggest))


def _share_out(rates: Mapping[str, int], ceils: Mapping[str, int], shares: Mapping[str, int],
               spare: int) -> dict[str, int]:
    """``rates`` plus ``spare`` kbit/s shared out in proportion to ``shares`` (water-filling:
    a class never goes over its ceil; what it cannot take goes to the others)."""
    result = dict(rates)
    active = set(rates)
    while active and spare > 0:
        total = sum(shares[n] for n in active)
        full = {n for n in active if result[n] + spare * shares[n] // total >= ceils[n]}
        if not full:
            for n in active:
                result[n] += spare * shares[n] // total
            break
        for n in full:
            spare -= ceils[n] - result[n]
            result[n] = ceils[n]
        active -= full
    return result


def htb_plan(
    cap_kbit: int,
    rspecs: Mapping[str, Mapping[str, int]],
    minors: Mapping[str, int],
) -> HtbPlan:
    """The HTB classes for the slivers of ``rspecs`` that have a minor in ``minors``.

    Contract: every class has ``FLOOR <= rate <= ceil <= cap``, ``MTU <= quantum <=
    MAX_QUANTUM``; the default class plus the slivers' rates add up to at most the cap whenever
    ``cap >= FLOOR x (slivers + 1)``; unless the minimum rates had to be scaled down (with a
    note), ``rate >= max(FLOOR, nm_net_min_rate)`` and the rest of the cap is shared out by
    ``nm_net_share``; quanta are proportional to ``nm_net_share`` except where clamped."""
    cap = max(FLOOR_KBIT, cap_kbit)
    notes: list[str] = []
    names = sorted(n for n in rspecs if n in minors)
    shares = {n: max(1, rspecs[n].get("nm_net_share", 1)) for n in names}
    unit = quantum_unit(shares)
    if unit < MTU_QUANTUM:
        notes.append(f"net shares up to {max(shares.values())}: quantum per share lowered to {unit} "
                     "bytes; small shares are clamped to the MTU")
    ceils = {n: min(cap, max(FLOOR_KBIT, rspecs[n].get("nm_net_max_rate", cap))) for n in names}
    wanted = {n: min(ceils[n], max(FLOOR_KBIT, rspecs[n].get("nm_net_min_rate", 0))) for n in names}
    above = {n: r - FLOOR_KBIT for n, r in wanted.items()}
    room = cap - FLOOR_KBIT * (len(names) + 1)
    if sum(above.values()) > max(0, room):
        total = sum(above.values())
        if room <= 0:
            rates = {n: FLOOR_KBIT for n in names}
            notes.append(f"node cap {cap} kbit/s is too small for {len(names)} slivers' minimum "
                         "rates: every class gets the floor")
        else:
            rates = {n: FLOOR_KBIT + a * room // total for n, a in above.items()}
            notes.append(f"minimum rates add up to {total + FLOOR_KBIT * len(names)} kbit/s, over "
                         f"the node cap {cap}: scaled down proportionally")
    else:
        rates = _share_out(wanted, ceils, shares, room - sum(above.values()))
    slivers = {
        n: HtbClass(minors[n], rates[n], ceils[n], max(MTU_QUANTUM, min(MAX_QUANTUM, shares[n] * unit)))
        for n in names
    }
    root = HtbClass(ROOT_MINOR, cap, cap, MTU_QUANTUM)
    default = HtbClass(DEFAULT_MINOR, FLOOR_KBIT, cap, max(MTU_QUANTUM, unit))
    return HtbPlan(cap, root, default, slivers, tuple(notes))
