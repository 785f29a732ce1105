"""The reconcile plan: what the workers must do so the machine matches the records.

``plan_actions`` compares three views of each sliver — the record (what the sources say), the
account state (what the node manager last did, from the store) and the observed account (what
the backend sees now, from one cheap pass) — and returns the actions that close the gap. It does
no I/O and asks the OS nothing, so planning 10,000 unchanged slivers costs a few dictionary
lookups and one fingerprint comparison each: unchanged slivers yield no action and no backend
call at all.

The plan never destroys what the node manager did not create (only ``owned`` accounts are
destroyed or reconfigured), and never destroys an orphan account before the caller has seen a
good authority document since start-up (``may_destroy_orphans``: kubelet's "don't delete until
every source has been seen").
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import Enum

from .records import AccountState, ObservedAccount, Phase, Sliver
from .rspec import rspec_from_attributes

REASON_EXPIRED = "expired"
REASON_NOT_INSTANTIATED = "no longer instantiated"
REASON_NEW = "new sliver"
REASON_DRIFT = "account disappeared (drift)"
REASON_UID_CHANGED = "account was replaced by someone else (uid changed)"
REASON_CHANGED = "keys or attributes changed"
REASON_RETRY = "retrying after failure"
REASON_REMOVED = "removed by authority"
REASON_INTERRUPTED = "finishing an interrupted destroy, then creating it again"
REASON_UNSETTLED = "left in a transitional phase (interrupted operation)"
REASON_ACCESS = "lock state or keys changed outside the node manager"
REASON_DEFERRED_START = "deferred start"


class ActionKind(str, Enum):
    DESTROY = "destroy"
    CREATE = "create"
    CONFIGURE = "configure"
    CONFLICT = "conflict"


#: Plan order: destroys first (they free names and resources), then conflicts, creates and
#: configures; within a kind, by name.
_KIND_ORDER = {
    ActionKind.DESTROY: 0,
    ActionKind.CONFLICT: 1,
    ActionKind.CREATE: 2,
    ActionKind.CONFIGURE: 3,
}


@dataclass(frozen=True, slots=True)
class Action:
    """One thing a worker must do for one sliver.

    ``sliver`` is None for the DESTROY of an orphan account (no record left) and for CONFLICT
    (the worker only reports it). ``start``: start the sliver afterwards (CREATE, and the
    CONFIGURE that completes a creation a failure or a crash cut short).
    """

    kind: ActionKind
    name: str
    sliver: Sliver | None
    reason: str
    start: bool = False


def _enabled(sliver: Sliver) -> bool:
    """``nm_enabled != 0``: computed only for CREATE, so unchanged slivers parse no RSpec."""
    return rspec_from_attributes(sliver.attributes)["nm_enabled"] != 0


def plan_actions(
    records: Mapping[str, Sliver],
    accounts: Mapping[str, AccountState],
    observed: Mapping[str, ObservedAccount],
    now: float,
    *,
    may_destroy_orphans: bool,
    honour_backoff: bool = True,
    frozen: Collection[str] = (),
) -> list[Action]:
    """The ordered actions that make the machine match ``records``.

    Rules, per name (a name whose account state has ``retry_at > now`` is skipped: backoff, unless
    ``honour_backoff`` is False, as for an operator's explicit ``sync --once``):
    - record expired (``expires <= now``) -> DESTROY "expired", whether or not an account exists;
    - wanted = auto-instantiated, or ``create_requested`` in its account state;
    - not wanted and owned -> DESTROY "no longer instantiated";
    - wanted and not owned, or owned but never created (no uid, no account: only the intent
      was recorded) -> CREATE "new sliver" (start when auto-instantiated and enabled); a
      foreign account of that name is the worker's to report as a conflict;
    - wanted, owned, not observed -> CREATE "account disappeared (drift)", started again only if
      it was running;
    - wanted, owned, phase DESTROYING (a destroy cut short by a crash) -> CREATE "finishing an
      interrupted destroy" (the worker finishes the destroy, then creates afresh);
    - wanted, owned, observed with a uid other than the one we created -> CONFLICT;
    - wanted, owned, observed, and the phase is FAILED, or not settled (ABSENT: an interrupted
      create), or the applied fingerprint differs, or the observed access signature (lock state,
      keys) differs from the one recorded after the last apply -> CONFIGURE; a FAILED or
      unsettled sliver that was never applied (its creation did not complete) is started
      afterwards when auto-instantiated and enabled, as its creation would have;
    - a start deferred by a lease (``start_pending``) of a sliver not in ``frozen`` (the names the
      lease schedule keeps frozen now) is done: wanted, owned, observed, phase STOPPED ->
      CONFIGURE "deferred start" with start (before the fingerprint and access rules, which it
      covers); the CONFIGURE of a FAILED or unsettled one and the CREATE of a vanished or
      never-created one start it too. In ``frozen`` it stays pending (a start there would only be
      deferred again); a destroy (also one being finished) drops it;
    - an owned account with no record -> DESTROY "removed by authority", only when
      ``may_destroy_orphans`` -- except one already DESTROYING: that decision was taken on good
      data, and finishing it needs no new document.
    Order: DESTROY, CONFLICT, CREATE, CONFIGURE, each by name.
    """
    actions: list[Action] = []
    append = actions.append
    for name, record in records.items():
        state = accounts.get(name)
        if honour_backoff and state is not None and state.retry_at > now:
            continue
        if record.expires <= now:
            append(Action(ActionKind.DESTROY, name, record, REASON_EXPIRED))
            continue
        if not (record.auto_instantiated or (state is not None and state.create_requested)):
            if state is not None and state.owned:
                append(Action(ActionKind.DESTROY, name, record, REASON_NOT_INSTANTIATED))
            continue
        seen = observed.get(name)
        deferred = state is not None and state.start_pending and name not in frozen
        if state is not None and state.owned and state.phase is Phase.DESTROYING:
            append(Action(ActionKind.CREATE, name, record, REASON_INTERRUPTED,
                          record.auto_instantiated and _enabled(record)))
            continue
        if state is None or not state.owned or (seen is None and state.uid is None):
            # Never created yet (possibly only its intent was recorded before a crash).
            start = deferred or (record.auto_instantiated and _enabled(record))
            append(Action(ActionKind.CREATE, name, record, REASON_NEW, start))
            continue
        if seen is None:
            running = state.phase == Phase.RUNNING or deferred
            append(Action(ActionKind.CREATE, name, record, REASON_DRIFT, running))
        elif state.uid is not None and seen.uid != state.uid:
            append(Action(ActionKind.CONFLICT, name, None, REASON_UID_CHANGED))
        elif state.phase is Phase.FAILED or state.phase is Phase.ABSENT:
            start = deferred or (not state.applied and record.auto_instantiated and _enabled(record))
            reason = REASON_RETRY if state.phase is Phase.FAILED else REASON_UNSETTLED
            append(Action(ActionKind.CONFIGURE, name, record, reason, start))
        elif deferred and state.phase is Phase.STOPPED:
            append(Action(ActionKind.CONFIGURE, name, record, REASON_DEFERRED_START, True))
        elif state.applied != record.fingerprint():
            append(Action(ActionKind.CONFIGURE, name, record, REASON_CHANGED))
        elif state.access and seen.access != state.access:
            append(Action(ActionKind.CONFIGURE, name, record, REASON_ACCESS))
    for name, state in accounts.items():
        if (state.owned and name not in records and not (honour_backoff and state.retry_at > now)
                and (may_destroy_orphans or state.phase is Phase.DESTROYING)):
            append(Action(ActionKind.DESTROY, name, None, REASON_REMOVED))
    actions.sort(key=lambda action: (_KIND_ORDER[action.kind], action.name))
    return actions
