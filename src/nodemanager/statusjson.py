"""``status --json`` and ``plan --json``: the facts of the tables as versioned JSON documents.

Built from the same values the text is (:class:`status.StatusFacts`, :class:`status.ResourceFacts`,
the plan's ``SyncOutcome`` and actions), so the two forms cannot disagree. The shape is documented
in docs/json.md and pinned by tests/test_status_json.py. Within ``SCHEMA`` fields are only ever
added, never renamed or removed; every field is always present (null when unknown); times are
Unix seconds (numbers), never formatted strings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .adminkeys import load_state as load_admin_keys
from .conffiles import decode_state as decode_conf_files
from .core.conffiles import EntryState, count_states
from .core.leases import Lease, is_system
from .enforce.report import resource_facts
from .status import ResourceFacts, StatusFacts, SliverFacts

if TYPE_CHECKING:
    from .core.plan import Action
    from .sync import SyncOutcome

#: The documents' version: bumped only by a change that is not an addition.
SCHEMA = 1


def dumps(document: dict[str, Any]) -> str:
    """The one way both documents are written: indented, keys sorted."""
    return json.dumps(document, indent=2, sort_keys=True)


def _epoch(value: float | None) -> int | float | None:
    """A stored time as a number (an integral one as an int); 0 or None is unknown."""
    if not value:
        return None
    return int(value) if float(value).is_integer() else float(value)


def _text(value: str) -> str | None:
    return value or None


def _sliver(fact: SliverFacts) -> dict[str, Any]:
    sliver, account = fact.sliver, fact.account
    return {
        "name": fact.name,
        "state": fact.state,
        "detail": _text(fact.detail),
        "instantiation": sliver.instantiation if sliver else None,
        "slice_id": sliver.slice_id if sliver else None,
        "source": sliver.source if sliver else None,
        "expires": sliver.expires if sliver else None,
        "phase": account.phase.value if account else None,
        "owned": bool(account and account.owned),
        "uid": account.uid if account else None,
        "failures": account.failures if account else 0,
        "last_error": _text(account.last_error) if account else None,
        "retry_at": _epoch(account.retry_at) if account else None,
        "create_requested": bool(account and account.create_requested),
        "start_pending": bool(account and account.start_pending),
        "rspec": dict(sorted(fact.rspec.items())) if fact.rspec is not None else None,
    }


def _lease(lease: Lease | None) -> dict[str, Any] | None:
    if lease is None:
        return None
    return {"name": lease.name, "slice_id": lease.slice_id, "t_from": lease.t_from, "t_until": lease.t_until}


def _state(raw: str, problem: str) -> dict[str, Any]:
    """A meta value that is "ok", empty (unknown), ``none: why`` (nothing to do here) or the
    problems, as ``{"state": "ok" | "none" | problem | null, "detail": text | null}``."""
    if not raw or raw == "ok":
        return {"state": raw or None, "detail": None}
    return {"state": "none" if raw.startswith("none:") else problem, "detail": raw}


def _watch(raw: str) -> dict[str, Any]:
    """How the running daemon learns of changes: ``{"mode": "watching" | "polling" | null,
    "detail": text | null}`` (null: no daemon running)."""
    mode, _, detail = raw.partition(": ")
    if mode not in ("watching", "polling"):
        return {"mode": None, "detail": None}
    return {"mode": mode, "detail": detail or None}


def status_document(facts: StatusFacts, resources: ResourceFacts | None = None) -> dict[str, Any]:
    """The ``status --json`` document; ``resources`` (``--resources``) fills ``resources``."""
    now = facts.now
    problems: list[dict[str, Any]] = []

    def problem(kind: str, name: str | None, message: str) -> None:
        problems.append({"kind": kind, "name": name, "message": message})

    sshd = _state(facts.sshd, "not-set-up")
    enforcement = _state(facts.enforcement, "not-enforced")
    if sshd["state"] == "not-set-up":
        problem("sshd", None, facts.sshd)
    if enforcement["state"] == "not-enforced":
        problem("enforcement", None, facts.enforcement)
    valve = facts.valve
    if valve.held:
        problem("safety-valve", None, f"{len(valve.held)} removals held (seen in {valve.seen} document(s))")

    outcomes, confirm_after = load_admin_keys(facts.admin_keys)
    admin_accounts = []
    for name, outcome in sorted(outcomes.items()):
        hold = outcome.hold
        admin_accounts.append({
            "name": name, "keys": outcome.keys, "changed_at": _epoch(outcome.changed_at),
            "document_timestamp": outcome.document or None,
            "hold": None if hold is None else {"count": hold.count, "seen": hold.seen, "digest": hold.digest},
            "problem": _text(outcome.problem), "rejections": list(outcome.rejections)})
        if outcome.problem:
            problem("admin-keys", name, outcome.problem)
        elif hold is not None:
            problem("admin-keys", name, f"removal of all {hold.count} key(s) held "
                    f"(seen in {hold.seen} of {confirm_after} consecutive documents needed)")

    decoded = decode_conf_files(facts.conf_files)
    conf_time, conf_entries = (decoded[0], decoded[1]) if decoded is not None else (None, [])
    for entry in conf_entries:
        if entry.state in (EntryState.FAILED, EntryState.REFUSED):
            problem("conf-file", entry.dest, f"{entry.state.value}: {entry.reason}")

    schedule = facts.schedule
    records = {f.name: f.sliver for f in facts.slivers if f.sliver is not None}
    frozen = schedule.frozen_at(now, {n: is_system(s.attributes) for n, s in records.items()})
    for refused in schedule.refused:
        problem("lease", refused.label, f"refused: {refused.reason}")

    for fact in facts.slivers:
        if fact.state in ("failed", "destroying-failed"):
            problem("sliver", fact.name, f"{fact.state}: {fact.detail}")

    return {
        "schema": SCHEMA,
        "generated_at": _epoch(now),
        "node": {
            "backend": _text(facts.backend),
            "hollow": facts.backend == "hollow",
            "bwcap_kbps": facts.bwcap_kbps,
            "sshd": sshd,
            "enforcement": enforcement,
        },
        "sync": {
            "last_sync": _epoch(facts.last_sync),
            "outcome": _text(facts.outcome),
            "last_good_sync": _epoch(facts.last_good),
            "authority_timestamp": int(facts.authority_timestamp) if facts.authority_timestamp.isdigit() else None,
            "authority_watch": _watch(facts.authority_watch),
        },
        "safety_valve": {"held": sorted(valve.held), "seen": valve.seen},
        "slivers": [_sliver(fact) for fact in facts.slivers],
        "problems": problems,
        "admin_keys": {"confirm_after": confirm_after or None,
                       "accounts": admin_accounts},
        "conf_files": {
            "time": _epoch(conf_time),
            "counts": count_states(conf_entries),
            "entries": [{"dest": e.dest, "state": e.state.value, "reason": _text(e.reason)} for e in conf_entries],
        },
        "leases": {
            "policy": schedule.policy,
            "reservable": schedule.reservable,
            "granularity": schedule.granularity,
            "current": _lease(schedule.leased_at(now)),
            "next": _lease(schedule.next_lease(now)),
            "frozen": sorted(frozen),
            "leases": [_lease(lease) for lease in schedule.leases],
            "refused": [{"label": r.label, "reason": r.reason} for r in schedule.refused],
        },
        "byte_budgets": [{
            "name": name, "period_start": _epoch(acc.period_start), "used_bytes": acc.used,
            "max_bytes": acc.max_bytes, "thresh_bytes": acc.thresh_bytes, "capped": acc.capped,
            "cap_kbit": acc.cap_kbit,
        } for name, acc in sorted(facts.budgets.items())],
        "resources": None if resources is None else _resources(resources),
    }


def _resources(facts: ResourceFacts) -> dict[str, Any]:
    return {
        "enforced": facts.enforced,
        "mechanisms": dict(facts.mechanisms),
        "problems": list(facts.problems),
        "ignored": [{"name": name, "reason": reason} for name, reason in facts.ignored],
        "rows": [{
            "sliver": row.sliver, "resource": row.resource, "effective": row.effective, "kernel": row.kernel,
            "kernel_raw": None if row.raw is None else {"name": row.raw[0], "value": row.raw[1]},
            "agree": row.agree,
        } for row in resource_facts(facts.effective, facts.observed)],
    }


def plan_document(outcome: SyncOutcome, actions: Sequence[Action]) -> dict[str, Any]:
    """The ``plan --json`` document: what the fetched authority document was, and the actions
    a sync would hand to the workers, in plan order."""
    return {
        "schema": SCHEMA,
        "document": {
            "timestamp": outcome.document_timestamp,
            "result": outcome.result.value,
            "stale": outcome.result.value == "stale",
            "slivers": outcome.slivers,
            "rejected": outcome.rejected,
            "rejections": [{"label": r.label, "reason": r.reason} for r in outcome.rejections],
            "held": sorted(outcome.held),
            "valve_tripped": outcome.valve_tripped,
        },
        "actions": [{"kind": a.kind.value, "name": a.name, "reason": a.reason, "start": a.start} for a in actions],
    }
