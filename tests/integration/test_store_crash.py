"""kill -9 at random moments never leaves the store half-written.

A child process writes generation after generation: each generation replaces the whole set of
records (a random count, so deletions matter) and the meta counter in ONE ``apply_records`` call,
then writes one account state per slot with ``put_account``. The parent SIGKILLs it at random
moments and checks after each kill that the file passes ``quick_check`` and that the newest
complete generation is exactly what the store holds.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodemanager.store import Store

SRC = Path(__file__).resolve().parents[2] / "src"
ACCOUNT_SLOTS = 8

CHILD = r"""
import random, sys
from pathlib import Path
from nodemanager.core.records import AccountState, Phase, Sliver
from nodemanager.store import Store

SLOTS = int(sys.argv[2])
store = Store(Path(sys.argv[1]))
generation = int(store.get_meta("generation", "0"))
existing = set(store.slivers())


def accounts(gen):
    for slot in range(SLOTS):
        store.put_account(AccountState(
            f"site_acct{slot}", uid=gen, owned=True, phase=Phase.RUNNING, failures=gen,
            last_error=f"generation {gen}", retry_at=float(gen)))


accounts(generation)  # finish what a previous child may have left half-done
print("ready", flush=True)
while True:
    generation += 1
    count = random.randint(1, 1500)
    names = [f"site_s{i}" for i in range(count)]
    records = [
        Sliver(name, generation, "plc-instantiated", 2_000_000_000, generation,
               keys=(f"ssh-ed25519 AAAA{generation} {name}@host",),
               attributes=(("gen", str(generation)), ("vsys", "pl"), ("vsys", "fuse")),
               initscript="#" * random.randint(0, 600))
        for name in names
    ]
    store.apply_records(records, existing - set(names),
                        {"generation": str(generation), "count": str(count)})
    existing = set(names)
    accounts(generation)
"""


def check_consistent(path: Path) -> int:
    """Assert the invariants and return the store's generation."""
    conn = sqlite3.connect(str(path))
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    with Store(path) as store:
        generation = int(store.get_meta("generation", "0"))
        count = int(store.get_meta("count", "0"))
        records = store.slivers()
        accounts = store.accounts()
    assert set(records) == {f"site_s{i}" for i in range(count)}
    for record in records.values():
        assert record.timestamp == generation and record.slice_id == generation
        assert record.attributes[0] == ("gen", str(generation))
        assert record.keys == (f"ssh-ed25519 AAAA{generation} {record.name}@host",)
    # Accounts are written slot by slot after the records: newest first, at most one behind.
    gens = []
    for slot in range(ACCOUNT_SLOTS):
        state = accounts[f"site_acct{slot}"]  # every slot exists before the first "ready"
        assert state.uid == state.failures == int(state.retry_at)
        assert state.last_error == f"generation {state.failures}"
        gens.append(state.failures)
    assert all(g in (generation, generation - 1) for g in gens), (generation, gens)
    assert gens == sorted(gens, reverse=True), gens
    return generation


@pytest.mark.slow
def test_sigkill_never_leaves_a_partial_transaction(tmp_path: Path) -> None:
    path = tmp_path / "data" / "store.db"
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rng = random.Random()
    deadline = time.monotonic() + 20
    kills, generations = 0, [0]
    while kills < 40 and time.monotonic() < deadline:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(ACCOUNT_SLOTS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            assert line == b"ready\n", child.stderr.read() if child.stderr else line
            time.sleep(rng.uniform(0.0, 0.3))
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
        assert child.returncode == -signal.SIGKILL
        kills += 1
        generation = check_consistent(path)
        assert generation >= generations[-1]
        generations.append(generation)
    assert kills >= 20, f"only {kills} kills fitted in the time budget"
    assert generations[-1] > kills, f"too little progress: {generations}"
