"""Change-to-login benchmark (root only): from an edit of the authority's data to an SSH login.

What runs, all real: the bundled authority (``nodemanager authority serve``) on a TOML data file;
a node manager daemon (``nodemanager run`` as a subprocess, account backend, accounts named with a
benchmark prefix, resource enforcement off: this measures propagation and accounts, not cgroups or
disk images) polling it once an hour, so that only blocking queries bring a change early; and a
private sshd reading the node's keys directory for the sliver group, as on a node.

Each change adds one slice, with a freshly generated ed25519 key, to the authority's data file
(written atomically). Measured from the write to (a) the sliver's account existing
(``pwd.getpwnam`` every 10 ms) and (b) a successful ``ssh -i key account@127.0.0.1 true`` with
the new key (retried every 50 ms). Then the same with polling only (``blocking_wait = 0``, a
30 s poll period) over a few changes: the baseline of the same run.

Output (``METRIC`` lines): ``change_to_account_{p50,p99}_s``, ``change_to_login_{p50,p99}_s``
(issue targets: p99 <= 2 s and <= 5 s), the polling baseline's p50s and the ratios. Every
account, home, group, key and process it made is removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from nodemanager.testing.accounts import private_keys_dir, purge_accounts, uid_base_for_tests
from nodemanager.testing.daemonproc import SOURCE_ROOT
from nodemanager.testing.sshd import PrivateSshd, free_port, make_client_key, sshd_available

#: Account prefix and sliver group of the benchmark's node (never the real "slivers").
PREFIX = "nmchg"
GROUP = "nmchgslv"
NODE_ID = 1
NODE_KEY = "change-bench-node-key"
ACCOUNT_POLL_S = 0.01
LOGIN_RETRY_S = 0.05
#: Longest one change may take before the run is declared failed (the polling baseline's period
#: is 30 s; twice that plus the login).
GIVE_UP_S = 90.0


@dataclass
class Sample:
    account_s: float
    login_s: float


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}


def _nodemanager(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "nodemanager", *args], env=_env(),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _wait_listening(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


class AuthorityData:
    """The authority's data file: one node, the slices added so far (each with its own key)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.slices: list[dict[str, object]] = []

    def write(self) -> None:
        data = {"nodes": [{"id": NODE_ID, "key": NODE_KEY}], "slices": self.slices}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(data))
        os.replace(tmp, self.path)  # atomic: the authority never reads half a file

    def add(self, name: str, slice_id: int, key: str) -> None:
        self.slices.append({"name": name, "id": slice_id, "nodes": [NODE_ID], "keys": [key]})
        self.write()


def _account_exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True


def _login(sshd: PrivateSshd, key: Path, account: str) -> bool:
    argv = ["ssh", *sshd.ssh_options(key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            f"{account}@127.0.0.1", "true"]
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False).returncode == 0


def one_change(data: AuthorityData, sshd: PrivateSshd, keys: Path, number: int, slice_id: int) -> Sample:
    """Add slice ``number`` and time its account and its first login from the write."""
    name = f"bench_c{number}"
    account = PREFIX + name
    key, public = make_client_key(keys, f"id_{number}")
    start = time.monotonic()
    data.add(name, slice_id, public)
    account_s = login_s = None
    while account_s is None:
        if _account_exists(account):
            account_s = time.monotonic() - start
        elif time.monotonic() - start > GIVE_UP_S:
            raise RuntimeError(f"change {number}: no account {account} after {GIVE_UP_S:g} s")
        else:
            time.sleep(ACCOUNT_POLL_S)
    while login_s is None:
        if _login(sshd, key, account):
            login_s = time.monotonic() - start
        elif time.monotonic() - start > GIVE_UP_S:
            raise RuntimeError(f"change {number}: no login as {account} after {GIVE_UP_S:g} s;\n{sshd.log()[-2000:]}")
        else:
            time.sleep(LOGIN_RETRY_S)
    return Sample(account_s, login_s)


def _node_config(base: Path, keys_dir: Path, home_root: Path, url: str, *, blocking_wait: int,
                 poll_interval: int) -> Path:
    (base / "node_id").write_text(f"{NODE_ID}\n")
    (base / "node_key").write_text(f"{NODE_KEY}\n")
    config = base / "nm.toml"
    config.write_text(tomli_w.dumps({
        "node": {"data_dir": str(base / "data"), "log_file": str(base / "nm.log")},
        "authority": {"url": url, "node_id_file": str(base / "node_id"), "node_key_file": str(base / "node_key"),
                      "poll_interval": poll_interval, "poll_jitter": 0, "timeout": 10,
                      "blocking_wait": blocking_wait},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": PREFIX, "stop_grace": 1, "shell": "/bin/sh",
                    "uid_base": uid_base_for_tests(), "keys_dir": str(keys_dir), "group": GROUP},
        "enforce": {"cpu": False, "memory": False, "bandwidth": False, "disk": False},
    }))
    return config


