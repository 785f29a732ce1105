"""packaging/prometheus (alerting rules and their unit tests) and packaging/grafana (the dashboard).

* every ``nodemanager_*`` name in the rules, their unit tests and the dashboard's PromQL is one the
  daemon exports: the names come from a real :class:`NodeMetrics` registry over a store holding some
  state of every collector (slivers, failures, the valve, admin keys, conf files, leases, byte
  budgets), not from a hand-kept list;
* ``promtool check rules`` and ``promtool test rules`` pass, and every alert has a unit test that
  expects it to fire and one that expects it not to (skipped with the reason when promtool is
  missing: ``scripts/install-test-deps`` installs Debian's ``prometheus`` package, which ships it);
* the dashboard is valid JSON of a current schema, with a data source variable, an ``instance``
  variable, and a PromQL query in every panel (checked by promtool too when it is there).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from nodemanager.adminkeys import dump_outcomes
from nodemanager.conffiles import encode_state
from nodemanager.core.adminkeys import AccountOutcome, Hold
from nodemanager.core.bwbudget import Accounting
from nodemanager.core.conffiles import EntryOutcome, EntryState
from nodemanager.core.leases import POLICY_SHARED, Lease, LeaseSchedule, RefusedLease
from nodemanager.core.records import AccountState, Phase, ValveState
from nodemanager.datadir import Meta
from nodemanager.metrics import NodeMetrics
from nodemanager.store import Store
from nodemanager.testing.fakeauthority import make_sliver

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus" / "nodemanager-alerts.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "nodemanager-alerts.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "nodemanager-dashboard.json"

METRIC_NAME = re.compile(r"\bnodemanager_[a-z0-9_]+")
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool not installed (Debian: apt-get install prometheus; scripts/install-test-deps does it as root)"
T0 = 1_700_000_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name the daemon can export: a real registry over a store with some state of
    every collector, each family's samples plus the names its type implies (a counter's
    ``_total``/``_created``, a histogram's ``_bucket``/``_sum``/``_count``)."""
    with Store(tmp_path_factory.mktemp("metrics") / "nm.sqlite") as store:
        store.apply_records([make_sliver("site_a"), make_sliver("site_b", instantiation="delegated")], [], {})
        store.put_account(AccountState(name="site_a", uid=1001, owned=True, phase=Phase.RUNNING))
        store.record_failure("site_b", "boom", 0.0)
        store.set_valve(ValveState(held=frozenset({"site_x"}), seen=1))
        store.set_meta({
            Meta.ADMIN_KEYS: dump_outcomes({
                "site_admin": AccountOutcome(keys=2, hold=Hold("digest", 2, 1)),
                "ghost": AccountOutcome(problem="no such account")}, 2),
            Meta.CONF_FILES: encode_state([EntryOutcome("/etc/motd", EntryState.INSTALLED),
                                           EntryOutcome("/etc/x", EntryState.REFUSED, "not allowed")], T0),
            Meta.LEASES: json.dumps(LeaseSchedule(POLICY_SHARED, 60, (Lease("site_a", 1, T0, T0 + 600),),
                                                  (RefusedLease("site_b@1-2", "overlaps"),)).to_dict()),
        })
        store.put_byte_budgets([Accounting("site_a", T0, used=10, max_bytes=100, thresh_bytes=50, cap_kbit=8)])
        metrics = NodeMetrics(store=store, queue_depth=lambda: 3, backend="test", now=lambda: T0 + 10)
        metrics.api_request("GetXIDs", None, 0.01)
        metrics.api_request("GetXIDs", 1, 0.01)
        names: set[str] = set()
        for family in metrics.registry.collect():
            names.update(sample.name for sample in family.samples)
            if isinstance(family, CounterMetricFamily) or family.type == "counter":
                names.update({family.name + "_total", family.name + "_created"})
            elif isinstance(family, HistogramMetricFamily) or family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created"))
            else:
                names.add(family.name)
    # each collector really contributed (a collector that stopped yielding would hide a bad name)
    for name in ("nodemanager_syncs_total", "nodemanager_sync_duration_seconds_bucket", "nodemanager_slivers",
                 "nodemanager_sliver_failures", "nodemanager_worker_queue_depth", "nodemanager_admin_keys_problem",
                 "nodemanager_admin_keys_held_removals", "nodemanager_conf_files", "nodemanager_lease_active",
                 "nodemanager_leases_refused", "nodemanager_sliver_byte_budget", "nodemanager_sliver_capped"):
        assert name in names, name
    return names


