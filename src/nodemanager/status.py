"""``nodemanager status``: a readable table of slivers and the last sync's outcome.

Pure formatting over what the store holds; the CLI opens the store and prints the result. The
facts are read once (:func:`collect_status`, :func:`collect_resources`); the text is formatted
here and the JSON form (``--json``, docs/json.md) from the same facts in :mod:`.statusjson`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .adminkeys import status_lines as admin_keys_lines
from .bwmon import status_lines as budget_status_lines
from .conffiles import status_lines as conf_files_lines
from .core.cores import cpu_cores_problems
from .core.bwbudget import Accounting
from .core.leases import LeaseSchedule
from .core.records import AccountState, Phase, Sliver, ValveState
from .core.rspec import rspec_from_attributes
from .datadir import Meta
from .leasing import lease_holder, load_schedule
from .leasing import status_lines as lease_lines
from .store import Store

if TYPE_CHECKING:
    from .enforce.set import EnforcementSet

COLUMNS = ("NAME", "INSTANTIATION", "UID", "STATE", "EXPIRES", "CPU", "NET MAX", "DISK")


def _when(epoch: float | None, now: float) -> str:
    if not epoch:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch))
    delta = epoch - now
    span = abs(delta)
    if span < 60:
        return f"{stamp} (just now)"
    rel = f"{span / 86400:.0f}d" if span >= 86400 else f"{span / 3600:.0f}h" if span >= 3600 else f"{span / 60:.0f}m"
    return f"{stamp} ({'in ' + rel if delta >= 0 else rel + ' ago'})"


def _rate(kbps: int) -> str:
    if kbps >= 10_000_000:
        return "cap"
    return f"{kbps / 1000:g}M" if kbps >= 1000 else f"{kbps}k"


def _size(kib: int) -> str:
    if kib == 0:
        return "none"
    return f"{kib / 1048576:g}G" if kib >= 1048576 else f"{kib / 1024:g}M"


def sliver_state(sliver: Sliver | None, state: AccountState | None, now: float) -> tuple[str, str]:
    """Where the sliver is, as a stable word (docs/json.md lists them) and its detail: the last
    error of a failed state, else ""."""
    if sliver is not None and sliver.expires <= now:
        return "expired", ""
    if state is None or not state.owned:
        if state is not None and state.phase is Phase.FAILED:
            return "failed", state.last_error
        if sliver is not None and not sliver.auto_instantiated:
            return ("awaiting-create" if sliver.instantiation == "delegated" else "not-instantiated"), ""
        return "pending", ""
    if state.phase is Phase.FAILED:
        return "failed", state.last_error
    if state.phase is Phase.DESTROYING and state.failures:
        return "destroying-failed", state.last_error
    if sliver is None:
        return "orphan", ""
    return state.phase.value, ""


def state_label(sliver: Sliver | None, state: AccountState | None, now: float) -> str:
    """One word (plus a reason for failures) describing where the sliver is."""
    word, detail = sliver_state(sliver, state, now)
    if word == "failed":
        return f"failed: {detail[:60]}"
    if word == "destroying-failed":
        return f"destroying, failed: {detail[:48]}"
    if word == "orphan":
        return "orphan (removal pending)"
    return word


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SliverFacts:
    """One line of the slivers table as values: the record and account state it is drawn from
    (either may be None), the state word and detail (:func:`sliver_state`) and the own RSpec
    (None without a record)."""

    name: str
    sliver: Sliver | None
    account: AccountState | None
    state: str
    detail: str
    rspec: dict[str, int] | None


def sliver_facts(
    slivers: Mapping[str, Sliver], accounts: Mapping[str, AccountState], now: float, cap: int | None
) -> list[SliverFacts]:
    """Every sliver with a record, an owned account or a failure, sorted by name."""
    facts = []
    for name in sorted(set(slivers) | {n for n, a in accounts.items() if a.owned or a.phase is Phase.FAILED}):
        sliver, state = slivers.get(name), accounts.get(name)
        word, detail = sliver_state(sliver, state, now)
        rspec = rspec_from_attributes(sliver.attributes, cap) if sliver else None
        facts.append(SliverFacts(name, sliver, state, word, detail, rspec))
    return facts


def sliver_rows(
    slivers: Mapping[str, Sliver], accounts: Mapping[str, AccountState], now: float, cap: int | None
) -> list[list[str]]:
    return [_row(fact, now) for fact in sliver_facts(slivers, accounts, now, cap)]


def _row(fact: SliverFacts, now: float) -> list[str]:
    sliver, state, rspec = fact.sliver, fact.account, fact.rspec or {}
    return [
        fact.name,
        sliver.instantiation if sliver else "-",
        str(state.uid) if state and state.uid is not None else "-",
        state_label(sliver, state, now),
        _when(sliver.expires, now) if sliver else "-",
        str(rspec.get("nm_cpu_share", "-")),
        _rate(rspec["nm_net_max_rate"]) if rspec else "-",
        _size(rspec["nm_disk_quota"]) if rspec else "-",
    ]


def watch_line(raw: str) -> str:
    """The stored ``authority_watch`` meta as ``status`` shows it: "watching (...)", "polling
    (...)", or that no daemon says (it is cleared when the daemon stops)."""
    mode, _, detail = raw.partition(": ")
    if mode not in ("watching", "polling"):
        return "- (no daemon running)"
    return f"{mode} ({detail})" if detail else mode


