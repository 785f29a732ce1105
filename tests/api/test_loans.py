"""Loans through the API (resources.md): SetLoans validation, persistence, the effective RSpec,
and the invariants of the loan arithmetic as hypothesis properties driven through dispatch.

Real parts throughout: a temporary Store, the HollowBackend, SliverOperations and a WorkerPool.
"""

from __future__ import annotations

import tempfile
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemanager.api.faults import to_fault
from nodemanager.api.identity import TRANSPORT_UNIX, PeerIdentity
from nodemanager.api.methods import NodeManagerApi, caller_resolver
from nodemanager.backends.hollow import HollowBackend
from nodemanager.core.errors import NodeManagerError
from nodemanager.core.records import DELEGATED, PLC_INSTANTIATED, Sliver
from nodemanager.core.rspec import LOANABLE, RESOURCES
from nodemanager.operations import SliverOperations
from nodemanager.store import Store
from nodemanager.testing.clock import ManualClock
from nodemanager.workers import WorkerPool

A, B, C, D = "site_a", "site_b", "site_c", "site_d"
ROOT = PeerIdentity(TRANSPORT_UNIX, 0)


def record(name: str, attributes: dict[str, int] | None = None, instantiation: str = PLC_INSTANTIATED,
           controller: str = "") -> Sliver:
    attrs = tuple((tag, str(value)) for tag, value in (attributes or {}).items())
    return Sliver(name=name, slice_id=1, instantiation=instantiation, expires=2**31 - 1, timestamp=1,
                  attributes=attrs, controller=controller)


RECORDS = (
    record(A, {"nm_cpu_share": 10, "nm_net_share": 4, "nm_net_min_rate": 1000,
               "nm_cpu_guaranteed_share": 100}),
    record(B),
    record(C, {"nm_cpu_share": 2}),
    record(D, instantiation=DELEGATED),
)


@dataclass
class Node:
    store: Store
    pool: WorkerPool
    ops: SliverOperations
    api: NodeManagerApi
    hook_calls: list[int] = field(default_factory=list)

    def call(self, method: str, *params: Any) -> Any:
        result = self.api.dispatch(method, params, ROOT)
        xmlrpc.client.dumps((result,), methodresponse=True)
        return result

    def fault(self, method: str, *params: Any) -> xmlrpc.client.Fault:
        with pytest.raises(NodeManagerError) as info:
            self.api.dispatch(method, params, ROOT)
        return to_fault(info.value, method=method)

    def effective(self, name: str) -> dict[str, int]:
        return self.call("GetEffectiveRSpec", name)


def make_node(path: Path, pool: WorkerPool, records: tuple[Sliver, ...] = RECORDS) -> Node:
    store = Store(path)
    ops = SliverOperations(store, HollowBackend(), ManualClock())
    calls: list[int] = []
    api = NodeManagerApi(store=store, pool=pool, operations=ops,
                         resolve_caller=caller_resolver(store, lambda uid: None),
                         on_loans_changed=lambda: calls.append(1), operation_timeout=10.0)
    if records:
        store.apply_records(records, [])
    return Node(store, pool, ops, api, calls)


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    workers = WorkerPool(2, name="loans-test")
    yield workers
    workers.shutdown(timeout=10)


@pytest.fixture
def node(tmp_path: Path, pool: WorkerPool) -> Iterator[Node]:
    made = make_node(tmp_path / "nm.db", pool)
    try:
        yield made
    finally:
        made.store.close()


# --- validation ----------------------------------------------------------------------------------
INVALID = {
    "not a list": "site_b nm_cpu_share 1",
    "a struct": {"site_b": 1},
    "an int": 7,
    "item not a list": ["abc"],
    "two elements": [[B, "nm_cpu_share"]],
    "four elements": [[B, "nm_cpu_share", 1, 2]],
    "non-str recipient": [[5, "nm_cpu_share", 1]],
    "invalid recipient name": [["Site B", "nm_cpu_share", 1]],
    "unknown resource": [[B, "nm_gpu", 1]],
    "non-loanable nm_memory_max": [[B, "nm_memory_max", 1]],
    "non-loanable nm_enabled": [[B, "nm_enabled", 1]],
    "non-loanable nm_disk_quota": [[B, "nm_disk_quota", 1]],
    "PLC alias, not the nm_ name": [[B, "cpu_share", 1]],
    "negative": [[B, "nm_cpu_share", -1]],
    "bool": [[B, "nm_cpu_share", True]],
    "float": [[B, "nm_cpu_share", 1.0]],
    "string amount": [[B, "nm_cpu_share", "1"]],
    "beyond 32 bits": [[B, "nm_cpu_share", 2**31]],
    "huge int": [[B, "nm_cpu_share", 2**70]],
    "one bad among good": [[B, "nm_cpu_share", 1], [C, "nm_memory_max", 1]],
}


