"""The hostile-sliver suite, account side: what a sliver with a shell tries, and the promise that
holds afterwards (issue 10, items 2, 5 and 6).

Every sliver here is a real unprivileged account (prefix ``nmch``) made by the real
``AccountBackend``; what the sliver does, it does as its own uid (:func:`as_sliver`), and logins go
through a real private sshd carrying the node's ``Match Group`` block, with ``UsePAM yes`` and
``UsePAM no``. Accounts, groups, keys directories, images and spool files made here are removed
whatever happens. Programs run as a sliver are ``/bin/sh`` scripts (root's python may be private).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import secrets
import shutil
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from nodemanager.backends.account import MANAGED_GECOS, AccountBackend
from nodemanager.backends.sshdconfig import PROBLEM_PREFIX, sshd_problems
from nodemanager.core.errors import AccountConflict, BackendError
from nodemanager.core.records import PLC_INSTANTIATED, Sliver
from nodemanager.enforce.disk import DiskEnforcer
from nodemanager.host import Host, PasswdEntry
from nodemanager.testing.accounts import (
    private_keys_dir,
    purge_account,
    removed_group,
    uid_base_for_tests,
    wait_for,
)
from nodemanager.testing.sshd import PrivateSshd, make_client_key, sshd_available

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real accounts")]

PREFIX = "nmc"
SLEEPER = "#!/bin/sh\nexec sleep 1000\n"
_serial = itertools.count()
needs_sshd = pytest.mark.skipif(sshd_available() is not None, reason=f"no private sshd: {sshd_available()}")


@dataclass
class Node:
    backend: AccountBackend
    made: list[str]

    def sliver(self, keys: tuple[str, ...] = (), **changes: object) -> Sliver:
        """A new sliver of a slice of its own, remembered for clean-up."""
        name = f"h_{os.getpid() % 10000}x{next(_serial)}"
        self.made.append(name)
        fields: dict[str, object] = dict(name=name, slice_id=zlib.crc32(name.encode()) % 10**6,
                                         instantiation=PLC_INSTANTIATED, expires=2**31 - 1, timestamp=1, keys=keys)
        fields.update(changes)
        return Sliver(**fields)  # type: ignore[arg-type]

    def entry(self, sliver: Sliver) -> PasswdEntry:
        entry = Host().getpwnam(PREFIX + sliver.name)
        assert entry is not None
        return entry


@pytest.fixture(scope="module")
def access() -> Iterator[tuple[Path, str]]:
    with private_keys_dir() as keys_dir, removed_group(f"{PREFIX}hs{os.getpid() % 100000}") as group:
        yield keys_dir, group


@pytest.fixture
def node(home_root: Path, access: tuple[Path, str]) -> Iterator[Node]:
    backend = AccountBackend(Host(), home_root=home_root, shell="/bin/sh", name_prefix=PREFIX, stop_grace=1.0,
                             uid_base=uid_base_for_tests(), keys_dir=access[0], group=access[1])
    made: list[str] = []
    try:
        yield Node(backend, made)
    finally:
        for name in made:
            purge_account(PREFIX + name)
        for entry in Host().all_users():  # an interrupted earlier run of this module
            if entry.name.startswith(PREFIX + "h_") and entry.gecos == MANAGED_GECOS:
                purge_account(entry.name)


@pytest.fixture(params=[True, False], ids=["UsePAM-yes", "UsePAM-no"])
def sshd(request: pytest.FixtureRequest, access: tuple[Path, str]) -> Iterator[PrivateSshd]:
    if sshd_available() is not None:
        pytest.skip(f"no private sshd: {sshd_available()}")
    with PrivateSshd(use_pam=request.param, keys_dir=access[0], sliver_group=access[1]) as server:
        yield server


def as_sliver(entry: PasswdEntry, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with ``/bin/sh`` as the sliver itself, in its home."""
    done = subprocess.run(["/bin/sh", "-c", script], user=entry.uid, group=entry.gid, extra_groups=[entry.gid],
                          cwd=entry.home, env={"HOME": entry.home, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=60, check=False)
    assert not check or done.returncode == 0, done.stderr
    return done


def logs_in(sshd: PrivateSshd, account: str, key: Path) -> bool:
    argv = ["ssh", *sshd.ssh_options(key), "-o", "BatchMode=yes", f"{account}@127.0.0.1", "true"]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    return done.returncode == 0


def shadow_fields(account: str) -> tuple[str, str]:
    fields = subprocess.run(["getent", "shadow", account], capture_output=True, check=True,
                            text=True).stdout.strip().split(":")
    return fields[1], fields[7]


# --- disabling and keys always win ----------------------------------------------------------------

SABOTAGE = {
    # authorized_keys made a directory: writing it would fail
    "keys-file-is-a-directory": "rm -rf .ssh && mkdir -p .ssh/authorized_keys && chmod 700 .ssh",
    # ~/.ssh a link to somewhere root must never write
    "ssh-dir-is-a-link": "rm -rf .ssh && ln -s /etc .ssh",
    # the node manager's own directory in the home a link, the home closed: the home step fails
    "home-unusable": "rm -rf .nodemanager && ln -s /etc .nodemanager && chmod 500 .",
}


@needs_sshd
@pytest.mark.parametrize("sabotage", sorted(SABOTAGE))
def test_a_sabotaged_home_cannot_keep_a_disabled_sliver_alive_or_logged_in(
    node: Node, sshd: PrivateSshd, tmp_path: Path, sabotage: str
) -> None:
    key, public = make_client_key(tmp_path)
    sliver = node.sliver((public,), initscript=SLEEPER)
    uid = node.backend.create(sliver)
    node.backend.configure(sliver, {})
    node.backend.start(sliver)
    entry = node.entry(sliver)
    assert logs_in(sshd, entry.name, key), sshd.log()[-2000:]
    as_sliver(entry, "mkdir -p .ssh && cat > .ssh/authorized_keys2 <<EOF\n" + public + "\nEOF\n")
    as_sliver(entry, SABOTAGE[sabotage])
    as_sliver(entry, "setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")  # a process of its own
    assert wait_for(lambda: len(Host().pids_of_uid(uid)) >= 2)
    try:
        node.backend.configure(sliver, {"nm_enabled": 0})
    except BackendError as exc:  # the home step may fail: the operation is retried, access is settled
        assert sabotage == "home-unusable", exc
        assert sliver.name in str(exc)
    assert Host().pids_of_uid(uid) == []
    assert shadow_fields(entry.name) == ("!*", "1")
    assert (node.backend.keys_dir / entry.name).read_bytes() == b""
    assert not logs_in(sshd, entry.name, key)
    node.backend.start(sliver)  # a disabled sliver does not start
    assert not wait_for(lambda: bool(Host().pids_of_uid(uid)), timeout=0.5)


@needs_sshd
def test_a_removed_key_no_longer_logs_in_even_if_the_sliver_kept_a_copy(
    node: Node, sshd: PrivateSshd, tmp_path: Path
) -> None:
    kept, kept_public = make_client_key(tmp_path, "kept")
    removed, removed_public = make_client_key(tmp_path, "removed")
    sliver = node.sliver((kept_public, removed_public))
    node.backend.create(sliver)
    node.backend.configure(sliver, {})
    entry = node.entry(sliver)
    assert logs_in(sshd, entry.name, removed), sshd.log()[-2000:]
    copies = f"{kept_public}\n{removed_public}\n"
    as_sliver(entry, f"mkdir -p .ssh && chmod 700 .ssh && printf '%s' '{copies}' > .ssh/authorized_keys && "
                     "cp .ssh/authorized_keys .ssh/authorized_keys2 && chmod 600 .ssh/authorized_keys*")
    node.backend.configure(replace(sliver, keys=(kept_public,)), {})
    assert logs_in(sshd, entry.name, kept)
    assert not logs_in(sshd, entry.name, removed)


def test_the_private_sshd_passes_the_start_up_check_and_a_stock_one_does_not(node: Node) -> None:
    if sshd_available() is not None:
        pytest.skip(f"no private sshd: {sshd_available()}")
    sliver = node.sliver()
    node.backend.create(sliver)
    account = PREFIX + sliver.name
    with PrivateSshd(keys_dir=node.backend.keys_dir, sliver_group=node.backend.group) as server:
        assert sshd_problems(Host(), account, node.backend.keys_dir, config=server.config_path) == []
        assert node.backend.sshd_problems(config=server.config_path) == []
    with PrivateSshd() as stock:
        [problem] = sshd_problems(Host(), account, node.backend.keys_dir, config=stock.config_path)
    assert problem.startswith(PROBLEM_PREFIX) and ".ssh/authorized_keys" in problem


def test_the_access_signature_sees_changes_behind_the_backends_back_and_nothing_else(node: Node) -> None:
    sliver = node.sliver(("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostileSignatureKey0000000000000000000 x@y",))
    node.backend.create(sliver)
    applied = node.backend.configure(sliver, {})
    entry = node.entry(sliver)
    observed = lambda: node.backend.observe()[sliver.name].access  # noqa: E731
    assert observed() == applied
    as_sliver(entry, "mkdir -p .ssh && echo junk > .ssh/authorized_keys && touch notes && mkdir -p d")
    assert observed() == applied and node.backend.configure(sliver, {}) == applied
    keys = node.backend.keys_dir / entry.name
    spare = keys.with_name(".spare")
    spare.write_bytes(keys.read_bytes() + b"ssh-ed25519 AAAAadded by hand\n")
    os.replace(spare, keys)
    assert observed() != applied
    repaired = node.backend.configure(sliver, {})
    assert repaired == observed() and keys.read_bytes().count(b"\n") == 1
    subprocess.run(["usermod", "--expiredate", "1", entry.name], check=True, capture_output=True)
    assert observed() != repaired
    assert node.backend.configure(sliver, {}) == observed() and shadow_fields(entry.name) == ("*", "")


# --- uids and leftovers ----------------------------------------------------------------------------

CRON_SPOOL = Path("/var/spool/cron/crontabs")
AT_SPOOL = Path("/var/spool/cron/atjobs")


@pytest.fixture
def spools() -> Iterator[tuple[Path, Path]]:
    """The Debian cron and at spool directories (made for the test when cron/at are not
    installed, and then removed again)."""
    made = [p for p in (Path("/var/spool/cron"), CRON_SPOOL, AT_SPOOL) if not p.exists()]
    for path in made:
        path.mkdir(mode=0o1730)
    try:
        yield CRON_SPOOL, AT_SPOOL
    finally:
        for path in reversed(made):
            subprocess.run(["rm", "-rf", str(path)], check=False)


def _ipc_of(uid: int) -> list[str]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    header = lines[0].split()
    return [line for line in lines[1:] if str(uid) in (line.split()[header.index("uid")],
                                                         line.split()[header.index("cuid")])]


def _owned_by(uid: int, *roots: Path) -> list[str]:
    found = subprocess.run(["find", *map(str, roots), "-xdev", "-uid", str(uid)], capture_output=True, text=True,
                           check=False).stdout
    return found.split()


def test_a_destroyed_slices_leftovers_are_gone_before_its_uid_returns(
    node: Node, spools: tuple[Path, Path]
) -> None:
    sliver = node.sliver()
    uid = node.backend.create(sliver)
    entry = node.entry(sliver)
    tag = secrets.token_hex(4)
    as_sliver(entry, f"echo x > /tmp/nmc-{tag}; mkdir -p /var/tmp/nmc-{tag}/deep; echo y > /var/tmp/nmc-{tag}/deep/f; "
                     f"echo z > /dev/shm/nmc-{tag}; ln -s /etc/passwd /tmp/nmc-{tag}-link; ipcmk -M 4096 >/dev/null")
    if shutil.which("crontab") and shutil.which("at"):  # the sliver's own jobs, as it would make them
        as_sliver(entry, "echo '* * * * * /bin/true' | crontab - && echo /bin/true | at now + 1 hour 2>/dev/null")
    else:  # what crontab(1) and at(1) leave: spool files owned by the user
        for path in (spools[0] / entry.name, spools[1] / f"a0001{tag}"):
            path.write_text("* * * * * /bin/true\n")
            os.chown(path, uid, uid)
    assert len(_owned_by(uid, *spools)) == 2
    assert _ipc_of(uid) and len(_owned_by(uid, Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))) >= 5
    node.backend.destroy(sliver.name)
    shared = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), Path("/run/lock"))
    assert _owned_by(uid, *shared, *spools) == []
    assert _ipc_of(uid) == [] and not (spools[0] / entry.name).exists()
    assert Path("/etc/passwd").exists()
    assert node.backend.create(sliver) == uid  # the same slice gets its uid back, with nothing left in it
    twin = node.sliver(slice_id=sliver.slice_id)
    with pytest.raises(AccountConflict, match=rf"{twin.name}: its uid {uid} .*two slices never share a uid"):
        node.backend.create(twin)