@contextmanager
def node_and_authority(root: Path, keys_dir: Path, *, blocking_wait: int, poll_interval: int,
                       label: str) -> Iterator[tuple[AuthorityData, Path]]:
    """The bundled authority (no slices yet) and a daemon polling it; yields the data file and
    the daemon's log. Both processes are stopped on the way out."""
    base = root / label
    base.mkdir(mode=0o755)
    home_root = root / "home"
    home_root.mkdir(mode=0o755, exist_ok=True)
    data = AuthorityData(base / "authority.toml")
    data.write()
    port = free_port()
    authority = daemon = None
    try:
        authority = _nodemanager("authority", "serve", "--data", str(data.path), "--listen", f"127.0.0.1:{port}",
                                 log=base / "authority.log")
        _wait_listening(port, authority, "the bundled authority")
        config = _node_config(base, keys_dir, home_root, f"http://127.0.0.1:{port}/PLCAPI/",
                              blocking_wait=blocking_wait, poll_interval=poll_interval)
        daemon = _nodemanager("-c", str(config), "run", "--quiet", log=base / "daemon.out")
        log = base / "nm.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and "event=sync-done" in log.read_text(errors="replace")):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not complete its first sync:\n"
                                   f"{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
            time.sleep(0.05)
        if blocking_wait:
            while "event=authority-watching" not in log.read_text(errors="replace"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the daemon never started watching the authority")
                time.sleep(0.05)
        yield data, log
    finally:
        _stop(daemon)
        _stop(authority)


def run_series(root: Path, keys_dir: Path, sshd: PrivateSshd, client_keys: Path, *, count: int,
               blocking_wait: int, poll_interval: int, label: str, first_id: int, spread: float) -> list[Sample]:
    """``count`` changes, each after a random pause of 0..``spread`` seconds: a polling node's
    latency depends on where in its period a change falls, and a change made right after the
    previous one's login would always fall just after a poll (the worst case, not the mean)."""
    samples = []
    with node_and_authority(root, keys_dir, blocking_wait=blocking_wait, poll_interval=poll_interval,
                            label=label) as (data, _log):
        for i in range(count):
            time.sleep(random.uniform(0, spread))
            samples.append(one_change(data, sshd, client_keys, first_id + i, first_id + i))
    return samples


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (p99 of 20 values is the largest: no interpolation flatters it)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def cleanup() -> None:
    purge_accounts(PREFIX)
    subprocess.run(["groupdel", GROUP], capture_output=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20, help="changes with blocking queries (default 20)")
    parser.add_argument("--baseline-changes", type=int, default=3, help="changes with polling only (default 3)")
    parser.add_argument("--poll-interval", type=int, default=30, help="the baseline's poll period (default 30 s)")
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    reason = "needs root (real accounts, a private sshd)" if os.geteuid() != 0 else sshd_available()
    if reason is not None:
        print(f"# change-to-login benchmark skipped: {reason}", flush=True)
        return 0
    root = Path(tempfile.mkdtemp(prefix="nm-change-bench-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    cleanup()
    try:
        with private_keys_dir() as keys_dir, PrivateSshd(use_pam=True, keys_dir=keys_dir, sliver_group=GROUP) as sshd:
            client_keys = root / "client-keys"
            client_keys.mkdir(mode=0o700)
            watched = run_series(root, keys_dir, sshd, client_keys, count=args.changes, blocking_wait=300,
                                 poll_interval=3600, label="blocking", first_id=1, spread=0.5)
            polled = run_series(root, keys_dir, sshd, client_keys, count=args.baseline_changes, blocking_wait=0,
                                poll_interval=args.poll_interval, label="polling", first_id=1001,
                                spread=float(args.poll_interval))
    finally:
        cleanup()
        shutil.rmtree(root, ignore_errors=True)
    account = [s.account_s for s in watched]
    login = [s.login_s for s in watched]
    base_account = [s.account_s for s in polled]
    base_login = [s.login_s for s in polled]
    print(f"# {len(watched)} changes with blocking queries; baseline: {len(polled)} changes polled every "
          f"{args.poll_interval} s (no jitter), each change at a random point of the period", flush=True)
    print(f"METRIC change_to_account_p50_s {statistics.median(account):.3f} s")
    print(f"METRIC change_to_account_p99_s {percentile(account, 0.99):.3f} s")
    print(f"METRIC change_to_login_p50_s {statistics.median(login):.3f} s")
    print(f"METRIC change_to_login_p99_s {percentile(login, 0.99):.3f} s")
    print(f"METRIC change_to_account_polling_p50_s {statistics.median(base_account):.3f} s")
    print(f"METRIC change_to_login_polling_p50_s {statistics.median(base_login):.3f} s")
    ratio = statistics.median(base_login) / statistics.median(login)
    print(f"METRIC change_to_login_polling_vs_blocking {ratio:.3g} ratio", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