@dataclass(frozen=True, slots=True)
class StatusFacts:
    """What ``status`` shows, read once from the store: the text and the JSON form are both
    drawn from it. Meta values are kept as stored ("" when unset); the handlers' JSON states
    (admin keys, conf files) raw, parsed by their own modules."""

    now: float
    backend: str
    last_sync: float
    outcome: str
    last_good: float
    authority_timestamp: str
    bwcap_kbps: int | None
    sshd: str
    enforcement: str
    valve: ValveState
    admin_keys: str
    conf_files: str
    schedule: LeaseSchedule
    slivers: list[SliverFacts]
    budgets: dict[str, Accounting]
    #: "watching: ..." (blocking queries), "polling: why", or "" (no daemon running).
    authority_watch: str = ""


def collect_status(store: Store, now: float | None = None) -> StatusFacts:
    now = time.time() if now is None else now
    cap_raw = store.get_meta(Meta.BWCAP, "")
    cap = int(cap_raw) if cap_raw.isdigit() else None
    return StatusFacts(
        now=now,
        backend=store.get_meta(Meta.BACKEND, ""),
        last_sync=float(store.get_meta(Meta.LAST_SYNC, "0") or 0),
        outcome=store.get_meta(Meta.LAST_OUTCOME, ""),
        last_good=float(store.get_meta(Meta.LAST_GOOD, "0") or 0),
        authority_timestamp=store.get_meta(Meta.AUTHORITY_TIMESTAMP, ""),
        bwcap_kbps=cap,
        sshd=store.get_meta(Meta.SSHD, ""),
        enforcement=store.get_meta(Meta.ENFORCEMENT, ""),
        valve=store.valve(),
        admin_keys=store.get_meta(Meta.ADMIN_KEYS, ""),
        conf_files=store.get_meta(Meta.CONF_FILES, ""),
        schedule=load_schedule(store),
        slivers=sliver_facts(store.slivers(), store.accounts(), now, cap),
        budgets=store.byte_budgets(),
        authority_watch=store.get_meta(Meta.AUTHORITY_WATCH, ""),
    )


