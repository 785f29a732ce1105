"""Daily byte budgets (the original node manager's ``bwmon``): the poller, its report and its
metrics. The arithmetic is ``core.bwbudget``'s; this module reads and writes around it.

``ByteBudgetMonitor`` is one thread. Every ``[bwmon] poll_interval`` seconds it reads every
sliver's HTB byte counter at once (``BandwidthEnforcer.sent_bytes``: one ``tc -s class show``
and one ``nft -j list table`` for all slivers), advances each sliver's accounting
(``core.bwbudget.step``: period roll-over, counter resets carried, the cap set or lifted), writes
all of it to the store in one transaction and, when a cap was set, moved or lifted, pokes the
enforcement loop. The cap itself is applied there: ``enforcing.effective_targets`` lowers the
sliver's ``nm_net_max_rate`` to the stored cap (``core.bwbudget.apply_byte_caps``), so the
normal incremental pass writes it with the pass's one ``tc`` batch, and ``status --resources``
shows the capped ceiling as the effective one.

What the original mailed to the slice is a log event here (``event=byte-budget-capped``,
``event=byte-budget-cap-lifted``) and a counter (``nodemanager_byte_budget_events_total``).

Accounting is keyed by sliver name and outlives the sliver until its period ends (a slice
destroyed and re-created the same day keeps its used bytes). Counters are matched to slivers by
uid through the store's accounts; a class the enforcer re-created since the last reading
(qdisc replaced, sliver re-created: its generation moved) counts from 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .core.bwbudget import CAPPED, LIFTED, Accounting, BudgetDefaults, budget_from_attributes, idle, step
from .core.errors import NodeManagerError
from .core.rspec import effective_rspecs, rspec_from_attributes
from .enforce.bandwidth import BandwidthEnforcer, ClassCounter
from .store import Store

logger = logging.getLogger(__name__)


class BwmonSettings(Protocol):
    """``config.BwmonSection`` (what the monitor reads of it)."""

    daily_max_kbyte: int
    daily_thresh_percent: int
    period: int
    poll_interval: float


class Counters(Protocol):
    """Where the byte counters come from: ``EnforcementSet`` (its bandwidth enforcer, if any)."""

    enforcers: list


def bandwidth_enforcer(enforcement: Counters) -> BandwidthEnforcer | None:
    """The bandwidth enforcer in use (after ``probe``), or None: nothing to count."""
    return next((e for e in enforcement.enforcers if isinstance(e, BandwidthEnforcer)), None)


class ByteBudgetMonitor:
    """Reads the counters, keeps the accounting, sets and lifts caps (see the module doc)."""

    def __init__(
        self,
        store: Store,
        enforcement: Counters,
        settings: BwmonSettings,
        *,
        node_cap_kbps: Callable[[], int | None],
        on_change: Callable[[], None] = lambda: None,
        on_event: Callable[[str], None] = lambda kind: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` is the wall clock: periods span restarts. ``on_change`` is called (from
        the monitor's thread) when a cap was set, moved or lifted; ``on_event`` with
        ``capped``/``lifted`` for the metrics."""
        self.store = store
        self.enforcement = enforcement
        self.defaults = BudgetDefaults(settings.daily_max_kbyte, settings.daily_thresh_percent)
        self.period = float(settings.period)
        self.interval = float(settings.poll_interval)
        self.node_cap_kbps = node_cap_kbps
        self.on_change = on_change
        self.on_event = on_event
        self.clock = clock
        self._generations: dict[int, int] = {}  # uid -> class generation at the last reading
        self._ignored_logged: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Polls run (tests).
        self.polls = 0

    def poll_once(self) -> bool:
        """One reading of every counter and one store write; True when a cap changed (the
        enforcement loop has then been poked). Raises ``NodeManagerError`` when the kernel or
        the store cannot be read (the thread logs it and tries again next time)."""
        enforcer = bandwidth_enforcer(self.enforcement)
        if enforcer is None:
            return False
        counters = enforcer.sent_bytes()
        now = self.clock()
        slivers = self.store.slivers()
        live = {name: state.uid for name, state in self.store.accounts().items()
                if state.owned and state.uid is not None and name in slivers}
        own = {name: rspec_from_attributes(slivers[name].attributes, self.node_cap_kbps()) for name in live}
        effective = effective_rspecs(own, self.store.loans())
        rows = self.store.byte_budgets()
        by_uid = {uid: name for name, uid in live.items()}
        readings: dict[str, tuple[ClassCounter, bool]] = {}
        for uid, counter in counters.items():
            name = by_uid.get(uid)
            if name is not None:
                readings[name] = (counter, counter.generation != self._generations.get(uid, 0))
                self._generations[uid] = counter.generation
        written: list[Accounting] = []
        dropped: list[str] = []
        changed = False
        for name in sorted(set(readings) | set(rows)):
            old = rows.get(name)
            if name not in live:
                assert old is not None
                kept = idle(old, now, self.period)
                if kept is None:
                    dropped.append(name)
                    if old.capped:
                        self._event(name, old, LIFTED, "period-end", now)
                elif kept != old:
                    written.append(kept)
                continue
            reading = readings.get(name)
            budget = budget_from_attributes(slivers[name].attributes, self.defaults)
            if budget.ignored and name not in self._ignored_logged:
                self._ignored_logged.add(name)
                logger.info("sliver=%s event=byte-budget-tags-ignored tags=%s reason=no-second-traffic-class",
                            name, ",".join(budget.ignored))
            rspec = effective[name]
            new, event = step(old, name, None if reading is None else reading[0].sent_bytes,
                              reading is not None and reading[1], budget, now, self.period,
                              rspec["nm_net_min_rate"], rspec["nm_net_max_rate"])
            if new != old:
                written.append(new)
            if event is not None:
                self._event(name, new, event.kind, event.reason, now)
            changed |= (old.cap_kbit if old else None) != new.cap_kbit
        self.store.put_byte_budgets(written, dropped)
        self.polls += 1
        if changed:
            self.on_change()
        return changed

    def _event(self, name: str, acc: Accounting, kind: str, reason: str, now: float) -> None:
        ends = acc.period_start + self.period
        if kind == CAPPED:
            logger.warning("sliver=%s event=byte-budget-capped used_bytes=%d thresh_bytes=%d max_bytes=%d "
                           "ceil_kbit=%s seconds_left=%.0f", name, acc.used, acc.thresh_bytes, acc.max_bytes,
                           acc.cap_kbit, max(0.0, ends - now))
        else:
            logger.info("sliver=%s event=byte-budget-cap-lifted reason=%s", name, reason)
        self.on_event(kind)

    # --- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except NodeManagerError as exc:
                logger.error("event=byte-budget-poll-failed error=%s", exc)
            except Exception:  # noqa: BLE001 - a poll never ends the thread
                logger.exception("event=byte-budget-poll-failed")
            self._stop.wait(self.interval)

    def start(self) -> None:
        """Start polling (idempotent). The first poll is immediate."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="bwmon", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop polling (idempotent); a poll in progress finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None


# --- status and metrics -------------------------------------------------------------------
def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def status_lines(rows: Mapping[str, Accounting], when: Callable[[float], str]) -> list[str]:
    """``status --resources``: bytes sent this period against each sliver's budget."""
    if not rows:
        return []
    lines = ["", "byte budgets (bytes sent this period, HTB-counted, against the daily budget):"]
    width = max(len(name) for name in rows)
    for name, acc in sorted(rows.items()):
        if acc.max_bytes:
            budget = f"of {_bytes(acc.max_bytes)} ({100 * acc.used // acc.max_bytes}%), threshold {_bytes(acc.thresh_bytes)}"
        else:
            budget = "no budget"
        state = f"CAPPED at {acc.cap_kbit} kbit/s" if acc.capped else "not capped"
        lines.append(f"  {name:<{width}}  {_bytes(acc.used)} {budget}; {state}; period since {when(acc.period_start)}")
    return lines


class ByteBudgetCollector(Collector):
    """Per-sliver budget gauges, read from the store at scrape time (``metrics``)."""

    def __init__(self, store: Callable[[], Mapping[str, Accounting]]) -> None:
        self._rows = store

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            rows = self._rows()
        except NodeManagerError:
            return  # nodemanager_store_readable says so
        families = [GaugeMetricFamily(name, text, labels=["sliver"]) for name, text in (
            ("nodemanager_sliver_bytes_sent_period", "Bytes the sliver's HTB class sent in the current budget period"),
            ("nodemanager_sliver_byte_budget", "The sliver's byte budget per period (0: none)"),
            ("nodemanager_sliver_byte_threshold", "Bytes per period past which the sliver's ceiling is lowered"),
            ("nodemanager_sliver_capped", "1 while the sliver's ceiling is lowered by its byte budget"))]
        for name, acc in sorted(rows.items()):
            values = (acc.used, acc.max_bytes, acc.thresh_bytes, 1 if acc.capped else 0)
            for family, value in zip(families, values):
                family.add_metric([name], float(value))
        yield from families
