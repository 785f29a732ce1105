"""Account backend benchmark (root only): creating 100 slivers vs. a plain useradd loop.

Baseline, in the same run: for 100 users, ``useradd --user-group --create-home`` then ``~/.ssh``
and an ``authorized_keys`` file written and chowned from Python: the least a script can do.
Measured: one sync cycle that creates the same 100 slivers through the node manager (store,
workers, account backend; keys, start scripts directory, start). Output: ``METRIC`` lines.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodemanager.config import parse_config
from nodemanager.daemon import build_node
from nodemanager.testing.accounts import purge_accounts
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver

COUNT = 100
#: The sliver group of the benchmark's node (removed afterwards, never the real "slivers").
BENCH_GROUP = "nmbenchslv"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchKey{:032d} bench@example.org"


def remove_users(prefix: str) -> None:
    purge_accounts(prefix)


def baseline(home_root: Path, prefix: str) -> float:
    start = time.perf_counter()
    for i in range(COUNT):
        name = f"{prefix}{i}"
        home = home_root / name
        subprocess.run(["useradd", "--user-group", "--create-home", "--home-dir", str(home),
                        "--shell", "/bin/bash", name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
        ssh = home / ".ssh"
        ssh.mkdir(mode=0o700)
        (ssh / "authorized_keys").write_text(KEY.format(i) + "\n")
        for path in (ssh, ssh / "authorized_keys"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    elapsed = time.perf_counter() - start
    remove_users(prefix)
    return elapsed


def nodemanager(home_root: Path, prefix: str, data: Path) -> float:
    """One sync cycle creating COUNT slivers, through the node as the daemon builds it (account
    backend; resource enforcement off: this measures accounts, not cgroups or disk images)."""
    config = parse_config({
        "node": {"data_dir": str(data / "data"), "log_file": ""},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": prefix, "stop_grace": 1,
                    "keys_dir": str(home_root / "keys"), "group": BENCH_GROUP},
    })
    authority = FakeAuthority()
    authority.publish([make_sliver(f"site_b{i}", keys=[KEY.format(i)], slice_id=i + 1) for i in range(COUNT)])
    node = build_node(config, fetch=authority.fetch, tickets=None, enforcement=None)
    node.start(serve=False)
    try:
        start = time.perf_counter()
        outcome = node.sync_once(wait=True)
        elapsed = time.perf_counter() - start
        created = sum(1 for s in node.store.accounts().values() if s.owned and s.uid is not None)
        assert created == COUNT, f"{created} of {COUNT} created: {outcome.summary()}"
        return elapsed
    finally:
        node.close()
        remove_users(prefix)


def main() -> int:
    logging.disable(logging.CRITICAL)  # the node's log (e.g. sshd not set up for a bench group)
    if os.geteuid() != 0:
        print("# accounts benchmark skipped: needs root", flush=True)
        return 0
    base_dir = Path(tempfile.mkdtemp(prefix="nm-bench-", dir="/var/tmp"))
    os.chmod(base_dir, 0o755)
    try:
        runs_base, runs_nm = [], []
        for _ in range(3):
            runs_base.append(baseline(base_dir, "nmbb"))
            with tempfile.TemporaryDirectory() as data:
                runs_nm.append(nodemanager(base_dir, "nmbn", Path(data)))
        base, ours = statistics.median(runs_base), statistics.median(runs_nm)
        print(f"METRIC create100_baseline_s {base:.4g} s")
        print(f"METRIC create100_s {ours:.4g} s")
        print(f"METRIC create100_ratio {ours / base:.4g} ratio", flush=True)
    finally:
        remove_users("nmbb")
        remove_users("nmbn")
        subprocess.run(["groupdel", BENCH_GROUP], capture_output=True, check=False)
        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
