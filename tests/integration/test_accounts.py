"""Real accounts (root): homes, keys, link attacks, start/stop as the sliver user, destroy, conflicts.

Every account made here is named ``nmtit_...``; the ``backend`` fixture kills their processes and
removes them (with group and home) after each test, even when it fails. The backend has a private
keys directory, sliver group and uid base (``testing.accounts``). Scripts run by slivers are
``/bin/sh`` scripts: root's own python may not be executable by other users.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.backends.account import MANAGED_GECOS, AccountBackend
from nodemanager.core.errors import AccountConflict, BackendError
from nodemanager.core.records import PLC_INSTANTIATED, Sliver
from nodemanager.host import Host
from nodemanager.testing.accounts import private_keys_dir, purge_account, removed_group, uid_base_for_tests
from nodemanager.testing.backend_contract import wait_for

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real accounts")]

PREFIX = "nmt"
KEYS = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIntegrationKey1 a@example", "ssh-rsa AAAAB3IntegrationKey2 b@example")
_names = itertools.count()


def make_sliver(name: str, **changes: object) -> Sliver:
    """A sliver of its own slice (the slice id is derived from the name)."""
    slice_id = zlib.crc32(name.encode()) % 10**6
    fields: dict[str, object] = dict(name=name, slice_id=slice_id, instantiation=PLC_INSTANTIATED, expires=2**31 - 1,
                                     timestamp=1, keys=KEYS)
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


_purge = purge_account


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        _purge(PREFIX + name)
    for entry in Host().all_users():  # anything left over by an earlier, interrupted run of this module
        if entry.name.startswith(PREFIX + "it_") and entry.gecos == MANAGED_GECOS:
            _purge(entry.name)


@pytest.fixture(scope="module")
def keys_and_group() -> Iterator[tuple[Path, str]]:
    with private_keys_dir() as keys_dir, removed_group(f"{PREFIX}it{os.getpid() % 100000}") as group:
        yield keys_dir, group


@pytest.fixture
def backend(home_root: Path, names: list[str], keys_and_group: tuple[Path, str]) -> AccountBackend:
    keys_dir, group = keys_and_group
    return AccountBackend(Host(), home_root=home_root, shell="/bin/sh", name_prefix=PREFIX, stop_grace=1.0,
                          uid_base=uid_base_for_tests(), keys_dir=keys_dir, group=group)


def keys_of(backend: AccountBackend, sliver: Sliver) -> Path:
    return backend.keys_dir / (PREFIX + sliver.name)


@pytest.fixture
def sliver(backend: AccountBackend, names: list[str]) -> Sliver:
    name = f"it_{os.getpid() % 10000}x{next(_names)}"
    names.append(name)
    return make_sliver(name)


def _shadow(account: str) -> list[str]:
    out = subprocess.run(["getent", "shadow", account], capture_output=True, check=True, text=True).stdout
    return out.strip().split(":")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_create_makes_account_group_and_private_home(backend: AccountBackend, sliver: Sliver) -> None:
    uid = backend.create(sliver)
    account = PREFIX + sliver.name
    home = backend.home_of(sliver.name)
    info = home.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == uid
    assert subprocess.run(["id", "-u", account], capture_output=True, text=True).stdout.strip() == str(uid)
    group = subprocess.run(["getent", "group", account], capture_output=True, text=True).stdout.strip().split(":")
    # the group gets the uid's number (README): useradd alone would pick one below login.defs' GID_MAX
    assert group[2] == str(uid) and info.st_gid == uid
    assert _shadow(account)[1] == "*"
    passwd = subprocess.run(["getent", "passwd", account], capture_output=True, text=True).stdout.strip().split(":")
    assert passwd[4] == MANAGED_GECOS and passwd[5] == str(home) and passwd[6] == "/bin/sh"


def test_keys_are_written_with_owner_and_modes_and_replaced_atomically(backend: AccountBackend, sliver: Sliver) -> None:
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    keys = keys_of(backend, sliver)
    assert keys.read_text() == "".join(k + "\n" for k in KEYS)
    assert (keys.stat().st_uid, stat.S_IMODE(keys.stat().st_mode)) == (0, 0o644)
    assert (keys.parent.stat().st_uid, stat.S_IMODE(keys.parent.stat().st_mode)) == (0, 0o755)
    assert not (backend.home_of(sliver.name) / ".ssh").exists()  # the home's ~/.ssh is the sliver's business
    with keys.open("rb") as held:  # a reader holding the old file sees the old content whole
        backend.configure(make_sliver(sliver.name, keys=KEYS[1:]), {})
        assert held.read() == "".join(k + "\n" for k in KEYS).encode()
    assert keys.read_text() == KEYS[1] + "\n"
    assert sorted(p.name for p in keys.parent.iterdir()) == [PREFIX + sliver.name]
    assert uid == backend.uid_base + sliver.slice_id


def test_planted_links_are_not_followed(backend: AccountBackend, sliver: Sliver) -> None:
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    home = backend.home_of(sliver.name)
    passwd = Path("/etc/passwd")
    before = (_sha(passwd), passwd.stat().st_mode, passwd.stat().st_uid)
    initscript = home / ".nodemanager" / "initscript"
    initscript.symlink_to(passwd)
    os.lchown(initscript, uid, uid)
    backend.configure(make_sliver(sliver.name, initscript="#!/bin/sh\necho hi\n"), {})
    assert not initscript.is_symlink() and initscript.read_text() == "#!/bin/sh\necho hi\n"
    log = home / ".nodemanager" / "start.log"
    log.symlink_to(passwd)
    os.lchown(log, uid, uid)
    backend.start(make_sliver(sliver.name, initscript="#!/bin/sh\necho logged\n"))
    assert wait_for(lambda: not log.is_symlink() and "logged" in log.read_text())
    assert not log.is_symlink() and log.stat().st_uid == uid
    assert (_sha(passwd), passwd.stat().st_mode, passwd.stat().st_uid) == before


def test_a_linked_directory_in_the_home_is_refused(backend: AccountBackend, sliver: Sliver, tmp_path: Path) -> None:
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    nm_dir = backend.home_of(sliver.name) / ".nodemanager"
    subprocess.run(["rm", "-rf", str(nm_dir)], check=True)
    nm_dir.symlink_to(tmp_path)
    os.lchown(nm_dir, uid, uid)
    with pytest.raises(BackendError, match=rf"sliver {sliver.name}: .*refusing to follow symbolic link"):
        backend.configure(make_sliver(sliver.name, initscript="echo x"), {})
    assert list(tmp_path.iterdir()) == []
    assert keys_of(backend, sliver).read_text() == "".join(k + "\n" for k in KEYS)  # the keys step still ran


def test_start_runs_scripts_as_the_sliver_detached(backend: AccountBackend, sliver: Sliver) -> None:
    script = '#!/bin/sh\nid -u > "$HOME/init-uid"\nid -G > "$HOME/init-groups"\necho init-ran\nexec sleep 30\n'
    sliver = make_sliver(sliver.name, initscript=script)
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    home = backend.home_of(sliver.name)
    extra = home / ".nodemanager" / "start.d" / "10-extra"
    extra.write_text('#!/bin/sh\nid -un > "$HOME/extra-user"\nsleep 30\n')
    os.chown(extra, uid, uid)
    extra.chmod(0o755)
    began = time.monotonic()
    backend.start(sliver)
    assert time.monotonic() - began < 5
    assert wait_for(lambda: (home / "init-uid").exists() and (home / "extra-user").exists())
    assert wait_for(lambda: (home / "init-uid").read_text().strip() != "")
    assert (home / "init-uid").read_text().strip() == str(uid)
    assert wait_for(lambda: (home / "extra-user").read_text().strip() != "")
    assert (home / "extra-user").read_text().strip() == PREFIX + sliver.name
    assert "0" not in (home / "init-groups").read_text().split()  # no root supplementary groups
    assert "init-ran" in (home / ".nodemanager" / "start.log").read_text()
    assert backend.is_running(sliver.name)
    backend.stop(sliver.name)
    assert Host().pids_of_uid(uid) == []


def test_stop_ends_stubborn_and_forking_processes(backend: AccountBackend, sliver: Sliver) -> None:
    script = (
        "#!/bin/sh\n"
        "sleep 1000 &\n"
        "(trap '' TERM; exec sleep 1000) &\n"
        "i=0\n"
        "while :; do sleep 100 & i=$((i+1)); [ $i -gt 300 ] && sleep 0.02; done\n"
    )
    sliver = make_sliver(sliver.name, initscript=script)
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    backend.start(sliver)
    host = Host()
    assert wait_for(lambda: len(host.pids_of_uid(uid)) > 100)
    backend.stop(sliver.name)
    assert host.pids_of_uid(uid) == []
    time.sleep(0.3)
    assert host.pids_of_uid(uid) == []
    assert not backend.is_running(sliver.name)


def test_destroy_removes_account_group_home_and_processes(backend: AccountBackend, sliver: Sliver) -> None:
    sliver = make_sliver(sliver.name, initscript="#!/bin/sh\nexec sleep 1000\n")
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    backend.start(sliver)
    host = Host()
    assert wait_for(lambda: bool(host.pids_of_uid(uid)))
    home = backend.home_of(sliver.name)
    backend.destroy(sliver.name)
    account = PREFIX + sliver.name
    assert host.getpwnam(account) is None and host.getgrnam(account) is None
    assert not home.exists()
    assert host.pids_of_uid(uid) == []
    backend.destroy(sliver.name)


def test_existing_foreign_user_is_never_touched(backend: AccountBackend, sliver: Sliver) -> None:
    account = PREFIX + sliver.name
    home = backend.home_of(sliver.name)
    subprocess.run(["useradd", "--create-home", "--home-dir", str(home), "--comment", "a human", account], check=True)
    (home / "thesis.txt").write_text("years of work")
    before = subprocess.run(["getent", "passwd", account], capture_output=True, text=True).stdout
    with pytest.raises(AccountConflict, match=rf"{account}.*not created by the node manager"):
        backend.create(sliver)
    assert subprocess.run(["getent", "passwd", account], capture_output=True, text=True).stdout == before
    assert (home / "thesis.txt").read_text() == "years of work"
    assert not backend.observe()[sliver.name].managed_marker


def test_disabled_sliver_is_locked_and_keyless_until_enabled(backend: AccountBackend, sliver: Sliver) -> None:
    backend.create(sliver)
    backend.configure(sliver, {"nm_enabled": 0})
    account = PREFIX + sliver.name
    keys = keys_of(backend, sliver)
    assert keys.read_bytes() == b""
    shadow = _shadow(account)
    assert shadow[1].startswith("!") and shadow[7] == "1"
    backend.configure(sliver, {"nm_enabled": 1})
    assert _shadow(account)[1] == "*" and _shadow(account)[7] == ""
    assert keys.read_text() == "".join(k + "\n" for k in KEYS)


def test_a_vanished_account_is_created_again_with_its_home(backend: AccountBackend, sliver: Sliver) -> None:
    backend.create(sliver)
    backend.configure(sliver, {})
    account = PREFIX + sliver.name
    subprocess.run(["userdel", account], check=True, capture_output=True)  # drift: home left behind
    assert backend.lookup(sliver.name) is None
    uid = backend.create(sliver)
    backend.configure(sliver, {})
    keys = keys_of(backend, sliver)
    assert backend.home_of(sliver.name).stat().st_uid == uid and keys.stat().st_uid == 0
    assert keys.read_text() == "".join(k + "\n" for k in KEYS)


def test_parallel_workers_create_and_destroy_without_lock_errors(backend: AccountBackend, names: list[str]) -> None:
    slivers = [make_sliver(f"it_{os.getpid() % 10000}p{i}") for i in range(8)]
    names.extend(s.name for s in slivers)
    errors: list[BaseException] = []

    def lifecycle(sliver: Sliver) -> None:
        try:
            backend.create(sliver)
            backend.configure(sliver, {"nm_enabled": 0})
            backend.configure(sliver, {"nm_enabled": 1})
            backend.destroy(sliver.name)
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=lifecycle, args=(s,)) for s in slivers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert not set(backend.observe()) & {s.name for s in slivers}