def dashboard_panels() -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard_panels() for target in panel.get("targets", [])
            if target.get("expr")]


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert:\s*(\S+)\s*$", RULES.read_text(), re.M)


@pytest.mark.parametrize("path", [RULES, RULE_TESTS, DASHBOARD], ids=lambda p: p.name)
def test_every_metric_referenced_is_exported(path: Path, exported: set[str]) -> None:
    """Expressions, descriptions and test series alike: a name the daemon does not export would be
    an alert that can never fire, or a panel that stays empty."""
    text = path.read_text() if path != DASHBOARD else "\n".join(dashboard_exprs())
    used = set(METRIC_NAME.findall(text))
    assert used, f"no nodemanager_ metric found in {path.name}"
    assert used <= exported, f"{path.name} uses metrics the daemon does not export: {sorted(used - exported)}"


def test_every_rule_is_an_alert_with_a_duration_a_severity_and_what_to_do() -> None:
    blocks = re.split(r"^\s*- alert:", RULES.read_text(), flags=re.M)[1:]
    assert len(blocks) == len(alert_names()) >= 15
    for block in blocks:
        name = block.split()[0]
        assert re.search(r"^\s+for: \d+[smh]\s*$", block, re.M), f"{name}: no for:"
        assert re.search(r"^\s+severity: (critical|warning|info)\s*$", block, re.M), f"{name}: no severity"
        assert re.search(r"^\s+summary: ", block, re.M), f"{name}: no summary"
        assert re.search(r"^\s+description: ", block, re.M), f"{name}: no description"
        assert re.search(r"nodemanager\s+(status|doctor|health)|docs/", block), f"{name}: says not what to do"


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    text = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\S+)\s*\n\s*exp_alerts:\s*\n\s*- exp_labels:", text))
    quiet = set(re.findall(r"alertname: (\S+)\s*\n\s*exp_alerts: \[\]", text))
    names = set(alert_names())
    assert names - firing == set(), "alerts never expected to fire"
    assert names - quiet == set(), "alerts never expected to stay quiet"
    assert (firing | quiet) <= names, "tests of alerts that do not exist"


def test_the_operations_guide_lists_every_alert() -> None:
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert "packaging/prometheus/nodemanager-alerts.yml" in guide
    assert "packaging/grafana/nodemanager-dashboard.json" in guide
    assert [name for name in alert_names() if f"`{name}`" not in guide] == []


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_promtool_test_rules() -> None:
    result = run_promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_dashboard_loads_with_its_variables_and_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    data_panels = [panel for panel in panels if panel["type"] != "row"]
    assert len(data_panels) >= 15
    for panel in data_panels:
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all("$instance" in t["expr"] for t in targets), f"{panel['title']}: not filtered by $instance"
    # what the issue asks the dashboard to show
    exprs = "\n".join(dashboard_exprs())
    for name in ("nodemanager_syncs_total", "nodemanager_sync_duration_seconds_bucket",
                 "nodemanager_last_successful_sync_timestamp_seconds", "nodemanager_slivers", "nodemanager_accounts",
                 "nodemanager_sliver_operation_failures_total", "nodemanager_api_requests_total",
                 "nodemanager_api_request_duration_seconds_bucket", "nodemanager_enforcement_errors_total",
                 "nodemanager_ticket_rejections_total", "nodemanager_sliver_byte_budget", "nodemanager_lease_active",
                 "nodemanager_worker_queue_depth"):
        assert name in exprs, f"the dashboard does not show {name}"


@pytest.mark.skipif(PROMTOOL is None, reason=NO_PROMTOOL)
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, its Grafana variables replaced, as a recording rule that promtool parses."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(dashboard_exprs()):
        promql = expr.replace("$__rate_interval", "5m").replace("$instance", ".+")
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(promql)}"]
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