# --- root never follows sliver-made paths -----------------------------------------------------------

def _add_stale_member(group: str, member: str) -> None:
    """List ``member`` in ``group`` in /etc/group and /etc/gshadow (under the shadow tools' own
    lock), as a stale entry would: the shadow tools refuse to add a user that does not exist."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for _ in range(100):
        if libc.lckpwdf() == 0:
            break
        time.sleep(0.05)
    else:
        raise OSError(ctypes.get_errno(), "cannot lock the password files")
    try:
        for path in (Path("/etc/group"), Path("/etc/gshadow")):
            lines = []
            for line in path.read_text().splitlines():
                fields = line.split(":")
                if fields[0] == group and len(fields) == 4:
                    fields[3] = ",".join([m for m in fields[3].split(",") if m] + [member])
                lines.append(":".join(fields))
            info = path.stat()
            temp = path.with_name(path.name + ".nmc")
            temp.write_text("".join(line + "\n" for line in lines))
            os.chown(temp, info.st_uid, info.st_gid)
            temp.chmod(info.st_mode & 0o7777)
            os.replace(temp, path)
    finally:
        libc.ulckpwdf()


def test_a_stale_group_membership_is_not_granted(node: Node) -> None:
    sliver = node.sliver(initscript='#!/bin/sh\nid -G > "$HOME/groups"\nexec sleep 1000\n')
    account = PREFIX + sliver.name
    stale = f"{PREFIX}st{os.getpid() % 100000}"
    with removed_group(stale):
        subprocess.run(["groupadd", stale], check=True, capture_output=True)
        _add_stale_member(stale, account)
        assert account in subprocess.run(["getent", "group", stale], capture_output=True, text=True).stdout
        node.backend.create(sliver)
        node.backend.configure(sliver, {})
        node.backend.start(sliver)
        entry = node.entry(sliver)
        groups_file = Path(entry.home) / "groups"
        assert wait_for(lambda: groups_file.exists() and groups_file.read_text().strip() != "")
        sliver_gid = Host().getgrnam(node.backend.group).gid  # type: ignore[union-attr]
        assert sorted(map(int, groups_file.read_text().split())) == sorted({entry.gid, sliver_gid})
        assert account not in subprocess.run(["getent", "group", stale], capture_output=True, text=True).stdout
        assert subprocess.run(["id", "-Gn", account], capture_output=True, text=True).stdout.split() == \
            [account, node.backend.group]


def test_a_home_made_before_its_account_is_not_adopted(node: Node) -> None:
    sliver = node.sliver()
    home = node.backend.home_of(sliver.name)
    home.mkdir(mode=0o755)
    (home / "admin-notes").write_text("root's")
    with pytest.raises(AccountConflict, match=rf"sliver {sliver.name}: home .* never adopted"):
        node.backend.create(sliver)
    assert Host().getpwnam(PREFIX + sliver.name) is None and Host().getgrnam(PREFIX + sliver.name) is None
    info = home.stat()
    assert (info.st_uid, info.st_mode & 0o7777) == (0, 0o755)
    assert (home / "admin-notes").read_text() == "root's" and (home / "admin-notes").stat().st_uid == 0
    subprocess.run(["rm", "-rf", str(home)], check=True)
    node.backend.create(sliver)  # once the directory is gone, the sliver is made


@pytest.fixture
def disk(tmp_path: Path, node: Node) -> Iterator[DiskEnforcer]:
    enforcer = DiskEnforcer(Host(), node.backend.home_root, tmp_path / "images", mechanism="image")
    try:
        yield enforcer
    finally:
        for name in node.made:
            enforcer.release_home(PREFIX + name)


def _regular_files(top: Path) -> list[Path]:
    found = []
    for path, dirs, files in os.walk(top):  # os.walk does not follow links to directories
        found += [Path(path, f) for f in files if not Path(path, f).is_symlink()]
    return found


def test_moving_a_home_onto_its_image_never_makes_root_copy_another_tree(
    node: Node, disk: DiskEnforcer, home_root: Path
) -> None:
    secret = f"ROOT-SECRET-{secrets.token_hex(6)}"
    root_only = home_root / "root-only"
    root_only.mkdir(mode=0o700)
    (root_only / "secret.txt").write_text(secret)
    victim = node.sliver()
    node.backend.create(victim)
    victim_entry = node.entry(victim)
    victim_secret = f"VICTIM-{secrets.token_hex(6)}"
    as_sliver(victim_entry, f"echo {victim_secret} > private.txt")
    hostile = node.sliver()
    uid = node.backend.create(hostile)
    entry = node.entry(hostile)
    as_sliver(entry, f"echo mine > mine.txt; ln -s /etc etc; ln -s {victim_entry.home} victim; "
                     f"ln -s {root_only} rootonly; mkdir swap; mkdir closed; echo hidden > closed/f; chmod 000 closed")
    swapper = subprocess.Popen(  # swaps a directory for links to the secrets while the home moves
        ["/bin/sh", "-c", f"while :; do mkdir -p swap/d; rm -rf swap/d; ln -s {root_only} swap/d; rm -f swap/d; "
                          f"ln -s {victim_entry.home} swap/d; rm -f swap/d; done"],
        user=uid, group=entry.gid, extra_groups=[entry.gid], cwd=entry.home, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        notes = disk.prepare_home(entry.name, uid, entry.gid, Path(entry.home), 20 * 1024)
    finally:
        swapper.kill()
        swapper.wait()
    home = Path(entry.home)
    assert os.path.ismount(home), notes
    image = disk.image_of(entry.name)
    assert (image.stat().st_uid, image.stat().st_mode & 0o7777) == (0, 0o600)
    assert (home / "mine.txt").read_text() == "mine\n" and (home / "mine.txt").stat().st_uid == uid
    for link in ("etc", "victim", "rootonly"):
        assert (home / link).is_symlink()
    # a directory its own owner cannot read proves the copy ran without root's privileges
    assert not (home / "closed" / "f").exists()
    assert any("not carried into its disk image" in note for note in notes)
    contents = b"".join(path.read_bytes() for path in _regular_files(home))
    assert secret.encode() not in contents and victim_secret.encode() not in contents
    assert not [p for p in _regular_files(home) if p.stat().st_uid != uid]
    assert not (home_root / f".nodemanager-staging-{entry.name}").exists()


def test_the_sweep_removes_images_of_accounts_no_longer_kept(node: Node, disk: DiskEnforcer) -> None:
    kept, gone = node.sliver(), node.sliver()
    for sliver in (kept, gone):
        uid = node.backend.create(sliver)
        disk.prepare_home(PREFIX + sliver.name, uid, uid, node.backend.home_of(sliver.name), 16 * 1024)
    assert disk.sweep({PREFIX + kept.name}) == (PREFIX + gone.name,)
    assert not disk.image_of(PREFIX + gone.name).exists()
    assert not os.path.ismount(node.backend.home_of(gone.name))
    assert os.path.ismount(node.backend.home_of(kept.name)) and disk.image_of(PREFIX + kept.name).exists()
    assert disk.sweep({PREFIX + kept.name}) == ()
