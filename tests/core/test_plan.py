"""The reconcile plan: every rule, the orphan gate, ordering, speed, and convergence."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodemanager.core.plan import REASON_DEFERRED_START, Action, ActionKind, plan_actions
from nodemanager.core.records import (
    DELEGATED,
    NM_CONTROLLER,
    NOT_INSTANTIATED,
    PLC_INSTANTIATED,
    AccountState,
    ObservedAccount,
    Phase,
    Sliver,
)
from nodemanager.core.rspec import rspec_from_attributes

NOW = 1_000_000.0


def sliver(name: str = "site_a", **kw: object) -> Sliver:
    fields: dict[str, object] = {
        "slice_id": 1,
        "instantiation": PLC_INSTANTIATED,
        "expires": int(NOW) + 3600,
        "timestamp": 100,
        "keys": ("ssh-ed25519 AAAA x@y",),
    }
    fields.update(kw)
    return Sliver(name=name, **fields)  # type: ignore[arg-type]


def owned_state(record: Sliver, **kw: object) -> AccountState:
    fields: dict[str, object] = {
        "uid": 5000,
        "owned": True,
        "applied": record.fingerprint(),
        "phase": Phase.RUNNING,
    }
    fields.update(kw)
    return AccountState(name=record.name, **fields)  # type: ignore[arg-type]


def plan(
    records=(), accounts=(), observed=(), *, now: float = NOW, orphans: bool = True, frozen=()
) -> list[Action]:
    return plan_actions(
        {r.name: r for r in records},
        {a.name: a for a in accounts},
        {o.name: o for o in observed},
        now,
        may_destroy_orphans=orphans,
        frozen=frozenset(frozen),
    )


def only(actions: list[Action]) -> Action:
    assert len(actions) == 1, actions
    return actions[0]


# --- rules ----------------------------------------------------------------------------------


def test_new_auto_instantiated_sliver_is_created_and_started() -> None:
    record = sliver()
    action = only(plan([record]))
    assert (action.kind, action.name, action.sliver, action.reason, action.start) == (
        ActionKind.CREATE,
        "site_a",
        record,
        "new sliver",
        True,
    )


def test_nm_controller_is_auto_instantiated() -> None:
    assert only(plan([sliver(instantiation=NM_CONTROLLER)])).kind is ActionKind.CREATE


def test_disabled_sliver_is_created_but_not_started() -> None:
    action = only(plan([sliver(attributes=(("nm_enabled", "0"),))]))
    assert action.kind is ActionKind.CREATE and action.start is False


def test_delegated_sliver_waits_for_create() -> None:
    record = sliver(instantiation=DELEGATED)
    assert plan([record]) == []
    state = AccountState(name="site_a", create_requested=True)
    action = only(plan([record], [state]))
    assert action.kind is ActionKind.CREATE and action.start is False


def test_wanted_sliver_left_destroying_is_recreated() -> None:
    """Regression (issue 11): a daemon killed between marking a destroy and userdel left a
    still-wanted sliver in DESTROYING for ever, unenforced."""
    record = sliver()
    state = owned_state(record, phase=Phase.DESTROYING)
    action = only(plan([record], [state], [ObservedAccount("site_a", 5000)]))
    assert (action.kind, action.reason, action.start) == (
        ActionKind.CREATE, "finishing an interrupted destroy, then creating it again", True)


def test_unwanted_sliver_left_destroying_is_finished_even_before_a_good_document() -> None:
    record = sliver()
    state = owned_state(record, phase=Phase.DESTROYING)
    action = only(plan([], [state], [ObservedAccount("site_a", 5000)], orphans=False))
    assert action.kind is ActionKind.DESTROY
    assert plan([], [owned_state(record)], [ObservedAccount("site_a", 5000)], orphans=False) == []


def test_account_left_absent_after_an_interrupted_create_is_configured() -> None:
    record = sliver()
    state = owned_state(record, uid=None, phase=Phase.ABSENT)
    action = only(plan([record], [state], [ObservedAccount("site_a", 5000)]))
    assert action.kind is ActionKind.CONFIGURE and "transitional" in action.reason


def test_changed_access_signature_is_repaired() -> None:
    record = sliver()
    state = owned_state(record, access="sig-1")
    assert plan([record], [state], [ObservedAccount("site_a", 5000, access="sig-1")]) == []
    action = only(plan([record], [state], [ObservedAccount("site_a", 5000, access="sig-2")]))
    assert action.kind is ActionKind.CONFIGURE and "lock state or keys" in action.reason
    # no signature recorded (a store from before signatures, or a backend without them): no check
    assert plan([record], [owned_state(record)], [ObservedAccount("site_a", 5000, access="x")]) == []


def test_create_is_planned_even_when_a_foreign_account_has_the_name() -> None:
    action = only(plan([sliver()], observed=[ObservedAccount("site_a", 1234)]))
    assert action.kind is ActionKind.CREATE and action.reason == "new sliver"


def test_unchanged_owned_sliver_needs_nothing() -> None:
    record = sliver()
    assert plan([record], [owned_state(record)], [ObservedAccount("site_a", 5000)]) == []


def test_expired_record_is_destroyed_even_without_account() -> None:
    record = sliver(expires=int(NOW))
    action = only(plan([record]))
    assert (action.kind, action.reason, action.sliver) == (ActionKind.DESTROY, "expired", record)
    action = only(plan([record], [owned_state(record)], [ObservedAccount("site_a", 5000)]))
    assert (action.kind, action.reason) == (ActionKind.DESTROY, "expired")


def test_no_longer_instantiated_owned_sliver_is_destroyed() -> None:
    record = sliver(instantiation=NOT_INSTANTIATED)
    action = only(plan([record], [owned_state(record)], [ObservedAccount("site_a", 5000)]))
    assert (action.kind, action.reason) == (ActionKind.DESTROY, "no longer instantiated")
    assert plan([record]) == []  # not owned: nothing to undo


def test_vanished_account_is_recreated_in_its_previous_phase() -> None:
    record = sliver()
    action = only(plan([record], [owned_state(record, phase=Phase.RUNNING)]))
    assert (action.kind, action.reason, action.start) == (
        ActionKind.CREATE,
        "account disappeared (drift)",
        True,
    )
    action = only(plan([record], [owned_state(record, phase=Phase.STOPPED)]))
    assert action.kind is ActionKind.CREATE and action.start is False


def test_uid_change_is_a_conflict() -> None:
    record = sliver()
    action = only(plan([record], [owned_state(record)], [ObservedAccount("site_a", 6000)]))
    assert (action.kind, action.sliver) == (ActionKind.CONFLICT, None)
    assert "uid changed" in action.reason


def test_unknown_uid_is_not_a_conflict() -> None:
    record = sliver()
    assert plan([record], [owned_state(record, uid=None)], [ObservedAccount("site_a", 6000)]) == []


def test_changed_content_is_configured() -> None:
    record = sliver()
    changed = replace(record, keys=("ssh-ed25519 BBBB new@key",))
    action = only(plan([changed], [owned_state(record)], [ObservedAccount("site_a", 5000)]))
    assert (action.kind, action.sliver, action.reason) == (
        ActionKind.CONFIGURE,
        changed,
        "keys or attributes changed",
    )


def test_failed_sliver_is_configured_again() -> None:
    record = sliver()
    state = owned_state(record, phase=Phase.FAILED)
    action = only(plan([record], [state], [ObservedAccount("site_a", 5000)]))
    assert action.kind is ActionKind.CONFIGURE


def test_deferred_start_is_done_once_the_lease_no_longer_freezes_it() -> None:
    """A start asked for while a lease froze the sliver was recorded (STOPPED, ``start_pending``)
    instead of done: the plan starts it when the schedule no longer freezes it (a daemon
    restarted after the lease ended, or the thaw's prompt start lost), not while it does."""
    record = sliver(instantiation=DELEGATED)
    state = owned_state(record, phase=Phase.STOPPED, start_pending=True, create_requested=True)
    seen = [ObservedAccount("site_a", 5000)]
    assert plan([record], [state], seen, frozen={"site_a"}) == []
    action = only(plan([record], [state], seen, frozen={"site_b"}))
    assert (action.kind, action.sliver, action.reason, action.start) == (
        ActionKind.CONFIGURE, record, REASON_DEFERRED_START, True)
    assert REASON_DEFERRED_START == "deferred start"
    # a changed record or access signature is applied by the same configure, which starts it
    changed = replace(record, keys=("ssh-ed25519 BBBB new@key",))
    action = only(plan([changed], [replace(state, access="sig")], [ObservedAccount("site_a", 5000, access="x")]))
    assert (action.reason, action.sliver, action.start) == (REASON_DEFERRED_START, changed, True)
    # no pending start, or not STOPPED (a RUNNING one was started since): nothing to do
    assert plan([record], [replace(state, start_pending=False)], seen) == []
    assert plan([record], [replace(state, phase=Phase.RUNNING)], seen) == []
    # backoff still applies; an unwanted one is destroyed (which drops the pending start)
    assert plan([record], [replace(state, retry_at=NOW + 1)], seen) == []
    assert only(plan([record], [replace(state, create_requested=False)], seen)).kind is ActionKind.DESTROY


def test_deferred_start_rides_on_retries_and_recreations_unless_frozen() -> None:
    record = sliver(instantiation=DELEGATED)
    pending = owned_state(record, phase=Phase.FAILED, start_pending=True, create_requested=True)
    seen = [ObservedAccount("site_a", 5000)]
    for phase in (Phase.FAILED, Phase.ABSENT):
        action = only(plan([record], [replace(pending, phase=phase)], seen))
        assert action.kind is ActionKind.CONFIGURE and action.start is True
        assert only(plan([record], [replace(pending, phase=phase)], seen, frozen={"site_a"})).start is False
    # vanished (drift) while STOPPED with a start pending: recreated and started
    action = only(plan([record], [replace(pending, phase=Phase.STOPPED)]))
    assert (action.kind, action.reason, action.start) == (ActionKind.CREATE, "account disappeared (drift)", True)
    assert only(plan([record], [replace(pending, phase=Phase.STOPPED)], frozen={"site_a"})).start is False
    # only its intent recorded (uid None, no account): created and started
    action = only(plan([record], [replace(pending, uid=None, phase=Phase.ABSENT)]))
    assert (action.kind, action.reason, action.start) == (ActionKind.CREATE, "new sliver", True)
    # a destroy cut short drops it: created afresh as its kind is (a delegated one stopped)
    action = only(plan([record], [replace(pending, phase=Phase.DESTROYING)], seen))
    assert action.kind is ActionKind.CREATE and action.start is False


def test_backoff_skips_the_name_entirely() -> None:
    record = sliver(expires=0)
    state = owned_state(record, retry_at=NOW + 1)
    assert plan([record], [state]) == []
    assert plan([], [state]) == []
    assert only(plan([record], [replace(state, retry_at=NOW)])).kind is ActionKind.DESTROY


def test_orphan_owned_account_destroyed_only_after_gate() -> None:
    orphan = AccountState(name="site_gone", uid=7000, owned=True, phase=Phase.RUNNING)
    assert plan([], [orphan], orphans=False) == []
    action = only(plan([], [orphan], orphans=True))
    assert (action.kind, action.name, action.sliver, action.reason) == (
        ActionKind.DESTROY,
        "site_gone",
        None,
        "removed by authority",
    )


def test_foreign_account_without_record_is_never_touched() -> None:
    not_owned = AccountState(name="site_x", uid=7000, owned=False)
    assert plan([], [not_owned], [ObservedAccount("site_x", 7000)]) == []


def test_order_destroy_conflict_create_configure_by_name() -> None:
    a_new, b_new = sliver("site_b"), sliver("site_a")
    cfg = sliver("site_c")
    conflict = sliver("site_d")
    expired = sliver("site_z", expires=0)
    records = [a_new, cfg, conflict, expired, b_new]
    accounts = [
        owned_state(cfg, applied="stale"),
        owned_state(conflict, uid=1),
        AccountState(name="site_orphan", owned=True),
    ]
    observed = [ObservedAccount("site_c", 5000), ObservedAccount("site_d", 2)]
    got = [(a.kind, a.name) for a in plan(records, accounts, observed)]
    assert got == [
        (ActionKind.DESTROY, "site_orphan"),
        (ActionKind.DESTROY, "site_z"),
        (ActionKind.CONFLICT, "site_d"),
        (ActionKind.CREATE, "site_a"),
        (ActionKind.CREATE, "site_b"),
        (ActionKind.CONFIGURE, "site_c"),
    ]


def test_ten_thousand_unchanged_slivers_plan_nothing() -> None:
    """Scale without a clock: the timing itself is measured by bench/, not asserted here."""
    records, accounts, observed = {}, {}, {}
    for i in range(10_000):
        name = f"site_s{i}"
        record = sliver(
            name, keys=(f"ssh-ed25519 AAAA{i:040d} u@h",), attributes=(("nm_cpu_share", "2"),)
        )
        records[name] = record
        accounts[name] = owned_state(record, uid=10_000 + i)
        observed[name] = ObservedAccount(name, 10_000 + i)
    assert plan_actions(records, accounts, observed, NOW, may_destroy_orphans=True) == []


# --- properties -----------------------------------------------------------------------------

NAMES = [f"site_{c}" for c in "abcde"]
INSTANTIATIONS = [PLC_INSTANTIATED, NM_CONTROLLER, DELEGATED, NOT_INSTANTIATED]

records_strategy = st.dictionaries(
    st.sampled_from(NAMES),
    st.tuples(
        st.sampled_from(INSTANTIATIONS),
        st.sampled_from([0, int(NOW), int(NOW) + 10]),
        st.sampled_from(["0", "1", "junk"]),
        st.integers(min_value=1, max_value=2),
    ),
    max_size=5,
).map(
    lambda d: {
        n: sliver(n, instantiation=i, expires=e, attributes=(("nm_enabled", en),), slice_id=sid)
        for n, (i, e, en, sid) in d.items()
    }
)
accounts_strategy = st.dictionaries(
    st.sampled_from(NAMES),
    st.tuples(
        st.one_of(st.none(), st.integers(min_value=5000, max_value=5002)),
        st.booleans(),
        st.sampled_from(["", "stale"]),
        st.sampled_from(list(Phase)),
        st.sampled_from([0.0, NOW + 5]),
        st.booleans(),
        st.booleans(),
    ),
    max_size=5,
).map(
    lambda d: {
        n: AccountState(n, uid, owned, applied, phase, retry_at=retry, create_requested=req, start_pending=pend)
        for n, (uid, owned, applied, phase, retry, req, pend) in d.items()
    }
)
frozen_strategy = st.frozensets(st.sampled_from(NAMES), max_size=5)
observed_strategy = st.dictionaries(
    st.sampled_from(NAMES), st.integers(min_value=5000, max_value=5002), max_size=5
).map(lambda d: {n: ObservedAccount(n, uid) for n, uid in d.items()})


def started(state, phase, start, record, frozen):
    """The phase and ``start_pending`` a perfect ``ensure`` leaves (``operations``): a disabled
    sliver is stopped (no start pending), a start of a frozen one is deferred."""
    pending = bool(state and state.start_pending and state.phase is not Phase.DESTROYING)
    if rspec_from_attributes(record.attributes)["nm_enabled"] == 0:
        return Phase.STOPPED, False
    if not start:
        return phase, pending
    if state is not None and state.phase is Phase.RUNNING:
        return phase, False  # already running: not started twice
    if record.name in frozen:
        return Phase.STOPPED, True
    return Phase.RUNNING, False


def simulate(actions, records, accounts, observed, frozen=frozenset()):
    """What a perfect worker would leave behind after carrying out ``actions``."""
    records, accounts, observed = dict(records), dict(accounts), dict(observed)
    for action in actions:
        name, state = action.name, accounts.get(action.name)
        if action.kind is ActionKind.DESTROY:
            observed.pop(name, None)
            accounts.pop(name, None)
            if action.reason == "expired":
                records.pop(name)
            elif action.sliver is not None and state is not None:
                # destroyed but the record stays: remember a pending Create() request
                accounts[name] = AccountState(name, create_requested=state.create_requested)
        elif action.kind is ActionKind.CONFLICT or (
            action.kind is ActionKind.CREATE and name in observed and not (state and state.owned)
        ):
            # the worker reports the conflict and backs off
            base = state or AccountState(name)
            accounts[name] = replace(base, phase=Phase.FAILED, retry_at=NOW + 60)
        elif action.kind is ActionKind.CREATE:
            uid = 9000 + NAMES.index(name)
            # created afresh: never "already running"
            # (finishing an interrupted destroy clears a pending start, as operations does)
            base = None if state is None else replace(
                state, phase=Phase.ABSENT, start_pending=state.start_pending and state.phase is not Phase.DESTROYING)
            phase, pending = started(base, Phase.STOPPED, action.start, action.sliver, frozen)
            accounts[name] = AccountState(
                name,
                uid=uid,
                owned=True,
                applied=action.sliver.fingerprint(),
                phase=phase,
                create_requested=bool(state and state.create_requested),
                start_pending=pending,
            )
            observed[name] = ObservedAccount(name, uid)
        elif action.kind is ActionKind.CONFIGURE:
            phase = state.phase if state.phase in (Phase.RUNNING, Phase.STOPPED) else Phase.STOPPED
            phase, pending = started(state, phase, action.start, action.sliver, frozen)
            accounts[name] = replace(state, applied=action.sliver.fingerprint(), phase=phase, start_pending=pending)
    return records, accounts, observed


@settings(max_examples=400, deadline=None)
@given(records_strategy, accounts_strategy, observed_strategy, st.booleans())
def test_planning_is_deterministic(records, accounts, observed, orphans) -> None:
    first = plan_actions(records, accounts, observed, NOW, may_destroy_orphans=orphans)
    reordered = plan_actions(
        dict(reversed(list(records.items()))),
        dict(reversed(list(accounts.items()))),
        dict(reversed(list(observed.items()))),
        NOW,
        may_destroy_orphans=orphans,
    )
    assert first == reordered
    assert len({a.name for a in first}) == len(first)  # at most one action per name


@settings(max_examples=400, deadline=None)
@given(records_strategy, accounts_strategy, observed_strategy, st.booleans(), frozen_strategy)
def test_applying_the_plan_converges(records, accounts, observed, orphans, frozen) -> None:
    actions = plan_actions(records, accounts, observed, NOW, may_destroy_orphans=orphans, frozen=frozen)
    after = simulate(actions, records, accounts, observed, frozen)
    assert plan_actions(*after, NOW, may_destroy_orphans=orphans, frozen=frozen) == []


@settings(max_examples=400, deadline=None)
@given(records_strategy, accounts_strategy, observed_strategy, frozen_strategy)
@example(  # found by CI: an interrupted destroy with a start pending is finished, the start dropped
    records={"site_d": sliver("site_d", instantiation="delegated", expires=1000010,
                              attributes=(("nm_enabled", "1"),), slice_id=1)},
    accounts={"site_d": AccountState("site_d", None, True, "", Phase.DESTROYING, create_requested=True,
                                     start_pending=True)},
    observed={},
    frozen=frozenset(),
)
def test_a_deferred_start_is_never_planned_while_frozen_and_left_pending_only_while_frozen(
    records, accounts, observed, frozen
) -> None:
    """Converged, a wanted settled sliver has a start pending only if the schedule freezes it;
    and no action starts a sliver the schedule freezes for its pending start alone."""
    actions = plan_actions(records, accounts, observed, NOW, may_destroy_orphans=True, frozen=frozen)
    for action in actions:
        state = accounts.get(action.name)
        if action.name in frozen and state is not None and state.start_pending:
            assert action.reason != REASON_DEFERRED_START
    records2, accounts2, observed2 = simulate(actions, records, accounts, observed, frozen)
    for name, state in accounts2.items():
        record = records2.get(name)
        wanted = record is not None and (record.auto_instantiated or state.create_requested)
        if (state.start_pending and state.owned and state.retry_at <= NOW and state.phase is Phase.STOPPED
                and wanted and name in observed2 and record.expires > NOW):
            assert name in frozen, (name, state)
