"""``nodemanager status``: a readable table of slivers and the last sync's outcome.

Pure formatting over what the store holds; the CLI opens the store and prints the result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .adminkeys import status_lines as admin_keys_lines
from .bwmon import status_lines as budget_status_lines
from .conffiles import status_lines as conf_files_lines
from .core.cores import cpu_cores_problems
from .core.records import AccountState, Phase, Sliver
from .core.rspec import rspec_from_attributes
from .datadir import Meta
from .leasing import lease_holder
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


def state_label(sliver: Sliver | None, state: AccountState | None, now: float) -> str:
    """One word (plus a reason for failures) describing where the sliver is."""
    if sliver is not None and sliver.expires <= now:
        return "expired"
    if state is None or not state.owned:
        if state is not None and state.phase is Phase.FAILED:
            return f"failed: {state.last_error[:60]}"
        if sliver is not None and not sliver.auto_instantiated:
            return "awaiting-create" if sliver.instantiation == "delegated" else "not-instantiated"
        return "pending"
    if state.phase is Phase.FAILED:
        return f"failed: {state.last_error[:60]}"
    if state.phase is Phase.DESTROYING and state.failures:
        return f"destroying, failed: {state.last_error[:48]}"
    if sliver is None:
        return "orphan (removal pending)"
    return state.phase.value


def table(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def sliver_rows(
    slivers: Mapping[str, Sliver], accounts: Mapping[str, AccountState], now: float, cap: int | None
) -> list[list[str]]:
    rows = []
    for name in sorted(set(slivers) | {n for n, a in accounts.items() if a.owned or a.phase is Phase.FAILED}):
        sliver, state = slivers.get(name), accounts.get(name)
        rspec = rspec_from_attributes(sliver.attributes, cap) if sliver else {}
        rows.append([
            name,
            sliver.instantiation if sliver else "-",
            str(state.uid) if state and state.uid is not None else "-",
            state_label(sliver, state, now),
            _when(sliver.expires, now) if sliver else "-",
            str(rspec.get("nm_cpu_share", "-")),
            _rate(rspec["nm_net_max_rate"]) if rspec else "-",
            _size(rspec["nm_disk_quota"]) if rspec else "-",
        ])
    return rows


def render_status(store: Store, now: float | None = None) -> str:
    now = time.time() if now is None else now
    cap_raw = store.get_meta(Meta.BWCAP, "")
    cap = int(cap_raw) if cap_raw.isdigit() else None
    backend = store.get_meta(Meta.BACKEND, "?")
    head = [
        f"backend:        {backend}" + ("  (HOLLOW: records only, no accounts are created)" if backend == "hollow" else ""),
        f"last sync:      {_when(float(store.get_meta(Meta.LAST_SYNC, '0') or 0), now)}",
        f"outcome:        {store.get_meta(Meta.LAST_OUTCOME, 'no sync yet') or 'no sync yet'}",
        f"last good sync: {_when(float(store.get_meta(Meta.LAST_GOOD, '0') or 0), now)}",
        f"authority data: timestamp {store.get_meta(Meta.AUTHORITY_TIMESTAMP, '-') or '-'}"
        + (f", node cap {_rate(cap)}bit/s" if cap else ""),
    ]
    sshd = store.get_meta(Meta.SSHD, "")
    if sshd and sshd != "ok":
        head.append(f"SSHD NOT SET UP: {sshd}")
    enforcement = store.get_meta(Meta.ENFORCEMENT, "")
    if enforcement == "ok":
        head.append("enforcement:    cpu, memory, pids, bandwidth and disk enforced (status --resources)")
    elif enforcement.startswith("none:"):
        head.append(f"enforcement:    {enforcement}")
    elif enforcement:
        head.append(f"NOT ENFORCED:   {enforcement}")
    valve = store.valve()
    if valve.held:
        head.append(f"SAFETY VALVE:   {len(valve.held)} removals held (seen in {valve.seen} document(s))")
    head += admin_keys_lines(store.get_meta(Meta.ADMIN_KEYS, ""), lambda epoch: _when(epoch, now))
    head += conf_files_lines(store.get_meta(Meta.CONF_FILES, ""), lambda epoch: _when(epoch, now))
    head += lease_lines(store, now, lambda epoch: _when(epoch, now))
    rows = sliver_rows(store.slivers(), store.accounts(), now, cap)
    body = table(rows, COLUMNS) if rows else "(no slivers)"
    return "\n".join(head) + "\n\n" + body + f"\n\n{len(rows)} sliver(s)"


def render_resources(store: Store, enforcement: EnforcementSet | None, name_prefix: str = "") -> str:
    """``status --resources``: each sliver's effective RSpec beside what the kernel holds."""
    from .enforce.report import resource_rows
    from .enforcing import effective_targets, observed_by_sliver

    cap_raw = store.get_meta(Meta.BWCAP, "")
    effective, uids = effective_targets(store, int(cap_raw) if cap_raw.isdigit() else None,
                                        lease_holder(store, time.time()))
    lines = ["", "resources (effective RSpec, after loans, beside the kernel's settings):"]
    if enforcement is None:
        lines.append("  no enforcement: the hollow backend creates nothing to enforce")
        return "\n".join(lines)
    for resource, mechanism in sorted(enforcement.describe().items()):
        lines.append(f"  {resource:<10} {mechanism}")
    for problem in enforcement.problems():
        lines.append(f"  NOT ENFORCED: {problem}")
    for name, sliver in sorted(store.slivers().items()):
        for reason in cpu_cores_problems(sliver.attributes):  # an unparsable tag is ignored: say so
            lines.append(f"  IGNORED: sliver {name}: {reason}")
    observed = observed_by_sliver(enforcement, uids, lambda name: name_prefix + name)
    rows = resource_rows(effective, observed)
    lines += ["", table(rows[1:], [h.upper() for h in rows[0]]) if len(rows) > 1 else "(no slivers)"]
    now = time.time()
    lines += budget_status_lines(store.byte_budgets(), lambda epoch: _when(epoch, now))
    return "\n".join(lines)
