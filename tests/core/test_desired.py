"""Merging an authority document into the records: timestamp rule, tickets, safety valve."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemanager.core.desired import MergeResult, merge_document
from nodemanager.core.records import (
    DELEGATED,
    PLC_INSTANTIATED,
    SOURCE_AUTHORITY,
    SOURCE_TICKET,
    AuthorityDocument,
    Rejection,
    Sliver,
    ValveState,
)

NO_VALVE = ValveState()


def sliver(
    name: str, timestamp: int = 100, *, source: str = SOURCE_AUTHORITY, **kw: object
) -> Sliver:
    fields: dict[str, object] = {
        "slice_id": 1,
        "instantiation": PLC_INSTANTIATED,
        "expires": 10**9,
        "keys": ("ssh-ed25519 AAAA x@y",),
    }
    fields.update(kw)
    return Sliver(name=name, timestamp=timestamp, source=source, **fields)  # type: ignore[arg-type]


def doc(
    timestamp: int, *slivers: Sliver, rejected: tuple[Rejection, ...] = ()
) -> AuthorityDocument:
    return AuthorityDocument(timestamp=timestamp, node_id=1, slivers=slivers, rejected=rejected)


def merge(
    records: dict[str, Sliver],
    document: AuthorityDocument,
    valve: ValveState = NO_VALVE,
    **kw: object,
) -> MergeResult:
    options: dict[str, object] = {"max_delete_fraction": 0.5, "confirm_after": 2}
    options.update(kw)
    return merge_document(records, document, valve, **options)  # type: ignore[arg-type]


def by_name(*slivers: Sliver) -> dict[str, Sliver]:
    return {s.name: s for s in slivers}


def test_new_slivers_are_upserted_with_the_document_timestamp() -> None:
    result = merge({}, doc(200, sliver("site_a", 200), sliver("site_b", 7)))
    assert [s.name for s in result.upserts] == ["site_a", "site_b"]
    assert all(s.timestamp == 200 and s.source == SOURCE_AUTHORITY for s in result.upserts)
    assert set(result.records) == {"site_a", "site_b"}
    assert result.deletes == () and result.held == () and not result.valve_tripped


def test_unchanged_sliver_keeps_the_existing_record_object_and_writes_nothing() -> None:
    existing = sliver("site_a", 100)
    result = merge({"site_a": existing}, doc(200, sliver("site_a", 200)))
    assert result.upserts == ()
    assert result.records["site_a"] is existing


def test_changed_sliver_is_upserted() -> None:
    existing = sliver("site_a", 100)
    changed = sliver("site_a", 200, keys=("ssh-ed25519 BBBB new@key",))
    result = merge({"site_a": existing}, doc(200, changed))
    assert result.upserts == (changed,)
    assert result.records["site_a"] == changed


def test_newer_record_is_never_overwritten_by_an_older_document() -> None:
    newer = sliver("site_a", 300)
    result = merge({"site_a": newer}, doc(200, sliver("site_a", 200, slice_id=99)))
    assert result.records["site_a"] is newer
    assert result.upserts == ()
    assert result.stale_kept == ("site_a",)


def test_absent_authority_record_is_removed() -> None:
    records = by_name(sliver("site_a"), sliver("site_b"), sliver("site_c"))
    result = merge(records, doc(200, sliver("site_a", 200), sliver("site_b", 200)))
    assert result.deletes == ("site_c",)
    assert "site_c" not in result.records
    assert result.valve == ValveState()


def test_absent_newer_record_is_kept() -> None:
    records = by_name(sliver("site_a"), sliver("site_b"), sliver("site_c", 500))
    result = merge(records, doc(200, sliver("site_a", 200), sliver("site_b", 200)))
    assert result.deletes == ()
    assert "site_c" in result.records


def test_ticket_records_are_never_removed_by_a_document() -> None:
    ticket = sliver("site_t", 50, source=SOURCE_TICKET, instantiation=DELEGATED)
    records = by_name(sliver("site_a"), ticket)
    result = merge(records, doc(200, sliver("site_a", 200)))
    assert result.deletes == ()
    assert result.records["site_t"] is ticket


def test_protected_name_is_not_removed() -> None:
    records = by_name(sliver("site_a"), sliver("site_b"), sliver("site_c"))
    bad = Rejection(label="#2 site_c", reason="bad key")
    result = merge(
        records,
        doc(200, sliver("site_a", 200), sliver("site_b", 200), rejected=(bad,)),
        protected=frozenset({"site_c"}),
    )
    assert result.deletes == () and result.held == ()
    assert "site_c" in result.records


def test_empty_document_removing_the_only_sliver_is_held() -> None:
    result = merge(by_name(sliver("site_a")), doc(200))
    assert result.valve_tripped
    assert result.held == ("site_a",) and result.deletes == ()
    assert "site_a" in result.records
    assert result.valve == ValveState(held=frozenset({"site_a"}), seen=1)


def test_mass_removal_held_until_confirmed_by_consecutive_documents() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abcd"))
    truncated = doc(200, sliver("site_a", 200))

    first = merge(records, truncated)
    assert first.valve_tripped and first.held == ("site_b", "site_c", "site_d")
    assert first.records == records

    second = merge(first.records, replace(truncated, timestamp=300), first.valve)
    assert not second.valve_tripped
    assert second.deletes == ("site_b", "site_c", "site_d")
    assert set(second.records) == {"site_a"}
    assert second.valve == ValveState()


def test_a_different_removal_set_restarts_the_count() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abcd"))
    first = merge(records, doc(200, sliver("site_a", 200)))
    second = merge(first.records, doc(300, sliver("site_b", 300)), first.valve)
    assert second.valve_tripped
    assert second.valve == ValveState(held=frozenset({"site_a", "site_c", "site_d"}), seen=1)
    assert set(second.records) == {"site_a", "site_b", "site_c", "site_d"}


def test_confirm_after_three() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abc"))
    valve = ValveState()
    for step, timestamp in enumerate((200, 300, 400), start=1):
        result = merge(records, doc(timestamp), valve, confirm_after=3)
        valve = result.valve
        if step < 3:
            assert result.valve_tripped and valve.seen == step
            assert result.records == records
    assert result.deletes == ("site_a", "site_b", "site_c") and result.records == {}


def test_a_good_document_resets_the_valve() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abcd"))
    first = merge(records, doc(200))
    assert first.valve_tripped
    good = merge(first.records, doc(300, *(sliver(f"site_{c}", 300) for c in "abcd")), first.valve)
    assert not good.valve_tripped and good.valve == ValveState() and good.deletes == ()


def test_allow_mass_delete_applies_at_once() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abcd"))
    result = merge(records, doc(200), allow_mass_delete=True)
    assert result.deletes == ("site_a", "site_b", "site_c", "site_d")
    assert result.records == {} and not result.valve_tripped and result.valve == ValveState()


def test_threshold_is_strictly_greater_than_fraction() -> None:
    records = by_name(*(sliver(f"site_{c}") for c in "abcd"))
    result = merge(records, doc(200, sliver("site_a", 200), sliver("site_b", 200)))
    assert result.deletes == ("site_c", "site_d") and not result.valve_tripped


def test_ticket_records_do_not_count_towards_the_valve_base() -> None:
    tickets = [sliver(f"site_t{i}", source=SOURCE_TICKET) for i in range(10)]
    records = by_name(sliver("site_a"), sliver("site_b"), *tickets)
    result = merge(records, doc(200))  # 2 of 2 authority records: held
    assert result.valve_tripped and result.held == ("site_a", "site_b")


# --- properties -----------------------------------------------------------------------------

NAMES = [f"site_{c}" for c in "abcdef"]

record_strategy = st.builds(
    lambda name, ts, source, sid: sliver(name, ts, source=source, slice_id=sid),
    st.sampled_from(NAMES),
    st.integers(min_value=0, max_value=400),
    st.sampled_from([SOURCE_AUTHORITY, SOURCE_AUTHORITY, SOURCE_TICKET]),
    st.integers(min_value=1, max_value=3),
)
records_strategy = st.lists(record_strategy, max_size=6).map(lambda xs: by_name(*xs))
doc_strategy = st.builds(
    lambda ts, entries: doc(ts, *(sliver(n, ts, slice_id=sid) for n, sid in entries)),
    st.integers(min_value=0, max_value=400),
    st.lists(st.tuples(st.sampled_from(NAMES), st.integers(min_value=1, max_value=3)), max_size=6),
)
valve_strategy = st.builds(
    ValveState,
    st.frozensets(st.sampled_from(NAMES), max_size=3),
    st.integers(min_value=0, max_value=3),
)


@settings(max_examples=300, deadline=None)
@given(records_strategy, doc_strategy, valve_strategy, st.booleans())
def test_newer_records_are_never_replaced_or_removed(records, document, valve, allow) -> None:
    result = merge(records, document, valve, allow_mass_delete=allow)
    for name, record in records.items():
        if record.timestamp > document.timestamp:
            assert result.records.get(name) is record
            assert name not in result.deletes
            assert all(s.name != name for s in result.upserts)


@settings(max_examples=300, deadline=None)
@given(records_strategy, doc_strategy, valve_strategy)
def test_result_is_consistent(records, document, valve) -> None:
    result = merge(records, document, valve)
    expected = dict(records)
    expected.update({s.name: s for s in result.upserts})
    for name in result.deletes:
        del expected[name]
    assert result.records == expected
    assert not set(result.deletes) & set(result.held)
    assert all(records[n].source == SOURCE_AUTHORITY for n in result.deletes)
    assert result.valve_tripped == bool(result.held)


@settings(max_examples=300, deadline=None)
@given(records_strategy, doc_strategy, valve_strategy)
def test_merging_the_same_document_twice_writes_nothing_the_second_time(
    records, document, valve
) -> None:
    first = merge(records, document, valve, allow_mass_delete=True)
    second = merge(first.records, document, first.valve, allow_mass_delete=True)
    assert second.upserts == () and second.deletes == ()
    assert second.records == first.records


@settings(max_examples=300, deadline=None)
@given(
    records_strategy,
    doc_strategy,
    st.integers(min_value=1, max_value=4),
    st.floats(min_value=0.1, max_value=1.0),
)
def test_excess_removals_held_until_confirm_after_consecutive_documents(
    records, document, confirm_after, fraction
) -> None:
    valve = ValveState()
    current = records
    for step in range(1, confirm_after + 1):
        authority = sum(1 for r in current.values() if r.source == SOURCE_AUTHORITY)
        result = merge(
            current, document, valve, confirm_after=confirm_after, max_delete_fraction=fraction
        )
        removals = len(result.deletes) + len(result.held)
        if removals <= fraction * authority:
            assert not result.valve_tripped and result.held == ()
            return
        if step < confirm_after:
            assert result.valve_tripped and result.deletes == ()
            assert all(name in result.records for name in result.held)
        else:
            assert not result.valve_tripped and result.held == () and result.deletes
            assert result.valve == ValveState()
        valve = result.valve
        current = result.records
