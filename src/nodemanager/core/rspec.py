"""Resource specifications (RSpecs): the resource table, PLC aliases, and the loan arithmetic.

An RSpec is a plain ``dict[str, int]`` holding every resource of :data:`RESOURCES`, under the
``nm_`` names. It is derived from a sliver's attributes by :func:`rspec_from_attributes`; the
values the enforcers apply are the *effective* RSpecs of :func:`effective_rspecs`, i.e. after
loans between slivers (resources.md, "Effective RSpec").

Everything here is pure and deterministic: the same records and loans always give the same
effective values, whatever order the caller's dicts were built in, so enforcement never depends
on timing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .cores import CoreRequest, parse_cpu_cores
from .errors import InvalidLoans
from .records import Loan, is_valid_name

KIB_PER_GIB = 1024 * 1024

#: The per-sliver ``ceil`` when the node has no bandwidth cap (10 Gbit/s, in kbit/s).
DEFAULT_NET_MAX_KBPS = 10_000_000

#: Tasks (processes and threads) a sliver may have at once unless its attributes say otherwise:
#: enough for ordinary work, small enough that a fork loop cannot exhaust the node's pids.
DEFAULT_PIDS_MAX = 1024

#: Every value is clamped to this so an RSpec always fits an XML-RPC ``<int>`` (32-bit signed),
#: which is how ``GetRSpec``/``GetEffectiveRSpec`` return it.
MAX_VALUE = 2**31 - 1


@dataclass(frozen=True, slots=True)
class ResourceSpec:
    """One row of the resource table in resources.md.

    ``minimum`` is what a value is clamped up to and what a lender must keep after its loans.
    ``nm_enabled`` has no minimum in the design's table; it is a 0/1 flag, so its minimum is 0.
    """

    name: str
    unit: str
    default: int
    minimum: int
    loanable: bool


RESOURCES: dict[str, ResourceSpec] = {
    spec.name: spec
    for spec in (
        ResourceSpec("nm_enabled", "0/1", 1, 0, False),
        ResourceSpec("nm_cpu_share", "proportional weight", 1, 1, True),
        ResourceSpec("nm_cpu_guaranteed_share", "thousandths of the node's CPU", 0, 0, True),
        ResourceSpec("nm_memory_max", "KiB, 0 = unlimited", 0, 0, False),
        ResourceSpec("nm_net_min_rate", "kbit/s", 0, 0, True),
        ResourceSpec("nm_net_max_rate", "kbit/s", DEFAULT_NET_MAX_KBPS, 8, True),
        ResourceSpec("nm_net_share", "weight", 1, 1, True),
        ResourceSpec("nm_disk_quota", "KiB, 0 = unlimited", 5 * KIB_PER_GIB, 0, False),
        ResourceSpec("nm_pids_max", "tasks", DEFAULT_PIDS_MAX, 16, False),
        ResourceSpec("nm_cpu_cores", "whole CPUs reserved for the sliver alone", 0, 0, False),
        ResourceSpec("nm_cpu_cores_besteffort", "0/1: also the shared CPUs", 0, 0, False),
    )
}

LOANABLE: frozenset[str] = frozenset(name for name, spec in RESOURCES.items() if spec.loanable)

#: PLC tag name -> (our resource name, multiplier). Values under these names count only when the
#: ``nm_`` name itself is absent (or unparsable).
PLC_ALIASES: dict[str, tuple[str, int]] = {
    "cpu_share": ("nm_cpu_share", 1),
    "cpu_pct": ("nm_cpu_guaranteed_share", 10),
    "net_min_rate": ("nm_net_min_rate", 1),
    "net_max_rate": ("nm_net_max_rate", 1),
    "net_share": ("nm_net_share", 1),
    "disk_max": ("nm_disk_quota", 1),
}

# A plain decimal integer, ASCII digits only. ``int()`` alone would also accept "1_000" and
# non-ASCII digits, and an unbounded digit count would let one attribute cost real CPU time.
_INTEGER = re.compile(r"\s*([+-]?[0-9]{1,30})\s*", re.ASCII)

_DEFAULTS: dict[str, int] = {name: spec.default for name, spec in RESOURCES.items()}
_CLAMPED = tuple((name, spec.minimum) for name, spec in RESOURCES.items())


def parse_value(value: object) -> int | None:
    """The integer an attribute value spells, or None when it is not a plain decimal integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    match = _INTEGER.fullmatch(value)
    return int(match.group(1)) if match else None


