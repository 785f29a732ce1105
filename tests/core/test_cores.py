"""Reserved cores: parsing ``cpu_cores``, CPU lists, and the allocator's promises (exclusive
reserved cores, a shared pool never empty, deterministic, stable across passes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.cores import (
    CoreRequest,
    allocate_cores,
    cpu_cores_problems,
    exclusive_cores,
    format_cpu_list,
    parse_cpu_cores,
    parse_cpu_list,
)
from nodemanager.core.rspec import rspec_from_attributes

# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("1", CoreRequest(1)), ("2b", CoreRequest(2, True)), (" 3 B ", CoreRequest(3, True)),
    ("0", CoreRequest(0)), ("0b", CoreRequest(0, True)),
])
def test_cpu_cores_values(text: str, expected: CoreRequest) -> None:
    assert parse_cpu_cores(text) == expected


@pytest.mark.parametrize("text", ["", "b", "-1", "1.5", "2bb", "two", "1 b 2", "١", "1_0", "9999999"])
def test_bad_cpu_cores_values_give_a_reason(text: str) -> None:
    reason = parse_cpu_cores(text)
    assert isinstance(reason, str) and "cpu_cores" in reason


def test_rspec_carries_cpu_cores_and_ignores_a_bad_one() -> None:
    assert rspec_from_attributes([("cpu_cores", "2b")])["nm_cpu_cores"] == 2
    assert rspec_from_attributes([("cpu_cores", "2b")])["nm_cpu_cores_besteffort"] == 1
    assert rspec_from_attributes([("cpu_cores", "1")])["nm_cpu_cores_besteffort"] == 0
    bad = rspec_from_attributes([("cpu_cores", "lots")])
    assert (bad["nm_cpu_cores"], bad["nm_cpu_cores_besteffort"]) == (0, 0)
    assert cpu_cores_problems([("cpu_cores", "lots"), ("cpu_cores", "1")]) == (
        "cpu_cores 'lots' is not N or Nb (a whole number of cores, b: also the shared pool)",)
    # the nm_ names win over the PLC tag, as for every alias; besteffort is a 0/1 flag
    assert rspec_from_attributes([("nm_cpu_cores", "3"), ("cpu_cores", "1")])["nm_cpu_cores"] == 3
    assert rspec_from_attributes([("nm_cpu_cores_besteffort", "7")])["nm_cpu_cores_besteffort"] == 1
    assert rspec_from_attributes([("nm_cpu_cores", "-2")])["nm_cpu_cores"] == 0


@pytest.mark.parametrize("text, cpus", [
    ("0-3", (0, 1, 2, 3)), ("0,2-3,7\n", (0, 2, 3, 7)), ("", ()), ("5", (5,)), ("1-1", (1,)),
])
def test_cpu_lists(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "1;2"])
def test_bad_cpu_lists(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


@given(st.sets(st.integers(0, 300)))
def test_cpu_list_round_trip(cpus: set[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == tuple(sorted(cpus))


# --- allocation: examples -----------------------------------------------------------------------


def test_one_core_on_a_two_core_node() -> None:
    a = allocate_cores([0, 1], {"a": CoreRequest(1)}, slivers=["b", "c"])
    assert a.cpus == {"a": (1,), "b": (0,), "c": (0,)}  # the highest core, like the original
    assert a.reserved == {"a": (1,)} and a.shared == (0,) and a.notes == ()


def test_besteffort_adds_the_shared_pool() -> None:
    a = allocate_cores(range(4), {"a": CoreRequest(1, True), "b": CoreRequest(2)}, slivers=["c"])
    assert a.cpus == {"a": (0, 3), "b": (1, 2), "c": (0,)}


def test_a_request_that_does_not_fit_is_scaled_with_a_reason() -> None:
    a = allocate_cores([0, 1], {"a": CoreRequest(1), "b": CoreRequest(2)})
    assert a.reserved == {"a": (1,)} and a.cpus["b"] == (0,)
    assert a.notes == ("sliver b: cpu_cores 2 scaled to 0: the node has 2 CPUs, keeps at least 1 for the "
                       "shared pool and 1 is reserved by other slivers; it runs on the shared pool",)


def test_one_cpu_reserves_nothing() -> None:
    a = allocate_cores([0], {"a": CoreRequest(1)}, slivers=["b"])
    assert a.cpus == {"a": (0,), "b": (0,)} and a.reserved == {} and len(a.notes) == 1


def test_existing_grants_are_kept_when_others_change() -> None:
    first = allocate_cores(range(4), {"b": CoreRequest(2)})
    assert first.reserved == {"b": (2, 3)}
    # a sliver sorting before b arrives: b keeps its cores, a gets the next ones
    second = allocate_cores(range(4), {"a": CoreRequest(2), "b": CoreRequest(2)}, first.reserved)
    assert second.reserved == {"a": (1,), "b": (2, 3)} and len(second.notes) == 1
    # b leaves: a keeps its core and grows into the freed ones
    third = allocate_cores(range(4), {"a": CoreRequest(2)}, second.reserved)
    assert third.reserved == {"a": (1, 3)}


def test_an_offline_cpu_is_lost_not_stolen() -> None:
    first = allocate_cores(range(4), {"a": CoreRequest(1), "b": CoreRequest(1)})
    assert first.reserved == {"a": (3,), "b": (2,)}
    second = allocate_cores([0, 1, 2], {"a": CoreRequest(1), "b": CoreRequest(1)}, first.reserved)
    assert second.reserved == {"a": (1,), "b": (2,)}


def test_exclusive_cores_read_back_the_reservations() -> None:
    a = allocate_cores(range(6), {"a": CoreRequest(2), "b": CoreRequest(1, True)}, slivers=["c"])
    assert exclusive_cores(a.cpus) == a.reserved
    assert exclusive_cores({"a": (0, 1)}) == {}


# --- allocation: properties ---------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f"])
REQUESTS = st.dictionaries(NAMES, st.builds(CoreRequest, st.integers(0, 9), st.booleans()), max_size=6)
CPUS = st.sets(st.integers(0, 15), min_size=1, max_size=12)
HELD = st.dictionaries(NAMES, st.sets(st.integers(0, 20), max_size=6), max_size=6)


@settings(max_examples=400, deadline=None)
@given(CPUS, REQUESTS, HELD, st.sets(NAMES))
def test_allocation_promises(cpus: set[int], requests: dict[str, CoreRequest], held: dict[str, set[int]],
                             others: set[str]) -> None:
    a = allocate_cores(cpus, requests, held, others)
    assert set(a.cpus) == set(requests) | others
    # the shared pool is never empty and holds no reserved core
    assert a.shared and set(a.shared) <= cpus
    reserved = [c for cores in a.reserved.values() for c in cores]
    assert len(reserved) == len(set(reserved)) and not set(reserved) & set(a.shared)
    assert len(reserved) <= len(cpus) - 1
    for name, cpuset in a.cpus.items():
        assert cpuset and set(cpuset) <= cpus
        own = set(a.reserved.get(name, ()))
        # a reserved core is in its holder's cpuset and nobody else's
        assert all(c in cpuset for c in own)
        assert not any(set(a.reserved.get(other, ())) & set(cpuset) for other in a.cpus if other != name)
        request = requests.get(name)
        assert len(own) <= (request.cores if request else 0)
        if own and not request.besteffort:  # type: ignore[union-attr]
            assert set(cpuset) == own
        else:
            assert set(a.shared) <= set(cpuset)
    # scaled only when the node is out of cores, and then with a note
    scaled = [n for n, r in requests.items() if len(a.reserved.get(n, ())) < r.cores]
    assert len(a.notes) == len(scaled)
    if scaled:
        assert len(reserved) == len(cpus) - 1
    # deterministic: the same inputs in any order give the same answer
    again = allocate_cores(sorted(cpus, reverse=True), dict(reversed(list(requests.items()))),
                           {n: sorted(c) for n, c in reversed(list(held.items()))}, sorted(others))
    assert again == a


@settings(max_examples=300, deadline=None)
@given(CPUS, REQUESTS, REQUESTS)
def test_allocation_is_stable(cpus: set[int], before: dict[str, CoreRequest], change: dict[str, CoreRequest]) -> None:
    """Re-run with the previous grants: a sliver whose request did not shrink keeps every core it
    had, whatever the others asked meanwhile; an unchanged input changes nothing."""
    first = allocate_cores(cpus, before)
    assert allocate_cores(cpus, before, first.reserved) == first
    after = {**before, **change}
    second = allocate_cores(cpus, after, first.reserved)
    for name, cores in first.reserved.items():
        if name in after and after[name].cores >= len(cores):
            assert set(cores) <= set(second.reserved.get(name, ()))
