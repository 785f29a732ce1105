"""Test helpers for real accounts: find and remove every account of a test prefix.

Integration tests create real Linux accounts with a prefix of their own; whatever happens in the
test, these remove them (processes killed first, repeatedly: a forking sliver must not outlive
it), with their groups, homes and the cgroups enforcement made for them.

They also give each test run what the account backend needs besides homes, so that tests never
touch the node's own: a uid base of their own (:func:`uid_base_for_tests`), a private root-owned keys
directory where sshd's ``StrictModes`` accepts it (:func:`private_keys_dir`: not under a
world-writable ``/tmp``), and a sliver group that is removed afterwards (:func:`removed_group`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..host import Host, PasswdEntry

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Parent of private keys directories: root-owned 0755 all the way up, as sshd's StrictModes needs.
KEYS_PARENT = Path("/var/lib")


def uid_base_for_tests() -> int:
    """A ``uid_base`` for this test process, far from real slivers' (100000 + slice ids) and from
    other test processes', so concurrent runs never derive the same uid."""
    return 1_500_000_000 + (os.getpid() % 500_000) * 1000


@contextmanager
def private_keys_dir() -> Iterator[Path]:
    """A keys directory path (not yet created: the backend makes it) inside a fresh root-owned
    0755 directory under ``/var/lib``; everything is removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="nm-test-keys-", dir=KEYS_PARENT))
    try:
        os.chown(parent, 0, 0)
        os.chmod(parent, 0o755)
        yield parent / "authorized_keys"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@contextmanager
def removed_group(name: str) -> Iterator[str]:
    """Yield ``name`` (a sliver group the backend will create); ``groupdel`` it afterwards."""
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True, check=False)


def accounts_with_prefix(prefix: str, host: Host | None = None) -> set[str]:
    """Names of the accounts starting with ``prefix``."""
    return set(account_entries(prefix, host))


def account_entries(prefix: str, host: Host | None = None) -> dict[str, PasswdEntry]:
    """The passwd entries of the accounts starting with ``prefix``, by account name."""
    return {entry.name: entry for entry in (host or Host()).all_users() if entry.name.startswith(prefix)}


def purge_account(account: str, host: Host | None = None) -> None:
    """Kill the account's processes, then remove it, its group, its home and its cgroups."""
    host = host or Host()
    entry = host.getpwnam(account)
    if entry is not None and entry.uid != 0:
        unmount_below(Path(entry.home), host)
        for _ in range(40):
            pids = host.pids_of_uid(entry.uid)
            if not pids:
                break
            for pid in pids:
                host.kill(pid, 9)
            time.sleep(0.05)
        host.run(["userdel", "--remove", account], check=False)
    if host.getgrnam(account) is not None:
        host.run(["groupdel", account], check=False)
    for group in CGROUP_ROOT.glob(f"*/nodemanager/{account}"):
        try:
            group.rmdir()
        except OSError:
            pass


def unmount_below(path: Path, host: Host | None = None) -> None:
    """Lazily unmount everything mounted at or below ``path`` (a sliver's disk image), deepest
    first, so that removing the home cannot leave a mount (and its loop device) behind."""
    host = host or Host()
    prefix = str(path).rstrip("/")
    points = [point for point, _ in host.mounts()]
    for point in sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True):
        host.run(["umount", "-l", point], check=False)


def purge_accounts(prefix: str) -> None:
    """Remove every account starting with ``prefix`` (see :func:`purge_account`)."""
    host = Host()
    for account in accounts_with_prefix(prefix, host):
        purge_account(account, host)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


@dataclass(frozen=True)
class ScratchAccount:
    """A real account made for one test: its name, uid and (existing, its own, 0700) home."""

    name: str
    uid: int
    home: Path


@contextmanager
def scratch_accounts(home_root: Path, count: int = 3, prefix: str = "nmx") -> Iterator[list[ScratchAccount]]:
    """``count`` real accounts named ``prefix`` + 6 random hex digits, each with its own group
    and a home under ``home_root``: what the real-kernel enforcement tests run processes as.
    Always removed afterwards, their processes killed first (a lazy unmount of the home too, for
    tests that mounted an image there)."""
    made: list[ScratchAccount] = []
    try:
        for _ in range(count):
            name = f"{prefix}{secrets.token_hex(3)}"
            home = home_root / name
            subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh",
                            "--home-dir", str(home), name], check=True, capture_output=True)
            uid = int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout)
            made.append(ScratchAccount(name, uid, home))
            home.mkdir(mode=0o700)
            os.chown(home, uid, uid)
        yield made
    finally:
        for account in made:
            for _ in range(20):
                if subprocess.run(["pkill", "-KILL", "-u", account.name], capture_output=True, check=False).returncode:
                    break
                time.sleep(0.05)
            subprocess.run(["umount", "-l", str(account.home)], capture_output=True, check=False)
            subprocess.run(["userdel", account.name], capture_output=True, check=False)
