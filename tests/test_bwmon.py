"""Daily byte budgets (``bwmon``) on the kernel model: counters read in one tc call, the cap
lowering the effective ceiling the enforcer writes, the accounting surviving restarts, counter
resets, qdisc replacements and a sliver re-created within its period; status and metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodemanager.bwmon import ByteBudgetMonitor, status_lines
from nodemanager.config import BwmonSection
from nodemanager.core.allocation import classid_minors
from nodemanager.core.bwbudget import KIB, capped_ceil
from nodemanager.core.records import AccountState, Phase, Sliver
from nodemanager.enforce.bandwidth import BandwidthEnforcer
from nodemanager.enforce.set import EnforcementSet
from nodemanager.enforcing import effective_targets
from nodemanager.metrics import NodeMetrics
from nodemanager.store import Store
from nodemanager.testing.kernel import KernelHost

DEV = "eth0"
CAP = 8000
PERIOD = 100
BUDGET = (("net_max_kbyte", "2000"), ("net_thresh_kbyte", "1000"))


class Rig:
    """A store, the kernel model, the bandwidth enforcer and a monitor on a manual clock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.host = KernelHost(uplink=DEV)
        self.now = 1000.0
        self.pokes = 0
        self.events: list[str] = []
        self.store = Store(path)
        self.enforcer = BandwidthEnforcer(self.host, DEV, cap_kbit=CAP)
        self.monitor = self.make_monitor()

    def make_monitor(self) -> ByteBudgetMonitor:
        return ByteBudgetMonitor(self.store, EnforcementSet([self.enforcer]), BwmonSection(period=PERIOD),
                                 node_cap_kbps=lambda: CAP, on_change=self.poke, on_event=self.events.append,
                                 clock=lambda: self.now)

    def poke(self) -> None:
        self.pokes += 1

    def sliver(self, name: str, uid: int, attributes: tuple[tuple[str, str], ...] = BUDGET) -> None:
        self.store.apply_records([Sliver(name, uid, "plc-instantiated", 2**31 - 1, 1, attributes=attributes)], [])
        self.store.put_account(AccountState(name, uid=uid, owned=True, phase=Phase.RUNNING))

    def destroy(self, name: str, uid: int) -> None:
        self.enforcer.remove(name, uid)
        self.store.finish_destroy(name)
        self.store.apply_records([], [name])

    def enforce(self) -> dict[str, dict[str, int]]:
        rspecs, uids = effective_targets(self.store, CAP)
        self.enforcer.apply(rspecs, uids)
        return rspecs

    def send(self, uid: int, nbytes: int) -> None:
        self.host.net.send(DEV, classid_minors({"x": uid})["x"], nbytes)

    def ceil_of(self, uid: int) -> int:
        return self.host.net.devices[DEV].classes[classid_minors({"x": uid})["x"]].ceil_kbit

    def reopen(self) -> None:
        """A daemon restart: the store closed and reopened, a fresh enforcer and monitor."""
        self.store.close()
        self.store = Store(self.path)
        self.enforcer = BandwidthEnforcer(self.host, DEV, cap_kbit=CAP)
        self.monitor = self.make_monitor()


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path / "nm.sqlite")


