"""The machine model's tc and nft answer as the real ones do: the same enforcer, driven through
the same steps against a veth in a network namespace and against ``KernelHost``, issues the same
commands and reads back the same classes, qdisc and priority map; the tools' refusals have the
same exit statuses. (What the crash simulation concludes about bandwidth rests on this.)"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence

import pytest

from nodemanager.enforce.bandwidth import BandwidthEnforcer, parse_classes, parse_priority_map
from nodemanager.host import CommandResult, Host
from nodemanager.testing.kernel import KernelHost

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth, tc, nft)"),
    pytest.mark.skipif(not all(shutil.which(p) for p in ("nft", "tc", "ip")), reason="needs nft, tc, ip"),
]

BASE = {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 0, "nm_memory_max": 0, "nm_pids_max": 1024,
        "nm_net_min_rate": 0, "nm_net_max_rate": 10_000_000, "nm_net_share": 1, "nm_disk_quota": 0}


class NetnsHost(Host):
    """The real machine, with tc, nft and ip run in a network namespace; keeps the commands."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> CommandResult[bytes]:
        self.commands.append([str(a) for a in argv])
        return super().run(["ip", "netns", "exec", self.netns, *argv], input=input, timeout=timeout, check=check)


class Recording(KernelHost):
    def __init__(self, device: str) -> None:
        super().__init__(uplink=device)
        self.seen: list[list[str]] = []

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        self.seen.append([str(a) for a in argv])
        return super().run(argv, **kwargs)


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    tag = secrets.token_hex(3)
    netns, device = f"nmf{tag}", f"nmf{tag}a"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "add", device, "type", "veth", "peer", "name", f"nmf{tag}b"],
                       check=True, capture_output=True)
        subprocess.run(["ip", "-n", netns, "link", "set", device, "up"], check=True, capture_output=True)
        yield netns, device
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def kernel_view(host: Host, device: str, table: str) -> tuple[object, ...]:
    classes = parse_classes(host.run(["tc", "-d", "class", "show", "dev", device]).stdout.decode())
    (root, *_) = json.loads(host.run(["tc", "-j", "qdisc", "show", "dev", device]).stdout) or [{}]
    listed = host.run(["nft", "-j", "list", "table", "inet", table], check=False)
    priorities = parse_priority_map(listed.stdout.decode()) if listed.returncode == 0 else None
    options = root.get("options", {})
    return classes, (root.get("kind") == "htb", root.get("handle"), options.get("default")), priorities


def test_the_bandwidth_enforcer_meets_the_same_kernel_in_the_model(netns: tuple[str, str]) -> None:
    name, device = netns
    table = f"nmf{secrets.token_hex(2)}"
    real, model = NetnsHost(name), Recording(device)
    enforcers = [BandwidthEnforcer(h, device, table=table) for h in (real, model)]
    uids = {"a": 200010, "b": 200011, "c": 200012}
    steps = [
        {"a": dict(BASE), "b": dict(BASE, nm_net_share=3)},
        {"a": dict(BASE), "b": dict(BASE, nm_net_share=3)},  # again: nothing to write
        {"a": dict(BASE, nm_net_max_rate=5000), "b": dict(BASE), "c": dict(BASE, nm_net_min_rate=1500)},
        {"c": dict(BASE, nm_net_min_rate=1500)},
    ]
    try:
        for rspecs in steps:
            real.commands.clear()
            model.seen.clear()
            for enforcer in enforcers:
                enforcer.apply(rspecs, uids)
            assert real.commands == model.seen
            assert kernel_view(real, device, table) == kernel_view(model, device, table)
        for enforcer in enforcers:
            enforcer.remove("c", uids["c"])
        assert kernel_view(real, device, table) == kernel_view(model, device, table)
        refused = (["tc", "class", "del", "dev", device, "classid", "1:99"],
                   ["tc", "class", "del", "dev", device, "classid", "1:1"],  # it has children
                   ["nft", "-j", "list", "table", "inet", "nmf-none"])
        for argv in refused:
            assert real.run(argv, check=False).returncode == model.run(argv, check=False).returncode
    finally:
        for enforcer in enforcers:
            enforcer.remove_all()
    assert kernel_view(real, device, table) == kernel_view(model, device, table)
    assert model.unmodelled == []


