"""kill -9 of ``nodemanager run`` at random points during syncs and API calls, 20+ times.

Real accounts (prefix ``nmf``), a ``file://`` slivers.json of ~20 slivers that changes a little
before every start, and a thread firing ``GetXIDs`` and ``SetLoans`` at the daemon's Unix socket
while it runs. After the last kill a ``sync --once`` must converge:

* the accounts are exactly the document's, with unique uids matching the store's;
* nothing was created twice: every name is used at most once in the whole run, and the log shows
  at most one ``event=created`` per name and no ``event=recreated``;
* every loan acknowledged with 1 is present (or a later one sent to the same lender, whose
  answer the kill cut off);
* the safety valve holds nothing (every change was small) and a second cycle finds nothing to do.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.api.client import local_proxy
from nodemanager.store import Store
from nodemanager.testing.accounts import account_entries, purge_accounts, removed_group
from nodemanager.testing.daemonproc import (
    run_nodemanager,
    start_nodemanager,
    write_daemon_config,
    write_slivers_document,
)

pytestmark = [
    pytest.mark.root, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates real accounts"),
]

PREFIX = "nmf"
ITERATIONS = 20
BUDGET_S = 90.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKillNineKey{:032d} k@test"
STABLE = [f"site_lend{i}" for i in range(4)]  # lenders and recipients; never removed


def write_doc(path: Path, names: list[str], timestamp: int) -> None:
    write_slivers_document(path, names, timestamp, key_template=KEY, attributes={"nm_cpu_share": "4"})


@pytest.fixture
def node(short_dir: Path, home_root: Path) -> Iterator[tuple[Path, Path, Path]]:
    purge_accounts(PREFIX + "site_")
    doc = short_dir / "slivers.json"
    with removed_group(PREFIX + "slivers") as group:
        config = write_daemon_config(short_dir, doc, unix_socket=str(short_dir / "api.sock"), slivers={
            "home_root": str(home_root), "name_prefix": PREFIX, "workers": 4, "stop_grace": 1, "group": group})
        yield doc, config, short_dir
        purge_accounts(PREFIX + "site_")


class ApiClient(threading.Thread):
    """GetXIDs and SetLoans in a loop until stopped; every SetLoans is recorded before it is sent
    (``sent``) and marked acknowledged when it returned 1."""

    def __init__(self, socket_path: Path, rng: random.Random, sent: dict[str, list[list[object]]],
                 counter: list[int]) -> None:
        super().__init__(daemon=True)
        self.socket_path, self.rng, self.sent, self.counter = socket_path, rng, sent, counter
        self.stop = threading.Event()
        self.answered = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with local_proxy(self.socket_path, timeout=3) as proxy:
                    while not self.stop.is_set():
                        if self.rng.random() < 0.5:
                            assert isinstance(proxy.GetXIDs(), dict)
                        else:
                            lender, recipient = self.rng.sample(STABLE, 2)
                            self.counter[0] += 1
                            entry: list[object] = [self.counter[0], False]
                            self.sent.setdefault(lender, []).append(entry)
                            loans = [[recipient, "nm_cpu_share", self.counter[0]]]
                            if proxy.SetLoans(lender, loans) == 1:
                                entry[1] = True
                        self.answered += 1
            except (OSError, xmlrpc.client.Error):
                time.sleep(0.02)  # not up yet, killed, or the lender not synced yet: retry


def test_kill_9_during_syncs_and_api_calls(node: tuple[Path, Path, Path]) -> None:
    doc, config, base = node
    rng = random.Random(0x6B696C6C)
    fresh = (f"site_k{i:03d}" for i in range(1000))  # a name is never used twice
    current = STABLE + [next(fresh) for _ in range(16)]
    timestamp = 1000
    sent: dict[str, list[list[object]]] = {}
    counter = [0]
    answered = 0
    started = time.monotonic()
    iterations = 0
    while iterations < ITERATIONS and time.monotonic() - started < BUDGET_S:
        changing = [n for n in current if n not in STABLE]
        removed = set(rng.sample(changing, 2))
        current = [n for n in current if n not in removed] + [next(fresh), next(fresh)]
        timestamp += 10
        write_doc(doc, current, timestamp)
        daemon = start_nodemanager(config, "run", "--quiet")
        client = ApiClient(base / "api.sock", rng, sent, counter)
        client.start()
        try:
            time.sleep(rng.uniform(0.3, 1.6))
            assert daemon.poll() is None, "the daemon exited on its own"
        finally:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait(10)
            client.stop.set()
            client.join(10)
        answered += client.answered
        iterations += 1
    assert iterations >= ITERATIONS, f"only {iterations} iterations in {BUDGET_S:.0f} s"
    assert answered > 0 and any(e[1] for entries in sent.values() for e in entries)

    result = run_nodemanager(config, "sync", "--once", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    again = run_nodemanager(config, "sync", "--once", timeout=180)
    assert again.returncode == 0 and "no changes" in again.stdout, again.stdout + again.stderr[-3000:]

    expected = {PREFIX + n for n in current}
    accounts = account_entries(PREFIX + "site_")
    assert set(accounts) == expected
    assert len({p.uid for p in accounts.values()}) == len(accounts)
    log = (base / "nm.log").read_text()
    created = Counter(re.findall(r"sliver=(\S+) event=created account=", log))  # one line per useradd
    assert created and not [n for n, c in created.items() if c > 1], created
    assert "event=recreated" not in log
    with Store(base / "data" / "nodemanager.sqlite") as store:
        states = store.accounts()
        assert {PREFIX + n for n, s in states.items() if s.owned} == expected
        assert all(states[n].uid == accounts[PREFIX + n].uid for n in current)
        assert not [n for n, s in states.items() if s.failures or s.last_error]
        assert store.valve().held == frozenset()
        loans = store.loans()
    for lender, entries in sent.items():
        acked = [i for i, (_, ok) in enumerate(entries) if ok]
        if not acked:
            continue
        allowed = {amount for amount, _ in entries[acked[-1]:]}
        stored = loans.get(lender, ())
        assert len(stored) == 1 and stored[0].amount in allowed, (lender, stored, entries[acked[-1]:])