@pytest.mark.parametrize("loans", list(INVALID.values()), ids=list(INVALID))
def test_invalid_loans_are_rejected_and_nothing_changes(node: Node, loans: Any) -> None:
    before = [[C, "nm_net_share", 1]]
    assert node.call("SetLoans", A, before) == 1
    effective = {name: node.effective(name) for name in (A, B, C)}
    fault = node.fault("SetLoans", A, loans)
    assert fault.faultCode == 102
    assert node.call("GetLoans", A) == before
    assert {name: node.effective(name) for name in (A, B, C)} == effective
    assert node.hook_calls == [1]


def test_largest_32_bit_amount_is_accepted(node: Node) -> None:
    assert node.call("SetLoans", A, [[B, "nm_cpu_share", 2**31 - 1]]) == 1
    assert node.call("GetLoans", A) == [[B, "nm_cpu_share", 2**31 - 1]]
    assert node.effective(B)["nm_cpu_share"] == 1  # far below A's minimum: no effect


def test_tuples_and_empty_lists(node: Node) -> None:
    assert node.call("SetLoans", A, ((B, "nm_cpu_share", 1),)) == 1
    assert node.call("GetLoans", A) == [[B, "nm_cpu_share", 1]]
    assert node.call("SetLoans", A, []) == 1
    assert node.call("GetLoans", A) == []
    assert node.hook_calls == [1, 1]


def test_set_loans_for_an_unknown_lender(node: Node) -> None:
    assert node.fault("SetLoans", "site_ghost", []).faultCode == 102
    assert node.store.loans() == {}


# --- persistence ---------------------------------------------------------------------------------
def test_loans_survive_a_store_reopen(tmp_path: Path, pool: WorkerPool) -> None:
    path = tmp_path / "nm.db"
    first = make_node(path, pool)
    loans = [[B, "nm_cpu_share", 3], [C, "nm_net_share", 2], ["site_later", "nm_net_min_rate", 5]]
    first.call("SetLoans", A, loans)
    effective = {name: first.effective(name) for name in (A, B, C)}
    first.store.close()
    second = make_node(path, pool, records=())
    try:
        assert second.call("GetLoans", A) == loans
        assert {name: second.effective(name) for name in (A, B, C)} == effective
    finally:
        second.store.close()


# --- the effective RSpec -------------------------------------------------------------------------
def test_effective_rspec_moves_the_amount(node: Node) -> None:
    own_a, own_b = node.call("GetRSpec", A), node.call("GetRSpec", B)
    node.call("SetLoans", A, [[B, "nm_cpu_share", 3], [B, "nm_net_min_rate", 400]])
    eff_a, eff_b = node.effective(A), node.effective(B)
    assert (eff_a["nm_cpu_share"], eff_b["nm_cpu_share"]) == (7, 4)
    assert (eff_a["nm_net_min_rate"], eff_b["nm_net_min_rate"]) == (600, 400)
    assert {k: v for k, v in eff_a.items() if k not in ("nm_cpu_share", "nm_net_min_rate")} == {
        k: v for k, v in own_a.items() if k not in ("nm_cpu_share", "nm_net_min_rate")}
    assert node.call("GetRSpec", A) == own_a and node.call("GetRSpec", B) == own_b  # own unchanged


def test_loans_below_the_minimum_have_no_effect_but_are_kept(node: Node) -> None:
    loans = [[B, "nm_cpu_share", 10], [C, "nm_net_share", 4], [B, "nm_net_share", 3]]
    node.call("SetLoans", A, loans)
    assert node.call("GetLoans", A) == loans
    assert node.effective(A)["nm_cpu_share"] == 10   # 10 - 10 < minimum 1
    assert node.effective(A)["nm_net_share"] == 1     # 4 - 3 = 1 is allowed; lending 4 was not
    assert node.effective(C)["nm_net_share"] == 1
    assert node.effective(B)["nm_net_share"] == 4


def test_loans_apply_in_list_order(node: Node) -> None:
    node.call("SetLoans", A, [[B, "nm_cpu_share", 5], [C, "nm_cpu_share", 5]])
    assert [node.effective(n)["nm_cpu_share"] for n in (A, B, C)] == [5, 6, 2]
    node.call("SetLoans", A, [[C, "nm_cpu_share", 5], [B, "nm_cpu_share", 5]])
    assert [node.effective(n)["nm_cpu_share"] for n in (A, B, C)] == [5, 1, 7]


def test_received_loans_cannot_be_lent_on(node: Node) -> None:
    node.call("SetLoans", A, [[B, "nm_cpu_share", 5]])
    node.call("SetLoans", B, [[C, "nm_cpu_share", 5]])  # B owns 1: residual would be -4
    assert [node.effective(n)["nm_cpu_share"] for n in (A, B, C)] == [5, 6, 2]