def render_status(store: Store, now: float | None = None) -> str:
    facts = collect_status(store, now)
    now, cap, backend = facts.now, facts.bwcap_kbps, facts.backend or "?"
    head = [
        f"backend:        {backend}" + ("  (HOLLOW: records only, no accounts are created)" if backend == "hollow" else ""),
        f"last sync:      {_when(facts.last_sync, now)}",
        f"outcome:        {facts.outcome or 'no sync yet'}",
        f"last good sync: {_when(facts.last_good, now)}",
        f"authority data: timestamp {facts.authority_timestamp or '-'}"
        + (f", node cap {_rate(cap)}bit/s" if cap else ""),
        f"authority:      {watch_line(facts.authority_watch)}",
    ]
    sshd = facts.sshd
    if sshd and sshd != "ok":
        head.append(f"SSHD NOT SET UP: {sshd}")
    enforcement = facts.enforcement
    if enforcement == "ok":
        head.append("enforcement:    cpu, memory, pids, bandwidth and disk enforced (status --resources)")
    elif enforcement.startswith("none:"):
        head.append(f"enforcement:    {enforcement}")
    elif enforcement:
        head.append(f"NOT ENFORCED:   {enforcement}")
    valve = facts.valve
    if valve.held:
        head.append(f"SAFETY VALVE:   {len(valve.held)} removals held (seen in {valve.seen} document(s))")
    head += admin_keys_lines(facts.admin_keys, lambda epoch: _when(epoch, now))
    head += conf_files_lines(facts.conf_files, lambda epoch: _when(epoch, now))
    head += lease_lines(store, now, lambda epoch: _when(epoch, now))
    rows = [_row(fact, now) for fact in facts.slivers]
    body = table(rows, COLUMNS) if rows else "(no slivers)"
    return "\n".join(head) + "\n\n" + body + f"\n\n{len(rows)} sliver(s)"


@dataclass(frozen=True, slots=True)
class ResourceFacts:
    """What ``status --resources`` shows, as values. ``enforced`` False: nothing is enforced
    (the hollow backend, or enforcement not built) and the lists are empty. ``effective`` and
    ``observed`` map sliver -> resource -> value (``enforce.report`` compares them)."""

    enforced: bool
    mechanisms: dict[str, str]
    problems: list[str]
    ignored: list[tuple[str, str]]
    effective: dict[str, dict[str, int]]
    observed: dict[str, dict[str, int]]


def collect_resources(store: Store, enforcement: EnforcementSet | None, name_prefix: str = "") -> ResourceFacts:
    from .enforcing import effective_targets, observed_by_sliver

    if enforcement is None:
        return ResourceFacts(False, {}, [], [], {}, {})
    cap_raw = store.get_meta(Meta.BWCAP, "")
    effective, uids = effective_targets(store, int(cap_raw) if cap_raw.isdigit() else None,
                                        lease_holder(store, time.time()))
    ignored = [(name, reason) for name, sliver in sorted(store.slivers().items())
               for reason in cpu_cores_problems(sliver.attributes)]  # an unparsable tag is ignored: say so
    observed = observed_by_sliver(enforcement, uids, lambda name: name_prefix + name)
    return ResourceFacts(True, dict(sorted(enforcement.describe().items())), list(enforcement.problems()),
                         ignored, effective, observed)


def render_resources(store: Store, enforcement: EnforcementSet | None, name_prefix: str = "") -> str:
    """``status --resources``: each sliver's effective RSpec beside what the kernel holds."""
    from .enforce.report import resource_rows

    facts = collect_resources(store, enforcement, name_prefix)
    lines = ["", "resources (effective RSpec, after loans, beside the kernel's settings):"]
    if not facts.enforced:
        lines.append("  no enforcement: the hollow backend creates nothing to enforce")
        return "\n".join(lines)
    for resource, mechanism in facts.mechanisms.items():
        lines.append(f"  {resource:<10} {mechanism}")
    for problem in facts.problems:
        lines.append(f"  NOT ENFORCED: {problem}")
    for name, reason in facts.ignored:
        lines.append(f"  IGNORED: sliver {name}: {reason}")
    rows = resource_rows(facts.effective, facts.observed)
    lines += ["", table(rows[1:], [h.upper() for h in rows[0]]) if len(rows) > 1 else "(no slivers)"]
    now = time.time()
    lines += budget_status_lines(store.byte_budgets(), lambda epoch: _when(epoch, now))
    return "\n".join(lines)
