"""The store's file system fills up or turns read-only under a running daemon.

The data directory lives on a small loop-mounted ext4 (root only). Each time: the failing sync
says why (SQLite's reason plus the operating system's), the daemon keeps running and the API keeps
answering, ``nodemanager health`` reports the problem, nothing of the last good state is lost, and
the node recovers -- at the next cycle once space is freed; after the repair (fsck + remount +
restart, what an operator does after ext4's ``errors=remount-ro``) for a read-only file system.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nodemanager.core.errors import StoreError
from nodemanager.store import Store
from nodemanager.daemon import Node, build_node
from nodemanager.health import check_health
from nodemanager.testing.fakeauthority import FakeAuthority

from .conftest import ApiHammer, FaultyAuthority, RunningNode, authority_client, node_config, slices_xml

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root to loop-mount a file system")]

NAMES = [f"site_s{i:02d}" for i in range(10)]
MANY = [f"site_m{i:03d}" for i in range(300)]


class SmallFs:
    """A 4 MiB ext4 image mounted with ``errors=remount-ro`` (what real nodes use)."""

    def __init__(self, base: Path) -> None:
        self.image = base / "store.img"
        self.mount = base / "mnt"

    def mount_rw(self, *extra: str) -> None:
        self.mount.mkdir(exist_ok=True)
        options = ",".join(("loop", "errors=remount-ro", *extra))
        subprocess.run(["mount", "-o", options, str(self.image), str(self.mount)], check=True, capture_output=True)

    def create(self) -> None:
        subprocess.run(["truncate", "-s", "4M", str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)], check=True, capture_output=True)
        self.mount_rw()

    @property
    def device(self) -> str:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(self.mount)], capture_output=True, text=True)
        return out.stdout.strip()

    def umount(self) -> None:
        if subprocess.run(["mountpoint", "-q", str(self.mount)]).returncode == 0:
            if subprocess.run(["umount", str(self.mount)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)

    def fill(self) -> Path:
        """Write a file until ENOSPC; return it (delete it to free the space)."""
        filler = self.mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for size in (65536, 4096, 512):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                        os.fsync(fd)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)
        return filler


@pytest.fixture
def small_fs(short_dir: Path) -> Iterator[SmallFs]:
    fs = SmallFs(short_dir)
    fs.create()
    try:
        yield fs
    finally:
        fs.umount()


def test_disk_full_fails_the_sync_clearly_and_the_next_cycle_after_freeing_succeeds(
    small_fs: SmallFs, authority: FaultyAuthority, make_node: Callable[..., RunningNode],
    caplog: pytest.LogCaptureFixture,
) -> None:
    authority.serve(slices_xml(NAMES, 1000))
    node = make_node(authority.url, data_dir=small_fs.mount / "data")
    assert node.start().ok
    before = node.snapshot()

    filler = small_fs.fill()
    authority.serve(slices_xml(NAMES + MANY, 2000, pad=300))  # far more than the free pages left in the WAL
    with ApiHammer(node.socket_path) as hammer:
        node.trigger()
        assert node.wait_metric("nodemanager_syncs_total", 1, outcome="error")
        assert hammer.wait_answers(hammer.answers + 3)
        health = check_health(node.config)
    assert hammer.failures == []
    assert node.alive()
    assert not health.ok and "no space left" in health.line
    failed = [r.getMessage() for r in caplog.records if "event=sync-error" in r.getMessage()]
    assert failed and ("full" in failed[0].lower() or "No space left" in failed[0]), failed
    assert node.snapshot() == before  # the last good state, untouched (and readable)

    filler.unlink()
    recovered = node.cycle()
    assert recovered.ok, recovered.summary()
    assert set(node.snapshot().slivers) == set(NAMES + MANY)
    assert set(node.snapshot().observed) == set(NAMES + MANY)
    assert check_health(node.config).ok


def test_a_store_turned_read_only_keeps_the_api_and_recovers_after_repair(
    small_fs: SmallFs, authority: FaultyAuthority, make_node: Callable[..., RunningNode], short_dir: Path
) -> None:
    trigger = Path("/sys/fs/ext4", Path(small_fs.device).name, "trigger_fs_error")
    if not trigger.exists():
        pytest.skip(f"this kernel has no {trigger} to make ext4 remount itself read-only")
    authority.serve(slices_xml(NAMES, 1000))
    data = small_fs.mount / "data"
    node = make_node(authority.url, data_dir=data)
    assert node.start().ok
    before = node.snapshot()

    trigger.write_text("nodemanager fault suite\n")  # ext4 errors=remount-ro: read-only from now
    authority.serve(slices_xml(NAMES[:8] + ["site_new"], 2000))
    with ApiHammer(node.socket_path) as hammer:
        node.trigger()
        assert node.wait_metric("nodemanager_syncs_total", 1, outcome="error")
        assert hammer.wait_answers(hammer.answers + 3)
        health = check_health(node.config)
    assert hammer.failures == [] and node.alive()
    assert not health.ok and "store" in health.line
    assert node.snapshot() == before

    # the operator's repair: stop, fsck, mount read-write again, start
    node.stop()
    small_fs.umount()
    subprocess.run(["e2fsck", "-f", "-y", str(small_fs.image)], capture_output=True, check=False)
    small_fs.mount_rw()
    with Store(data / "nodemanager.sqlite") as reopened:
        assert reopened.slivers() == before.slivers  # nothing of the good state lost
    restarted = make_node(authority.url, data_dir=data)
    outcome = restarted.start()
    assert outcome.ok, outcome.summary()
    assert set(restarted.snapshot().slivers) == set(NAMES[:8]) | {"site_new"}


def test_a_daemon_started_on_a_read_only_store_says_so(small_fs: SmallFs, short_dir: Path) -> None:
    config = node_config(small_fs.mount / "data", short_dir)
    manager = build_node(config, fetch=FakeAuthority().fetch)
    manager.start(serve=False)
    manager.close()
    small_fs.umount()
    small_fs.mount_rw("ro")
    with pytest.raises(StoreError, match="Read-only file system"):
        build_node(config, fetch=authority_client("file:///nonexistent/slices.xml").fetch).start()
