"""Reserved cores (PLC's ``cpu_cores`` tag): which CPUs each sliver's cpuset holds. Pure.

A sliver asking for ``N`` cores gets N whole CPUs that are *exclusive* to it: no other managed
sliver's cpuset contains them. ``Nb`` ("best effort", as in the later node manager's core
scheduler) also lets the sliver use the shared pool. Everyone else, slivers without a request
included, runs on the shared pool: the allowed CPUs minus every reserved one. The shared pool is
never empty: at most ``len(cpus) - 1`` cores are reserved in all.

Allocation (:func:`allocate_cores`) is deterministic and stable:

1. *Keep*: slivers in name order keep the cores they held before (``held``), highest first, up
   to their request, while the node can give them (an offlined CPU is lost, not replaced by a
   steal from someone else).
2. *Grant*: slivers in name order then get the highest-numbered free CPUs (as the original
   gave the highest cores) until their request or the node's capacity is met.

A request that does not fit is *scaled*: the sliver gets what is left (possibly nothing: it then
runs on the shared pool like any sliver) and a note says how many cores it asked for, got, and
why. Existing grants win over new requests, so one sliver's change never moves another's cores.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

#: ``cpu_cores`` values: a count, optionally followed by ``b`` (also the shared pool).
_CPU_CORES = re.compile(r"\s*([0-9]{1,6})\s*(b?)\s*", re.ASCII | re.IGNORECASE)
#: One item of a kernel CPU list (``0-3,8,10-11``).
_CPU_RANGE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class CoreRequest:
    """``cores`` whole CPUs for the sliver alone; ``besteffort``: also the shared pool."""

    cores: int
    besteffort: bool = False


@dataclass(frozen=True, slots=True)
class CoreAllocation:
    """What :func:`allocate_cores` decided."""

    #: sliver -> CPUs of its cpuset (sorted), for every sliver of the input.
    cpus: Mapping[str, tuple[int, ...]]
    #: sliver -> CPUs reserved for it alone (sorted; only slivers granted at least one).
    reserved: Mapping[str, tuple[int, ...]]
    #: CPUs no sliver reserved (sorted, never empty when any CPU is allowed).
    shared: tuple[int, ...]
    #: Why a request was scaled, one sentence per sliver (for ``status``).
    notes: tuple[str, ...]


def parse_cpu_cores(value: str) -> CoreRequest | str:
    """The request a ``cpu_cores`` value spells (``"2"``, ``"1b"``; ``"0"`` = none), or the
    reason it is not one."""
    match = _CPU_CORES.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return f"cpu_cores {value!r} is not N or Nb (a whole number of cores, b: also the shared pool)"
    return CoreRequest(int(match.group(1)), bool(match.group(2)))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """The CPUs of a kernel CPU list (``cpuset.cpus``, ``/sys/devices/system/cpu/online``):
    ``"0-2,5"`` -> ``(0, 1, 2, 5)``; blank -> ``()``. Raises ValueError on anything else."""
    cpus: set[int] = set()
    for item in text.strip().split(","):
        if not item.strip():
            continue
        match = _CPU_RANGE.fullmatch(item.strip())
        if match is None:
            raise ValueError(f"not a CPU list item: {item!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise ValueError(f"not a CPU range: {item!r}")
        cpus.update(range(low, high + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The kernel's spelling of a CPU set: ``(0, 1, 2, 5)`` -> ``"0-2,5"``; empty -> ``""``."""
    items: list[str] = []
    ordered = sorted(set(cpus))
    start = previous = None
    for cpu in [*ordered, None]:
        if start is not None and (cpu is None or cpu != previous + 1):  # type: ignore[operator]
            items.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if cpu is not None and start is None:
            start = cpu
        previous = cpu
    return ",".join(items)


def allocate_cores(
    cpus: Collection[int],
    requests: Mapping[str, CoreRequest],
    held: Mapping[str, Collection[int]] | None = None,
    slivers: Collection[str] = (),
) -> CoreAllocation:
    """Each sliver's cpuset (module docstring). ``cpus``: the CPUs the slivers may use (online,
    within the node manager's own cpuset); ``requests``: slivers that asked for cores;
    ``held``: the cores each sliver was reserved before (for stability; anything, even stale or
    overlapping, is accepted: only a free, allowed core is kept); ``slivers``: the other slivers,
    which get the shared pool. Same inputs, same result."""
    allowed = sorted(set(cpus))
    capacity = max(0, len(allowed) - 1)
    wanted = {name: max(0, r.cores) for name, r in requests.items()}
    taken: set[int] = set()
    reserved: dict[str, list[int]] = {name: [] for name in wanted}
    for name in sorted(wanted):  # 1. keep
        for cpu in sorted(set((held or {}).get(name, ())) & set(allowed), reverse=True):
            if len(reserved[name]) >= wanted[name] or len(taken) >= capacity:
                break
            if cpu not in taken:
                reserved[name].append(cpu)
                taken.add(cpu)
    free = [cpu for cpu in reversed(allowed) if cpu not in taken]
    for name in sorted(wanted):  # 2. grant, highest free first
        while len(reserved[name]) < wanted[name] and len(taken) < capacity and free:
            cpu = free.pop(0)
            reserved[name].append(cpu)
            taken.add(cpu)
    shared = tuple(cpu for cpu in allowed if cpu not in taken)
    notes = []
    for name in sorted(wanted):
        got = len(reserved[name])
        if got < wanted[name]:
            others = len(taken) - got
            notes.append(
                f"sliver {name}: cpu_cores {wanted[name]}{'b' if requests[name].besteffort else ''} scaled to "
                f"{got}: the node has {len(allowed)} CPU{'s' if len(allowed) != 1 else ''}, keeps at least 1 "
                f"for the shared pool and {others} {'is' if others == 1 else 'are'} reserved by other slivers"
                + ("" if got else "; it runs on the shared pool"))
    result: dict[str, tuple[int, ...]] = {}
    for name in sorted({*slivers, *wanted}):
        own = sorted(reserved.get(name, ()))
        request = requests.get(name)
        if not own or (request is not None and request.besteffort):
            result[name] = tuple(sorted({*own, *shared}))
        else:
            result[name] = tuple(own)
    return CoreAllocation(
        cpus=result,
        reserved={name: tuple(sorted(cores)) for name, cores in sorted(reserved.items()) if cores},
        shared=shared,
        notes=tuple(notes),
    )


def exclusive_cores(current: Mapping[str, Collection[int]]) -> dict[str, tuple[int, ...]]:
    """For each sliver, the CPUs of its current cpuset that no other sliver's holds: its
    reserved cores as the kernel shows them (the ``held`` of :func:`allocate_cores` after a
    restart). A lone sliver's cores are not told apart from the shared pool: none."""
    if len(current) < 2:
        return {}
    count: dict[int, int] = {}
    for cores in current.values():
        for cpu in set(cores):
            count[cpu] = count.get(cpu, 0) + 1
    return {name: tuple(sorted(c for c in set(cores) if count[c] == 1))
            for name, cores in current.items() if any(count[c] == 1 for c in set(cores))}


def cpu_cores_problems(attributes: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    """Why a sliver's ``cpu_cores`` values were ignored (``rspec_from_attributes`` skips an
    unparsable one, as it does any unparsable resource value)."""
    return tuple(reason for tag, value in attributes if tag == "cpu_cores"
                 and isinstance(reason := parse_cpu_cores(value), str))
