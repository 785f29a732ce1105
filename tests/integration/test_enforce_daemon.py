"""Enforcement wired into the daemon: a sync creates cgroups and HTB classes, SetLoans over the API
moves them within seconds, and removal of a sliver removes its state. (The enforcers' accuracy is
measured in test_enforce_resources.py and test_enforce_bandwidth.py.)"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import tomli_w

from nodemanager.api.client import local_proxy
from nodemanager.cli import main
from nodemanager.config import parse_config
from nodemanager.daemon import Node, build_node
from nodemanager.testing.accounts import purge_accounts, uid_base_for_tests, wait_for
from nodemanager.testing.network import veth_uplink

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "nmy"
GROUP = PREFIX + "slivers"  # the sliver group of this node (removed with the accounts)
VETH, PEER, NETNS = "nmyv0", "nmyv1", "nmy-test"
TABLE = "nodemanager"


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def cleanup_accounts() -> None:
    purge_accounts(PREFIX + "site_")
    run("groupdel", GROUP)


def write_doc(path: Path, slivers: dict[str, int], timestamp: int) -> None:
    entries = [{"name": name, "slice_id": i + 1, "instantiation": "plc-instantiated",
                "expires": int(time.time()) + 86400, "keys": [],
                "attributes": [{"tagname": "nm_cpu_share", "value": str(share)},
                               {"tagname": "nm_net_max_rate", "value": "8000"}]}
               for i, (name, share) in enumerate(slivers.items())]
    path.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "bwcap": 20000, "slivers": entries}))


@pytest.fixture
def veth() -> Iterator[str]:
    with veth_uplink(NETNS, VETH, PEER, nft_table=TABLE) as device:
        yield device


@pytest.fixture
def manager(tmp_path: Path, home_root: Path, veth: str) -> Iterator[tuple[Node, Path]]:
    cleanup_accounts()
    doc = tmp_path / "slivers.json"
    write_doc(doc, {"site_a": 3, "site_b": 1}, 1000)
    (tmp_path / "node_id").write_text("1\n")
    sock_dir = Path(home_root, "run")  # root-owned 0755, not under /tmp
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
        "authority": {"url": f"file://{doc}", "node_id_file": str(tmp_path / "node_id")},
        "api": {"tcp": "", "unix_socket": str(sock_dir / "api.sock")},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": PREFIX, "stop_grace": 1,
                    "keys_dir": str(tmp_path / "keys"), "uid_base": uid_base_for_tests(), "group": GROUP},
        "enforce": {"cpu": True, "memory": True, "bandwidth": True, "disk": False, "uplink": veth},
    })
    nm = build_node(config)
    assert nm.enforcement is not None and nm.enforcement_loop is not None
    nm.enforcement_loop.place_s = 0.5
    try:
        nm.start()
        yield nm, doc
    finally:
        nm.close()
        cleanup_accounts()


def groups(nm: Node, name: str) -> list[Path]:
    """The sliver's cgroups (named after its account)."""
    return nm.enforcement.cgroups(PREFIX + name)  # type: ignore[union-attr]


def cpu_value(nm: Node, name: str) -> int | None:
    """The sliver's cpu.shares (v1) or cpu.weight (v2), whichever hierarchy holds its CPU."""
    for directory in groups(nm, name):
        for file in ("cpu.shares", "cpu.weight"):
            path = directory / file
            if path.exists():
                return int(path.read_text().split()[0])
    return None


def tc_classes(device: str) -> str:
    return run("tc", "class", "show", "dev", device).stdout


def test_sync_loans_and_removal_drive_the_kernel(manager, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    nm, doc = manager
    assert nm.sync_once().ok
    uid_a = pwd.getpwnam(PREFIX + "site_a").pw_uid
    cpu_hierarchy = nm.enforcement.tree.hierarchy_for("cpu")  # type: ignore[union-attr]
    unit = 1024 if cpu_hierarchy.version == 1 else 100  # resources.md: v1 shares, v2 weight
    assert wait_for(lambda: cpu_value(nm, "site_a") == 3 * unit and cpu_value(nm, "site_b") == unit), \
        (cpu_value(nm, "site_a"), cpu_value(nm, "site_b"))
    assert wait_for(lambda: tc_classes(VETH).count("class htb") >= 4), tc_classes(VETH)
    assert "8Mbit" in tc_classes(VETH)
    # one pass writes the tc batch, then the nft batch: wait for the rules too
    assert wait_for(lambda: str(uid_a) in run("nft", "list", "table", "inet", TABLE).stdout), \
        run("nft", "list", "table", "inet", TABLE).stdout

    # A loan through the API: enforcement follows within seconds, and agrees with the API.
    with local_proxy(str(nm.config.api.unix_socket)) as api:
        assert api.SetLoans("site_a", [["site_b", "nm_cpu_share", 1]]) == 1
        assert api.GetEffectiveRSpec("site_a")["nm_cpu_share"] == 2
    assert wait_for(lambda: cpu_value(nm, "site_a") == 2 * unit and cpu_value(nm, "site_b") == 2 * unit, 5.0), \
        (cpu_value(nm, "site_a"), cpu_value(nm, "site_b"))

    # `status --resources` shows the effective values beside the kernel's, agreeing.
    path = nm.config.data_dir.parent / "nm.toml"
    path.write_text(tomli_w.dumps(msgspec.to_builtins(nm.config)))
    assert main(["-c", str(path), "status", "--resources"]) == 0
    shown = capsys.readouterr().out
    rows = [line.split() for line in shown.splitlines() if line.startswith(("site_a ", "site_b "))]
    cpu = {r[0]: r for r in rows if len(r) > 1 and r[1] == "nm_cpu_share"}
    assert cpu["site_a"][2] == "2" and cpu["site_a"][-1] == "ok", shown
    assert cpu["site_b"][2] == "2" and cpu["site_b"][-1] == "ok", shown
    assert any(r[1] == "nm_net_max_rate" and r[-1] == "ok" for r in rows), shown
    assert any(r[1] == "nm_pids_max" and r[2] == "1024" and r[-1] == "ok" for r in rows), shown

    # A process the sliver starts outside Start (as an SSH login would) joins its cgroups at once:
    # the placement listener runs with the enforcement loop.
    placement = nm.enforcement.placement  # type: ignore[union-attr]
    assert placement is not None and placement.running, nm.enforcement.problems()  # type: ignore[union-attr]
    placed = placement.placed
    proc = subprocess.Popen(["setpriv", f"--reuid={uid_a}", f"--regid={uid_a}", "--clear-groups", "sleep", "30"])
    try:
        assert wait_for(lambda: all(
            str(proc.pid) in (d / "cgroup.procs").read_text().split()
            for d in groups(nm, "site_a")
        ), 5.0)
        assert placement.placed > placed
    finally:
        proc.kill()
        proc.wait()

    # The authority drops site_b: its account, cgroups and class go.
    b_dirs = groups(nm, "site_b")
    write_doc(doc, {"site_a": 3}, 2000)
    assert nm.sync_once().ok
    assert not any(d.exists() for d in b_dirs)
    assert wait_for(lambda: tc_classes(VETH).count("class htb") == 3), tc_classes(VETH)
    assert all(d.exists() for d in groups(nm, "site_a"))