def test_loan_to_a_missing_recipient_takes_effect_when_it_appears(node: Node) -> None:
    node.call("SetLoans", A, [["site_new", "nm_cpu_share", 4]])
    assert node.effective(A)["nm_cpu_share"] == 10
    node.store.apply_records([record("site_new")], [])
    assert node.effective(A)["nm_cpu_share"] == 6
    assert node.effective("site_new")["nm_cpu_share"] == 5


def test_effect_ends_when_the_recipient_is_destroyed(node: Node) -> None:
    node.call("Create", D)
    node.call("SetLoans", A, [[D, "nm_cpu_share", 4], [B, "nm_cpu_share", 1]])
    assert node.effective(D)["nm_cpu_share"] == 5
    assert node.call("Destroy", D) == 1
    assert node.effective(A)["nm_cpu_share"] == 9
    assert node.call("GetLoans", A) == [[D, "nm_cpu_share", 4], [B, "nm_cpu_share", 1]]
    assert node.hook_calls == [1, 1]  # SetLoans, then Destroy of a recipient


def test_effect_ends_when_the_lender_is_destroyed(node: Node) -> None:
    node.call("SetLoans", C, [[B, "nm_cpu_share", 1]])
    assert node.effective(B)["nm_cpu_share"] == 2
    node.ops.destroy(C)  # as the sync does when the authority drops it
    assert node.effective(B)["nm_cpu_share"] == 1


def test_get_effective_rspec_stays_within_32_bits(node: Node) -> None:
    big = {"nm_net_max_rate": 2**31 - 1}
    node.store.apply_records([record("site_x", big), record("site_y", big)], [])
    node.call("SetLoans", "site_x", [["site_y", "nm_net_max_rate", 2**31 - 100]])
    assert node.effective("site_y")["nm_net_max_rate"] == 2**31 - 1


# --- properties of the loan arithmetic (resources.md), through the API ----------------------------
NAMES = ("site_p", "site_q", "site_r", "site_s")
MISSING = ("site_gone", "site_never")

own_rspecs = st.fixed_dictionaries(
    {}, optional={resource: st.integers(0, 60) for resource in sorted(LOANABLE)}
)
loan = st.tuples(st.sampled_from(NAMES + MISSING), st.sampled_from(sorted(LOANABLE)), st.integers(0, 40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    present=st.lists(st.sampled_from(NAMES), min_size=1, unique=True),
    rspecs=st.lists(own_rspecs, min_size=len(NAMES), max_size=len(NAMES)),
    loans=st.dictionaries(st.sampled_from(NAMES), st.lists(loan, max_size=6)),
    lender_goes=st.booleans(),
)
def test_loan_invariants(
    pool: WorkerPool, present: list[str], rspecs: list[dict[str, int]],
    loans: dict[str, list[tuple[str, str, int]]], lender_goes: bool,
) -> None:
    records = tuple(record(name, rspec) for name, rspec in zip(NAMES, rspecs) if name in present)
    with tempfile.TemporaryDirectory() as tmp:
        node = make_node(Path(tmp) / "nm.db", pool, records)
        try:
            check_invariants(node, present, loans, lender_goes)
        finally:
            node.store.close()


def check_invariants(node: Node, present: list[str], loans: dict[str, list[tuple[str, str, int]]],
                     lender_goes: bool) -> None:
    own = {name: node.call("GetRSpec", name) for name in present}
    for lender, given_loans in loans.items():
        if lender in present:
            assert node.call("SetLoans", lender, [list(l) for l in given_loans]) == 1
            assert node.call("GetLoans", lender) == [list(l) for l in given_loans]
    effective = {name: node.effective(name) for name in present}
    received = {r for lender in present for r, _, _ in loans.get(lender, ()) if r != lender}
    for resource, spec in RESOURCES.items():
        # the sum of each resource over all slivers is conserved
        assert sum(e[resource] for e in effective.values()) == sum(o[resource] for o in own.values())
        for name, values in effective.items():
            assert values[resource] >= 0  # never negative
            assert values[resource] >= spec.minimum  # nobody below its minimum
            if resource not in LOANABLE:
                assert values[resource] == own[name][resource]
            if name not in received:
                assert values[resource] <= own[name][resource]  # a pure lender only gives
    # loans to missing slivers have no effect: dropping them changes nothing
    for lender, given_loans in loans.items():
        if lender in present:
            node.call("SetLoans", lender, [list(l) for l in given_loans if l[0] in present])
    assert {name: node.effective(name) for name in present} == effective
    # loans from a lender whose record went away have no effect either
    if lender_goes and len(present) > 1:
        gone = present[0]
        node.store.apply_records([], [gone])
        rest = present[1:]
        with_loans = {name: node.effective(name) for name in rest}
        node.store.set_loans(gone, [])
        assert {name: node.effective(name) for name in rest} == with_loans
        assert sum(with_loans[n]["nm_cpu_share"] for n in rest) == sum(own[n]["nm_cpu_share"] for n in rest)
