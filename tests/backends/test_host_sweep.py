"""The real Host seam's new parts: removing a uid's files from shared trees without following
links or crossing mounts, running a program as a uid with exact groups, stamps, the mount table."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.host import Host
from nodemanager.hostsweep import REMOVE_OWNED_DEPTH, parse_mounts

IS_ROOT = os.geteuid() == 0
UID = 54329  # unused uids standing in for a removed sliver and a bystander
OTHER = 54330


def test_parse_mounts_undoes_octal_escapes() -> None:
    raw = b"/dev/sda1 / ext4 rw 0 0\ntmpfs /mnt/a\\040b tmpfs rw 0 0\nmqueue /dev/mqueue mqueue rw 0 0\nshort\n"
    assert parse_mounts(raw) == [("/", "ext4"), ("/mnt/a b", "tmpfs"), ("/dev/mqueue", "mqueue")]


def test_file_stamps_list_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    (tmp_path / "dir").mkdir()
    stamps = Host().file_stamps(tmp_path)
    info = (tmp_path / "a").stat()
    assert stamps == {"a": (info.st_ino, info.st_size, info.st_mtime_ns)}
    assert Host().file_stamps(tmp_path / "missing") == {}
    assert Host().stat_file(tmp_path / "a").stamp == stamps["a"]  # type: ignore[union-attr]


def _own(path: Path, uid: int) -> Path:
    os.lchown(path, uid, uid)
    return path


@pytest.fixture
def shared(home_root: Path) -> Iterator[Path]:
    """A world-writable sticky directory like /tmp, root-owned, under the test's home root."""
    path = home_root / "shared"
    path.mkdir()
    path.chmod(0o1777)
    yield path
    subprocess.run(["umount", "-R", "-l", str(path / "mnt")], capture_output=True, check=False)
    subprocess.run(["umount", "-l", str(path / "bind")], capture_output=True, check=False)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: files of other uids, mounts")
def test_remove_owned_takes_the_uids_entries_and_nothing_else(shared: Path, home_root: Path) -> None:
    outside = home_root / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    _own(outside / "precious", UID)  # the uid's, but not below the directory being cleaned
    (shared / "file").write_text("x")
    _own(shared / "file", UID)
    (shared / "theirs").write_text("y")
    _own(shared / "theirs", OTHER)
    tree = shared / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    for part in (tree, tree / "a", tree / "a" / "b"):
        _own(part, UID)
    (tree / "a" / "b" / "deep").write_text("z")
    _own(tree / "a" / "b" / "deep", UID)
    mixed = shared / "mixed"  # the uid's directory holding another user's file: the file stays
    mixed.mkdir()
    _own(mixed, UID)
    (mixed / "guest").write_text("g")
    _own(mixed / "guest", OTHER)
    link = shared / "link"
    link.symlink_to(outside)
    _own(link, UID)
    os.mkfifo(shared / "fifo")
    _own(shared / "fifo", UID)
    removed, left = Host().remove_owned(shared, UID)
    assert sorted(p.name for p in shared.iterdir()) == ["mixed", "theirs"]
    assert [p.name for p in mixed.iterdir()] == ["guest"]
    assert (outside / "precious").read_text() == "keep"
    assert (removed, left) == (7, 1)  # file, tree, a, b, deep, link, fifo; mixed left
    assert Host().remove_owned(shared, UID) == (0, 1)
    assert Host().remove_owned(shared / "missing", UID) == (0, 0)


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: mounts")
def test_remove_owned_never_crosses_a_mount(shared: Path, home_root: Path) -> None:
    mnt = shared / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "nmtest", str(mnt)], check=True)
    (mnt / "on-another-fs").write_text("x")
    _own(mnt / "on-another-fs", UID)
    source = home_root / "bind-source"
    source.mkdir()
    (source / "through-a-bind").write_text("x")
    _own(source / "through-a-bind", UID)
    bind = shared / "bind"  # the same filesystem, mounted again: st_dev alone would not tell
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(bind)], check=True)
    Host().remove_owned(shared, UID)
    assert (mnt / "on-another-fs").exists() and (source / "through-a-bind").exists()


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: files of other uids")
def test_remove_owned_stops_at_its_depth_and_says_so(shared: Path) -> None:
    path = shared
    for _ in range(REMOVE_OWNED_DEPTH + 5):
        path = path / "d"
        path.mkdir()
        _own(path, UID)
    (shared / "f").write_text("x")
    _own(shared / "f", UID)
    removed, left = Host().remove_owned(shared, UID)
    assert removed == 1 and not (shared / "f").exists()
    assert left >= 1 and (shared / "d").exists()  # what it could not reach, and the chain above it, stay


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: changes uid")
def test_run_as_has_the_uid_and_exactly_the_groups(tmp_path: Path) -> None:
    host = Host()
    out = host.run_as(["/bin/sh", "-c", "id -u; id -g; id -G; pwd"], uid=UID, gid=UID, groups=[UID, OTHER]).stdout
    uid, gid, groups, cwd = out.decode().split("\n")[:4]
    assert (uid, gid, sorted(groups.split()), cwd) == (str(UID), str(UID), sorted([str(UID), str(OTHER)]), "/")
    with pytest.raises(BackendError, match="as uid 54329"):
        host.run_as(["/bin/sh", "-c", "exit 3"], uid=UID, gid=UID)
    with pytest.raises(BackendError, match="refuses uid 0"):
        host.run_as(["/bin/true"], uid=0, gid=0)
