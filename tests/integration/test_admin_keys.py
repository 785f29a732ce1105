"""The ``admin_keys`` handler as root against real accounts, real links and a real sshd.

Each test makes its own ``nmk…`` account (home under a root-owned 0755 directory outside /tmp)
and removes it afterwards. Root's own ``authorized_keys`` is never touched: the managed accounts
are the test accounts only.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from nodemanager.adminkeys import AdminKeys, load_outcomes
from nodemanager.config import parse_config
from nodemanager.core.adminkeys import render_block, split_keys_file
from nodemanager.core.records import AuthorityDocument
from nodemanager.daemon import build_node
from nodemanager.datadir import Meta
from nodemanager.host import Host, PasswdEntry
from nodemanager.store import Store
from nodemanager.testing.accounts import purge_account, uid_base_for_tests
from nodemanager.testing.sshd import PrivateSshd, make_client_key, sshd_available

pytestmark = pytest.mark.root

K1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyOne000000000000000000000000 admin1@plc"
K2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyTwo000000000000000000000000 admin2@plc"
MINE = b"# my own\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKey000000000000000000000000 me@laptop\n"
_serial = count()


@pytest.fixture
def account(home_root: Path) -> Iterator[PasswdEntry]:
    """A fresh account ``nmk<pid><n>`` with its home (0700) under ``home_root``; removed afterwards."""
    name = f"nmk{os.getpid() % 100000}x{next(_serial)}"
    try:
        subprocess.run(["useradd", "--create-home", "--home-dir", str(home_root / name), "--user-group",
                        "--shell", "/bin/sh", name], check=True, capture_output=True)
        subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)  # no password, not locked
        entry = Host().getpwnam(name)
        assert entry is not None
        yield entry
    finally:
        purge_account(name)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "nm.sqlite")
    store.open()
    yield store
    store.close()


def doc(accounts: object, timestamp: int = 100) -> AuthorityDocument:
    return AuthorityDocument(timestamp=timestamp, node_id=1, slivers=(),
                             members={} if accounts is None else {"accounts": accounts})


def keys_path(entry: PasswdEntry) -> Path:
    return Path(entry.home) / ".ssh" / "authorized_keys"


def problem_of(store: Store, name: str) -> str:
    return load_outcomes(store.get_meta(Meta.ADMIN_KEYS))[name].problem


def test_block_written_beside_operator_keys_owned_by_the_account(account: PasswdEntry, store: Store) -> None:
    handler = AdminKeys(Host(), store, [account.name])
    handler.apply(doc([{"name": account.name, "keys": [K1]}]))
    path = keys_path(account)
    ssh_dir = os.lstat(path.parent)
    assert (ssh_dir.st_uid, ssh_dir.st_gid, ssh_dir.st_mode & 0o7777) == (account.uid, account.gid, 0o700)
    info = os.lstat(path)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (account.uid, account.gid, 0o600)
    assert path.read_bytes() == render_block([K1])
    # the operator adds keys of their own, before and after the block: they survive every change
    path.write_bytes(MINE + path.read_bytes() + MINE)
    handler.apply(doc([{"name": account.name, "keys": [K2, K1]}], 200))
    assert path.read_bytes() == MINE + render_block([K2, K1]) + MINE
    handler.apply(doc([{"name": account.name, "keys": [K2]}], 300))
    assert path.read_bytes() == MINE + render_block([K2]) + MINE
    assert not [n for n in os.listdir(path.parent) if n != "authorized_keys"]  # no temporary file left


def test_symlinked_ssh_dir_is_never_followed(account: PasswdEntry, store: Store, home_root: Path) -> None:
    target = home_root / "root-owned-ssh"
    target.mkdir(mode=0o700)
    (target / "authorized_keys").write_bytes(b"root's own\n")
    os.symlink(target, Path(account.home) / ".ssh")
    os.lchown(Path(account.home) / ".ssh", account.uid, account.gid)
    AdminKeys(Host(), store, [account.name]).apply(doc([{"name": account.name, "keys": [K1]}]))
    assert (target / "authorized_keys").read_bytes() == b"root's own\n"
    assert sorted(os.listdir(target)) == ["authorized_keys"]
    assert os.path.islink(Path(account.home) / ".ssh")
    assert "is a symlink, not a directory; left alone" in problem_of(store, account.name)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_linked_authorized_keys_is_never_followed_nor_read(account: PasswdEntry, store: Store, home_root: Path,
                                                           kind: str) -> None:
    secret = home_root / "shadow-like"
    secret.write_bytes(b"root:$6$secret:19000::::::\n")
    secret.chmod(0o600)
    ssh_dir = Path(account.home) / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    os.chown(ssh_dir, account.uid, account.gid)
    path = keys_path(account)
    if kind == "symlink":
        os.symlink(secret, path)
        os.lchown(path, account.uid, account.gid)
    else:
        os.link(secret, path)
    AdminKeys(Host(), store, [account.name]).apply(doc([{"name": account.name, "keys": [K1]}]))
    assert secret.read_bytes() == b"root:$6$secret:19000::::::\n"
    assert os.stat(secret).st_uid == 0 and os.stat(secret).st_mode & 0o777 == 0o600
    assert os.path.islink(path) == (kind == "symlink")
    assert sorted(os.listdir(ssh_dir)) == ["authorized_keys"]
    problem = problem_of(store, account.name)
    assert ("is a symlink" in problem) if kind == "symlink" else ("belongs to uid 0" in problem)


def test_swapped_ssh_dir_during_the_walk_is_refused(account: PasswdEntry, store: Store, home_root: Path) -> None:
    """A link planted where the walk goes is refused by the walk itself (not only by the check
    before it): the home belongs to the account."""
    target = home_root / "elsewhere"
    target.mkdir(mode=0o755)
    os.symlink(target, Path(account.home) / ".ssh")
    with pytest.raises(Exception, match="refusing to follow symbolic link"):
        Host().atomic_write(keys_path(account), b"x\n", uid=account.uid, gid=account.gid, mode=0o600)
    assert os.listdir(target) == []


def test_missing_account_is_reported_never_created(store: Store) -> None:
    name = f"nmk{os.getpid() % 100000}none"
    AdminKeys(Host(), store, [name]).apply(doc([{"name": name, "keys": [K1]}]))
    assert Host().getpwnam(name) is None
    assert problem_of(store, name) == f"account {name} does not exist (it is never created)"


def test_empty_or_missing_member_never_empties_and_removal_needs_confirmation(account: PasswdEntry,
                                                                            store: Store) -> None:
    handler = AdminKeys(Host(), store, [account.name], confirm_after=2)
    handler.apply(doc([{"name": account.name, "keys": [K1, K2]}]))
    path = keys_path(account)
    path.write_bytes(MINE + path.read_bytes())
    for timestamp, accounts in enumerate([None, [], None, [{"name": account.name, "keys": []}], None], start=200):
        handler.apply(doc(accounts, timestamp))  # a missing member in between breaks the count
        assert split_keys_file(path.read_bytes()).keys == (K1, K2)
    handler.apply(doc([], 300))
    assert split_keys_file(path.read_bytes()).keys == (K1, K2)  # held: seen once
    handler.apply(doc([], 301))
    assert path.read_bytes() == MINE + render_block([])  # confirmed; the operator's key stays


def _ssh(server: PrivateSshd, key: Path, account: str) -> subprocess.CompletedProcess[bytes]:
    argv = ["ssh", *server.ssh_options(key), "-o", "BatchMode=yes", f"{account}@127.0.0.1", "id -un"]
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


@pytest.mark.skipif(sshd_available() is not None, reason=str(sshd_available()))
def test_a_delivered_key_logs_in_and_a_removed_one_no_longer_does(account: PasswdEntry, store: Store,
                                                                  tmp_path: Path) -> None:
    admin_key, admin_public = make_client_key(tmp_path, "admin")
    mine_key, mine_public = make_client_key(tmp_path, "mine")
    _other_key, other_public = make_client_key(tmp_path, "other")
    handler = AdminKeys(Host(), store, [account.name], confirm_after=2)
    with PrivateSshd(use_pam=True) as server:
        assert _ssh(server, admin_key, account.name).returncode != 0
        handler.apply(doc([{"name": account.name, "keys": [admin_public]}]))
        login = _ssh(server, admin_key, account.name)
        assert login.returncode == 0 and login.stdout.decode().strip() == account.name, server.log()
        path = keys_path(account)
        path.write_bytes(path.read_bytes() + mine_public.encode() + b"\n")  # the operator's own key
        handler.apply(doc([{"name": account.name, "keys": [other_public]}], 200))
        assert _ssh(server, admin_key, account.name).returncode != 0
        assert _ssh(server, mine_key, account.name).returncode == 0, server.log()


def test_sync_through_build_node_with_real_accounts(account: PasswdEntry, tmp_path: Path) -> None:
    """The daemon's own wiring: ``file://`` document -> sync -> handler -> the account's file."""
    document = tmp_path / "slivers.json"
    (tmp_path / "node_id").write_text("1\n")
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"url": f"file://{document}", "node_id_file": str(tmp_path / "node_id"), "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
        "slivers": {"backend": "account", "keys_dir": str(tmp_path / "keys"), "uid_base": uid_base_for_tests()},
        "enforce": {"cpu": False, "memory": False, "bandwidth": False, "disk": False},
        "accounts": {"manage_keys": [account.name]},
    })

    def publish(timestamp: int, keys: list[str]) -> None:
        tmp = document.with_suffix(".tmp")
        tmp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": [],
                                   "accounts": [{"name": account.name, "keys": keys},
                                                {"name": "root", "keys": [K2]}]}))  # root: not managed here
        tmp.replace(document)

    node = build_node(config)
    node.start(serve=False)
    try:
        now = int(time.time())
        publish(now, [K1])
        assert node.sync_once().ok
        assert keys_path(account).read_bytes() == render_block([K1])
        publish(now + 1, [K2])
        assert node.sync_once().ok
        assert keys_path(account).read_bytes() == render_block([K2])
    finally:
        node.close()


def test_the_account_itself_racing_its_ssh_dir_never_gets_root_to_write_elsewhere(
        account: PasswdEntry, store: Store, home_root: Path) -> None:
    """The attacker is the managed account (site_admin is a person, not root): running as its own
    uid, it swaps ``~/.ssh`` between a real directory and a link to a root-owned directory as fast
    as it can while the handler writes the block again and again. Root must never write through
    the link: the root-owned directory stays empty, whatever the interleaving."""
    victim = home_root / "root-owned"
    victim.mkdir(mode=0o755)
    home = Path(account.home)
    swapper = subprocess.Popen(
        ["/bin/sh", "-c", f"cd {home} && while :; do rm -rf .ssh; mkdir .ssh; rm -rf .ssh; ln -s {victim} .ssh; done"],
        user=account.uid, group=account.gid, extra_groups=[], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    handler = AdminKeys(Host(), store, [account.name])
    try:
        for i in range(150):
            handler.apply(doc([{"name": account.name, "keys": [K1 if i % 2 else K2]}], timestamp=100 + i))
    finally:
        swapper.kill()
        swapper.wait()
    assert os.listdir(victim) == []
    assert os.stat(victim).st_uid == 0 and os.stat(victim).st_mode & 0o777 == 0o755