def test_a_sliver_past_its_threshold_is_capped_by_the_formula_and_lifted_at_the_period_end(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.sliver("b", 1002, ())
    rig.enforce()
    assert rig.monitor.poll_once() is False
    rig.send(1001, 900 * KIB)
    rig.send(1002, 10**9)  # no budget: counted, never capped
    rig.now += 10
    assert rig.monitor.poll_once() is False and rig.ceil_of(1001) == CAP
    rig.send(1001, 200 * KIB)  # 1100 KiB: past the 1000 KiB threshold
    rig.now += 10
    assert rig.monitor.poll_once() is True and rig.pokes == 1 and rig.events == ["capped"]
    row = rig.store.byte_budgets()["a"]
    expected = capped_ceil(2000 * KIB, 1100 * KIB, PERIOD - 20, 0, CAP)
    assert row.used == 1100 * KIB and row.cap_kbit == expected == 92
    assert rig.enforce()["a"]["nm_net_max_rate"] == expected  # the effective RSpec carries the cap
    assert rig.ceil_of(1001) == expected and rig.ceil_of(1002) == CAP
    assert rig.store.byte_budgets()["b"].used == 10**9 and not rig.store.byte_budgets()["b"].capped

    rig.now = 1000 + PERIOD  # the period ends: the cap lifts, used bytes start again
    assert rig.monitor.poll_once() is True and rig.events == ["capped", "lifted"]
    row = rig.store.byte_budgets()["a"]
    assert row.used == 0 and row.cap_kbit is None and row.period_start == 1000 + PERIOD
    rig.enforce()
    assert rig.ceil_of(1001) == CAP


def test_counters_are_read_with_one_tc_call_for_all_slivers(rig: Rig) -> None:
    for i in range(20):
        rig.sliver(f"s{i}", 2000 + i)
    rig.enforce()
    before = len(rig.host.commands)
    rig.monitor.poll_once()
    calls = rig.host.commands[before:]
    assert [c[:2] for c in calls if c[0] == "tc"] == [["tc", "-s"]]
    assert len(rig.store.byte_budgets()) == 20


def test_accounting_survives_a_restart_and_a_qdisc_replacement_resetting_the_counters(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.enforce()
    rig.monitor.poll_once()
    rig.send(1001, 600 * KIB)
    rig.now += 5
    rig.monitor.poll_once()
    rig.reopen()
    assert rig.store.byte_budgets()["a"].used == 600 * KIB
    rig.host.run(["tc", "qdisc", "del", "dev", DEV, "root"])  # e.g. a reboot: the counters are gone
    rig.enforce()  # the new process re-creates the tree (class generation 1)
    rig.send(1001, 700 * KIB)  # more than the old counter: only the generation tells
    rig.now += 5
    assert rig.monitor.poll_once() is True
    row = rig.store.byte_budgets()["a"]
    assert row.used == 1300 * KIB and row.capped and row.period_start == 1000.0


def test_a_counter_going_backwards_is_carried_on(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.enforce()
    rig.send(1001, 500 * KIB)
    rig.monitor.poll_once()
    # someone else replaced the qdisc: a fresh enforcer (generation 0) finds no tree
    rig.host.run(["tc", "qdisc", "del", "dev", DEV, "root"])
    BandwidthEnforcer(rig.host, DEV, cap_kbit=CAP).apply(*effective_targets(rig.store, CAP))
    rig.send(1001, 100 * KIB)
    rig.now += 1
    rig.monitor.poll_once()
    assert rig.store.byte_budgets()["a"].used == 600 * KIB


def test_a_sliver_re_created_within_its_period_keeps_its_budget(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.enforce()
    rig.send(1001, 1500 * KIB)
    rig.monitor.poll_once()
    assert rig.store.byte_budgets()["a"].capped
    rig.destroy("a", 1001)
    rig.enforce()
    rig.now += 10
    rig.monitor.poll_once()
    kept = rig.store.byte_budgets()["a"]
    assert kept.used == 1500 * KIB and kept.counter is None
    rig.sliver("a", 1001)
    rig.enforce()
    rig.send(1001, 10 * KIB)
    rig.now += 10
    rig.monitor.poll_once()
    row = rig.store.byte_budgets()["a"]
    assert row.used == 1510 * KIB and row.capped and row.period_start == 1000.0
    assert rig.enforce()["a"]["nm_net_max_rate"] == row.cap_kbit

    rig.destroy("a", 1001)
    rig.now = 1000 + PERIOD + 1
    rig.monitor.poll_once()
    assert "a" not in rig.store.byte_budgets()  # gone and its period over: forgotten


def test_i2_tags_are_accepted_and_ignored_with_a_log_line(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.sliver("a", 1001, (*BUDGET, ("net_i2_max_kbyte", "9")))
    rig.enforce()
    with caplog.at_level(logging.INFO, logger="nodemanager.bwmon"):
        rig.monitor.poll_once()
        rig.monitor.poll_once()
    ignored = [r for r in caplog.records if "byte-budget-tags-ignored" in r.getMessage()]
    assert len(ignored) == 1 and "net_i2_max_kbyte" in ignored[0].getMessage()


def test_the_capped_event_is_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.sliver("a", 1001)
    rig.enforce()
    rig.send(1001, 1500 * KIB)
    with caplog.at_level(logging.INFO, logger="nodemanager.bwmon"):
        rig.monitor.poll_once()
    assert any("sliver=a event=byte-budget-capped" in r.getMessage() for r in caplog.records)


def test_status_and_metrics_show_used_bytes_against_the_budget(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.sliver("b", 1002, ())
    rig.enforce()
    rig.send(1001, 1500 * KIB)
    rig.monitor.poll_once()
    text = "\n".join(status_lines(rig.store.byte_budgets(), lambda epoch: "T"))
    assert "1.5MiB of 2.0MiB (75%), threshold 1000.0KiB; CAPPED at" in text
    assert "b  0B no budget; not capped" in text
    metrics = NodeMetrics(store=rig.store)
    metrics.byte_budget_event("capped")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples}
    assert samples[("nodemanager_sliver_bytes_sent_period", (("sliver", "a"),))] == 1500 * KIB
    assert samples[("nodemanager_sliver_byte_budget", (("sliver", "a"),))] == 2000 * KIB
    assert samples[("nodemanager_sliver_byte_threshold", (("sliver", "a"),))] == 1000 * KIB
    assert samples[("nodemanager_sliver_capped", (("sliver", "a"),))] == 1
    assert samples[("nodemanager_sliver_capped", (("sliver", "b"),))] == 0
    assert samples[("nodemanager_byte_budget_events_total", (("event", "capped"),))] == 1


def test_no_bandwidth_enforcer_means_nothing_to_count(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.sqlite")
    monitor = ByteBudgetMonitor(store, EnforcementSet([]), BwmonSection(), node_cap_kbps=lambda: None)
    assert monitor.poll_once() is False and store.byte_budgets() == {}


def test_the_thread_polls_and_stops(rig: Rig) -> None:
    rig.sliver("a", 1001)
    rig.enforce()
    monitor = ByteBudgetMonitor(rig.store, EnforcementSet([rig.enforcer]), BwmonSection(poll_interval=0.1),
                                node_cap_kbps=lambda: CAP)
    monitor.start()
    try:
        import time
        deadline = time.monotonic() + 5
        while monitor.polls < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        monitor.stop()
    assert monitor.polls >= 2 and "a" in rig.store.byte_budgets()