class RecordingHost(Host):
    """The real machine, keeping the commands (run and run_as)."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        self.commands.append([str(a) for a in argv])
        return super().run(argv, **kwargs)

    def run_as(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        self.commands.append(["as", str(kwargs["uid"]), *map(str, argv)])
        return super().run_as(argv, **kwargs)


class RecordingModel(KernelHost):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[str]] = []

    def run(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        if getattr(self._caller, "ids", None) is None:
            self.seen.append([str(a) for a in argv])
        return super().run(argv, **kwargs)

    def run_as(self, argv, **kwargs):  # type: ignore[no-untyped-def, override]
        self.seen.append(["as", str(kwargs["uid"]), *map(str, argv)])
        return super().run_as(argv, **kwargs)


def _loops_named(commands: list[list[str]]) -> list[list[str]]:
    """Loop device names in order of first appearance (the kernel picks free numbers)."""
    names: dict[str, str] = {}
    return [[names.setdefault(a, f"/dev/loopN{len(names)}") if a.startswith("/dev/loop") else a for a in c]
            for c in commands]


@pytest.mark.skipif(not all(shutil.which(p) for p in ("losetup", "mkfs.ext4", "findmnt", "resize2fs")),
                    reason="needs util-linux and e2fsprogs")
def test_the_disk_enforcer_meets_the_same_kernel_in_the_model(home_root) -> None:  # type: ignore[no-untyped-def]
    from pathlib import Path

    from nodemanager.enforce.disk import DiskEnforcer

    nobody = 65534
    images = home_root / "images"
    home = home_root / "nmfacct"
    real, model = RecordingHost(), RecordingModel()
    model.dirs[home_root] = (0, 0, 0o755)
    for host in (real, model):
        host.makedirs_owned(home, nobody, nobody, 0o700)
        host.makedirs_owned(home / "docs", nobody, nobody, 0o700)
        host.atomic_write(home / "docs" / "notes", b"mine", uid=nobody, gid=nobody, mode=0o600)
    disks = [DiskEnforcer(h, home_root, images) for h in (real, model)]

    def visible(host: Host) -> list[str]:
        if host is real:
            return sorted(str(p.relative_to(home)) for p in home.rglob("*"))
        return sorted(str(p.relative_to(home)) for p in [*model.files, *model.dirs] if str(p).startswith(f"{home}/"))

    try:
        for quota in (10240, 20480):
            for disk in disks:
                assert disk.available() is None
                disk.prepare_home("nmfacct", nobody, nobody, home, quota)
                # in a container, online resizing is refused (no CAP_SYS_RESOURCE): so in the model
                model.storage.online_resize = ["e2fsck", "-f", "-p", str(images / "nmfacct.img")] not in real.commands
            assert _loops_named(real.commands) == _loops_named(model.seen)
            assert visible(real) == visible(model) == ["docs", "docs/notes"]
            sizes = [h.stat_file(images / "nmfacct.img").size for h in (real, model)]  # type: ignore[union-attr]
            assert sizes[0] == sizes[1] == quota * 1024
        for disk in disks:
            disk.release_home("nmfacct", home)
        assert _loops_named(real.commands) == _loops_named(model.seen)
        assert visible(real) == visible(model) == []  # the carried-over home was emptied under the mount
    finally:
        subprocess.run(["umount", "-l", str(home)], capture_output=True, check=False)
        subprocess.run(["umount", "-l", str(home_root / ".nodemanager-staging-nmfacct")], capture_output=True,
                       check=False)
    assert not Path(images / "nmfacct.img").exists() and model.storage.loops == {} and model.unmodelled == []