def rspec_from_attributes(
    attributes: Iterable[tuple[str, str]], node_cap_kbps: int | None = None
) -> dict[str, int]:
    """The full RSpec (every resource of :data:`RESOURCES`) stated by a sliver's attributes.

    Contract: unknown tags are ignored; a missing or unparsable value takes the default; when a
    tag repeats, its last parsable value counts; an ``nm_`` name wins over its PLC alias whatever
    their order (an unparsable ``nm_`` value counts as absent, so a parsable alias then applies).
    Values are clamped to each resource's minimum and to :data:`MAX_VALUE`; ``nm_enabled`` is
    normalised to 0/1. ``nm_net_max_rate`` defaults to ``node_cap_kbps`` and never exceeds it
    (a cap that is None or not positive means "no cap"). PLC's ``cpu_cores`` (``"N"`` or
    ``"Nb"``, ``core.cores``) sets ``nm_cpu_cores`` and ``nm_cpu_cores_besteffort`` (0/1) like an
    alias; an unparsable one is ignored (``core.cores.cpu_cores_problems`` says why).

    Called for every sliver at every sync (10,000 slivers), so it does one dict lookup per
    attribute and parses only resource tags.
    """
    cap = node_cap_kbps if node_cap_kbps is not None and node_cap_kbps > 0 else None
    rspec = dict(_DEFAULTS)
    if cap is not None:
        rspec["nm_net_max_rate"] = cap
    aliased: dict[str, int] | None = None
    direct: dict[str, int] | None = None
    for tag, value in attributes:
        if tag in _DEFAULTS:
            number = parse_value(value)
            if number is not None:
                if direct is None:
                    direct = {}
                direct[tag] = number
        elif tag == "cpu_cores":  # PLC's "N" or "Nb" (core.cores); unparsable: ignored
            request = parse_cpu_cores(value)
            if isinstance(request, CoreRequest):
                if aliased is None:
                    aliased = {}
                aliased["nm_cpu_cores"] = request.cores
                aliased["nm_cpu_cores_besteffort"] = int(request.besteffort)
        else:
            alias = PLC_ALIASES.get(tag)
            if alias is not None:
                number = parse_value(value)
                if number is not None:
                    if aliased is None:
                        aliased = {}
                    aliased[alias[0]] = number * alias[1]
    if aliased is None and direct is None:
        return rspec
    if aliased is not None:
        rspec.update(aliased)
    if direct is not None:
        rspec.update(direct)
    for name, minimum in _CLAMPED:
        number = rspec[name]
        if number < minimum:
            rspec[name] = minimum
        elif number > MAX_VALUE:
            rspec[name] = MAX_VALUE
    if rspec["nm_enabled"] > 1:
        rspec["nm_enabled"] = 1
    if rspec["nm_cpu_cores_besteffort"] > 1:
        rspec["nm_cpu_cores_besteffort"] = 1
    if cap is not None and rspec["nm_net_max_rate"] > cap:
        rspec["nm_net_max_rate"] = cap
    return rspec


def effective_rspecs(
    rspecs: Mapping[str, Mapping[str, int]], loans: Mapping[str, Sequence[Loan]]
) -> dict[str, dict[str, int]]:
    """Every sliver's RSpec after loans: what ``GetEffectiveRSpec`` returns and enforcers apply.

    ``rspecs`` maps sliver name -> own RSpec; ``loans`` maps lender name -> its loans. Lenders are
    walked in name order and each lender's loans in list order. A loan takes effect only when its
    recipient is a key of ``rspecs`` (and is not the lender itself), its resource is loanable and
    present in the lender's RSpec, its amount is a non-negative int, and the lender's residual
    (own value minus its loans already in effect; loans it received do not count) stays at or
    above the resource's minimum. A loan in effect moves ``amount`` from lender to recipient, so
    each resource's total over all slivers is unchanged. Loans of a lender absent from ``rspecs``
    do nothing. Loans not in effect are simply skipped (the caller keeps them stored).
    """
    effective: dict[str, dict[str, int]] = {name: dict(own) for name, own in rspecs.items()}
    for lender in sorted(loans):
        own = rspecs.get(lender)
        lender_loans = loans[lender]
        if own is None or not lender_loans:
            continue
        lent: dict[str, int] = {}
        for loan in lender_loans:
            resource, amount, recipient = loan.resource, loan.amount, loan.recipient
            if (
                resource not in LOANABLE
                or recipient == lender
                or recipient not in effective
                or resource not in own
                or type(amount) is not int
                or amount < 0
            ):
                continue
            already = lent.get(resource, 0)
            if own[resource] - already - amount < RESOURCES[resource].minimum:
                continue
            lent[resource] = already + amount
            effective[lender][resource] -= amount
            target = effective[recipient]
            target[resource] = target.get(resource, 0) + amount
    return effective


def validate_loans(raw: object) -> tuple[Loan, ...]:
    """Check a caller's loan list (``SetLoans``) and return it as :class:`Loan` values.

    Accepts a list or tuple of 3-element lists/tuples ``(recipient, resource, amount)``: a valid
    sliver name, a loanable resource name, and a non-negative ``int`` (a bool is not an amount).
    Anything else raises :class:`InvalidLoans` naming the offending element and why, and nothing
    of the list is accepted. Whether the recipient exists is not checked here: a loan to a sliver
    that does not exist (yet) is kept but has no effect.
    """
    if not isinstance(raw, (list, tuple)):
        raise InvalidLoans(
            f"loans must be an array of [recipient, resource, amount], not {type(raw).__name__}"
        )
    result: list[Loan] = []
    for index, item in enumerate(raw):
        where = f"loan {index}"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise InvalidLoans(f"{where}: must be a 3-element array [recipient, resource, amount]")
        recipient, resource, amount = item
        if not isinstance(recipient, str) or not is_valid_name(recipient):
            raise InvalidLoans(f"{where}: recipient is not a valid sliver name")
        if not isinstance(resource, str) or resource not in LOANABLE:
            raise InvalidLoans(f"{where}: resource must be one of {', '.join(sorted(LOANABLE))}")
        if type(amount) is not int:
            raise InvalidLoans(f"{where}: amount must be an integer, not {type(amount).__name__}")
        if amount < 0:
            raise InvalidLoans(f"{where}: amount must not be negative")
        result.append(Loan(recipient, resource, amount))
    return tuple(result)
