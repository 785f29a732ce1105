"""The real Host seam: command errors, link-safe file operations, /proc scanning, signals."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.host import Host

IS_ROOT = os.geteuid() == 0
OTHER_UID = 54321  # an unused uid, used as root to simulate a sliver-owned directory


@pytest.fixture
def host() -> Host:
    return Host()


def test_run_returns_output_and_translates_failures(host: Host) -> None:
    assert host.run(["/bin/echo", "hi"]).stdout == b"hi\n"
    with pytest.raises(BackendError, match=r"/bin/sh exited with status 3: oops"):
        host.run(["/bin/sh", "-c", "echo oops >&2; exit 3"])
    assert host.run(["/bin/sh", "-c", "exit 4"], check=False).returncode == 4
    with pytest.raises(BackendError, match="cannot run /nonexistent/program"):
        host.run(["/nonexistent/program"])
    with pytest.raises(BackendError, match="timed out"):
        host.run(["/bin/sleep", "5"], timeout=0.2)


def test_run_uses_a_fixed_environment(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NM_SECRET_TEST", "leak")
    out = host.run(["/usr/bin/env"]).stdout.decode()
    assert "NM_SECRET_TEST" not in out and "LC_ALL=C" in out


def test_password_and_group_lookups(host: Host) -> None:
    root = host.getpwnam("root")
    assert root is not None and root.uid == 0
    assert host.getpwuid(0) == root
    assert host.getpwnam("no-such-user-nm") is None
    assert root in host.all_users()
    group = host.getgrnam("root")
    assert group is not None and group.gid == 0
    assert host.getgrnam("no-such-group-nm") is None


def test_shadow_entry_reads_password_and_expiry(host: Host, tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:1:0:99999:7:::\npl_x:!*:20000:0:99999:7::1:\n")
    host.shadow_path = shadow
    entry = host.shadow_entry("pl_x")
    assert entry is not None and (entry.password, entry.expire) == ("!*", "1")
    assert host.shadow_entry("nobody_here") is None


def test_atomic_write_sets_content_owner_and_mode(host: Host, tmp_path: Path) -> None:
    uid = OTHER_UID if IS_ROOT else os.getuid()
    target = tmp_path / "f"
    host.atomic_write(target, b"one\n", uid=uid, gid=uid if IS_ROOT else os.getgid(), mode=0o640)
    info = target.lstat()
    assert target.read_bytes() == b"one\n" and stat.S_IMODE(info.st_mode) == 0o640 and info.st_uid == uid
    host.atomic_write(target, b"two\n", uid=uid, gid=info.st_gid, mode=0o600)
    assert target.read_bytes() == b"two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no temporary file left


def test_atomic_write_replaces_a_link_instead_of_following_it(host: Host, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "keys"
    link.symlink_to(victim)
    host.atomic_write(link, b"new", uid=os.getuid(), gid=os.getgid(), mode=0o600)
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def _user_writable_dir(path: Path) -> Path:
    path.mkdir()
    if IS_ROOT:
        os.chown(path, OTHER_UID, OTHER_UID)
    return path


def test_links_in_user_writable_directories_are_refused(host: Host, tmp_path: Path) -> None:
    home = _user_writable_dir(tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / ".ssh").symlink_to(elsewhere)
    for operation in (
        lambda: host.atomic_write(home / ".ssh" / "authorized_keys", b"x", uid=os.getuid(), gid=os.getgid(), mode=0o600),
        lambda: host.makedirs_owned(home / ".ssh" / "sub", os.getuid(), os.getgid(), 0o700),
        lambda: host.read_file(home / ".ssh" / "authorized_keys"),
        lambda: host.remove_tree(home / ".ssh" / "anything"),
    ):
        with pytest.raises(BackendError, match="refusing to follow symbolic link"):
            operation()
    assert list(elsewhere.iterdir()) == []


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs a root-owned directory holding the link")
def test_links_placed_by_root_are_followed(host: Host, tmp_path: Path) -> None:
    real = tmp_path / "real-homes"
    real.mkdir(mode=0o755)
    trusted = tmp_path / "trusted"
    trusted.mkdir(mode=0o755)
    (trusted / "homes").symlink_to("../real-homes")
    host.makedirs_owned(trusted / "homes" / "u", OTHER_UID, OTHER_UID, 0o700)
    info = (real / "u").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (OTHER_UID, 0o700)


def test_dot_dot_is_refused(host: Host, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"'\.\.'"):
        host.makedirs_owned(tmp_path / ".." / "x", os.getuid(), os.getgid(), 0o700)


def test_makedirs_owned_creates_parents_and_fixes_the_leaf(host: Host, tmp_path: Path) -> None:
    leaf = tmp_path / "a" / "b"
    host.makedirs_owned(leaf, os.getuid(), os.getgid(), 0o711)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o711
    leaf.chmod(0o777)
    host.makedirs_owned(leaf, os.getuid(), os.getgid(), 0o700)
    assert stat.S_IMODE(leaf.stat().st_mode) == 0o700


def test_read_file_never_follows_links_nor_blocks_on_fifos(host: Host, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"abcdef")
    (tmp_path / "link").symlink_to(tmp_path / "plain")
    os.mkfifo(tmp_path / "fifo")
    assert host.read_file(tmp_path / "plain") == b"abcdef"
    assert host.read_file(tmp_path / "plain", limit=3) == b"abc"
    assert host.read_file(tmp_path / "link") is None
    assert host.read_file(tmp_path / "fifo") is None
    assert host.read_file(tmp_path / "missing") is None
    assert host.read_file(tmp_path / "missing-dir" / "x") is None


def test_stat_file_describes_the_link_itself(host: Host, tmp_path: Path) -> None:
    (tmp_path / "plain").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "plain")
    plain = host.stat_file(tmp_path / "plain")
    link = host.stat_file(tmp_path / "link")
    assert plain is not None and (plain.kind, plain.size) == ("file", 3)
    assert link is not None and link.kind == "symlink"
    assert host.stat_file(tmp_path / "missing") is None


def test_remove_tree_does_not_follow_links_inside(host: Host, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("k")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "link").symlink_to(outside)
    host.remove_tree(tree)
    host.remove_tree(tree)  # missing: success
    assert not tree.exists() and (outside / "keep").exists()
    host.remove_file(outside / "keep")
    host.remove_file(outside / "keep")
    assert list(outside.iterdir()) == []


def test_list_executables_lists_regular_executable_files_in_order(host: Host, tmp_path: Path) -> None:
    for name, mode in (("20-b", 0o755), ("10-a", 0o700), ("30-text", 0o644)):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(mode)
    (tmp_path / "40-link").symlink_to(tmp_path / "10-a")
    (tmp_path / "50-dir").mkdir()
    assert host.list_executables(tmp_path) == ["10-a", "20-b"]
    assert host.list_executables(tmp_path / "missing") == []


def test_pids_of_uid_finds_live_processes_and_skips_zombies(host: Host) -> None:
    live = subprocess.Popen(["/bin/sleep", "30"])
    zombie = subprocess.Popen(["/bin/true"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
        pids = host.pids_of_uid(os.getuid())
        assert live.pid in pids and zombie.pid not in pids and os.getpid() not in pids
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_kill_ignores_vanished_processes_and_refuses_init(host: Host) -> None:
    child = subprocess.Popen(["/bin/sleep", "30"])
    host.kill(child.pid, signal.SIGTERM)
    assert child.wait(timeout=5) == -signal.SIGTERM
    host.kill(child.pid, signal.SIGTERM)  # reaped: ProcessLookupError is success
    with pytest.raises(BackendError, match="refusing"):
        host.kill(1, signal.SIGTERM)


def test_time_functions(host: Host) -> None:
    before = host.monotonic()
    host.sleep(0.01)
    assert host.monotonic() > before


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
def test_spawn_detached_drops_privileges_and_never_appends_to_a_foreign_file(host: Host, home_root: Path) -> None:
    nobody = host.getpwnam("nobody")
    assert nobody is not None
    work = home_root / "w"
    host.makedirs_owned(work, nobody.uid, nobody.gid, 0o700)
    victim = work / "victim"
    victim.write_text("root's file\n")
    log = work / "start.log"
    os.link(victim, log)  # a hard link planted where the log goes
    host.spawn_detached(["/bin/sh", "-c", "id -u; id -G; echo done"], uid=nobody.uid, gid=nobody.gid, home=work,
                        env={"PATH": "/usr/bin:/bin"}, log_path=log)
    deadline = time.monotonic() + 10
    while "done" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    uid_line, groups_line, done = log.read_text().splitlines()
    assert (uid_line, done) == (str(nobody.uid), "done")
    assert "0" not in groups_line.split()
    assert victim.read_text() == "root's file\n"
    assert log.stat().st_uid == nobody.uid and log.stat().st_nlink == 1
