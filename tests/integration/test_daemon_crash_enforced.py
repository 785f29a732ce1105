"""Ten ``kill -9`` of a real daemon during create/destroy churn of 30 slivers, with resource
enforcement on, then a good document and a running daemon (issue 11):

* the machine's managed accounts equal the document, none in a transitional or failed phase;
* every live sliver's processes are in its cgroups (every hierarchy), it has its HTB class and
  its nft map entry, and the slivers with a disk quota have their image mounted on their home;
* after an empty document, no cgroup, HTB class, nft entry, mount or image of any of the slivers
  ever created remains -- what crashes left behind included (the enforcement sweep).

Real accounts (prefix ``nmz``), a veth into a private network namespace as the uplink, disk
images in the data directory. ``sync.max_delete_fraction = 1`` so the empty document is applied
at once (the safety valve has its own tests).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.core.records import Phase
from nodemanager.store import Store
from nodemanager.testing.accounts import (
    CGROUP_ROOT,
    account_entries,
    purge_accounts,
    removed_group,
    uid_base_for_tests,
    unmount_below,
    wait_for,
)
from nodemanager.testing.daemonproc import start_nodemanager
from nodemanager.testing.network import veth_uplink

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "nmz"
GROUP = PREFIX + "slivers"
NETNS, VETH, PEER = "nmz-ns", "nmz-up", "nmz-peer"
TABLE = "nodemanager"
UNIVERSE = [f"site_c{i}" for i in range(45)]
#: Slivers with a disk quota get a loop-mounted image: a few, to keep loop devices few.
WITH_DISK = set(UNIVERSE[::9])


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def write_doc(path: Path, names: list[str], timestamp: int) -> None:
    slivers = [{
        "name": name, "slice_id": 1 + UNIVERSE.index(name), "instantiation": "plc-instantiated",
        "expires": int(time.time()) + 86400, "keys": [],
        "attributes": [{"tagname": "nm_cpu_share", "value": "2"}, {"tagname": "nm_memory_max", "value": "262144"},
                       {"tagname": "nm_pids_max", "value": "64"}, {"tagname": "nm_net_max_rate", "value": "8000"},
                       {"tagname": "nm_disk_quota", "value": "4096" if name in WITH_DISK else "0"},
                       {"tagname": "initscript_code", "value": "#!/bin/sh\nexec sleep 3600\n"}],
    } for name in names]
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "bwcap": 20000, "slivers": slivers}))
    temp.replace(path)


@pytest.fixture
def node(tmp_path: Path, home_root: Path) -> Iterator[tuple[Path, Path, Path]]:
    purge_accounts(PREFIX + "site_")
    doc = tmp_path / "slivers.json"
    (tmp_path / "node_id").write_text("1\n")
    config = tmp_path / "nm.toml"
    config.write_text(f"""
[node]
data_dir = "{tmp_path / 'data'}"
log_file = "{tmp_path / 'nm.log'}"
[authority]
url = "file://{doc}"
node_id_file = "{tmp_path / 'node_id'}"
poll_interval = 1
poll_jitter = 0
[sync]
max_delete_fraction = 1.0
[api]
tcp = ""
unix_socket = ""
[metrics]
listen = ""
[slivers]
home_root = "{home_root}"
name_prefix = "{PREFIX}"
workers = 4
stop_grace = 1
uid_base = {uid_base_for_tests()}
keys_dir = "{tmp_path / 'keys'}"
group = "{GROUP}"
[enforce]
uplink = "{VETH}"
""")
    with removed_group(GROUP), veth_uplink(NETNS, VETH, PEER, nft_table=TABLE):
        try:
            yield doc, config, tmp_path
        finally:
            unmount_below(home_root)
            purge_accounts(PREFIX + "site_")


def cgroup_dirs(account: str) -> list[Path]:
    return [path for path in CGROUP_ROOT.glob(f"*/nodemanager/{account}") if path.is_dir()]


def members(account: str) -> set[int]:
    found: set[int] = set()
    for directory in cgroup_dirs(account):
        found |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    return found


def pids_of(uid: int) -> set[int]:
    result = run("pgrep", "-U", str(uid))
    return {int(p) for p in result.stdout.split()}


def running_uids() -> set[int]:
    return {int(u) for u in run("ps", "-e", "-o", "uid=").stdout.split()}


def dead_while_running(data: Path) -> list[str]:
    """Slivers the store calls running whose uid has no process (for a failure's message: at
    which kill a sliver's processes went missing)."""
    alive = running_uids()
    with Store(data / "nodemanager.sqlite") as store:
        return sorted(n for n, s in store.accounts().items()
                      if s.owned and s.phase is Phase.RUNNING and s.uid not in alive)


def states(data: Path) -> dict[str, tuple[str, int, str]]:
    with Store(data / "nodemanager.sqlite") as store:
        return {n: (s.phase.value, s.failures, s.last_error) for n, s in store.accounts().items() if s.owned}


def converged(data: Path, names: set[str]) -> bool:
    accounts = account_entries(PREFIX + "site_")
    current = states(data)
    return (set(accounts) == {PREFIX + n for n in names} and set(current) == names
            and all(phase in (Phase.RUNNING.value, Phase.STOPPED.value) and not failures
                    for phase, failures, _ in current.values()))


def image_files(data: Path) -> list[str]:
    images = data / "images"
    return sorted(p.name for p in images.glob("*.img")) if images.exists() else []


def test_kills_during_churn_then_good_then_empty_documents(node: tuple[Path, Path, Path], home_root: Path) -> None:
    doc, config, tmp_path = node
    data = tmp_path / "data"
    rng = random.Random(20261207)
    current = UNIVERSE[:30]
    timestamp = 1000
    history: list[list[str]] = []  # after each kill, the running slivers with no process
    for _ in range(10):
        removed = set(rng.sample(current, 4))
        added = rng.sample([n for n in UNIVERSE if n not in current], 4)
        current = [n for n in current if n not in removed] + added
        timestamp += 10
        write_doc(doc, current, timestamp)
        daemon = start_nodemanager(config, "run", "--quiet")
        time.sleep(rng.uniform(0.5, 3.0))
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        history.append(dead_while_running(data))

    timestamp += 10
    write_doc(doc, current, timestamp)
    daemon = start_nodemanager(config, "run", "--quiet")
    try:
        wanted = set(current)
        assert wait_for(lambda: converged(data, wanted), 120, 0.5), states(data)
        accounts = account_entries(PREFIX + "site_")
        for name in current:
            account = accounts[PREFIX + name]
            assert wait_for(lambda: bool(pids_of(account.uid)) and pids_of(account.uid) <= members(PREFIX + name),
                            30, 0.5), (name, pids_of(account.uid), members(PREFIX + name), history)
            assert len(cgroup_dirs(PREFIX + name)) >= 3, cgroup_dirs(PREFIX + name)
        assert wait_for(lambda: all(str(accounts[PREFIX + n].uid) in run("nft", "list", "table", "inet", TABLE).stdout
                                    for n in current), 30, 0.5)
        assert wait_for(lambda: run("tc", "class", "show", "dev", VETH).stdout.count("class htb") == len(current) + 2,
                        30, 0.5), run("tc", "class", "show", "dev", VETH).stdout
        for name in wanted & WITH_DISK:
            assert run("findmnt", "-n", str(home_root / (PREFIX + name))).returncode == 0, name
        assert set(image_files(data)) == {f"{PREFIX}{n}.img" for n in wanted & WITH_DISK}

        timestamp += 10
        write_doc(doc, [], timestamp)
        assert wait_for(lambda: converged(data, set()), 120, 0.5), states(data)
        assert wait_for(lambda: not any(cgroup_dirs(PREFIX + n) for n in UNIVERSE), 30, 0.5), \
            {n: cgroup_dirs(PREFIX + n) for n in UNIVERSE if cgroup_dirs(PREFIX + n)}
        assert wait_for(lambda: run("tc", "class", "show", "dev", VETH).stdout.count("class htb") <= 2, 30, 0.5), \
            run("tc", "class", "show", "dev", VETH).stdout
        table = run("nft", "list", "table", "inet", TABLE).stdout
        assert not any(f"{uid_base_for_tests() + 1 + i} " in table for i in range(len(UNIVERSE))), table
        assert image_files(data) == []
        mounts = Path("/proc/self/mounts").read_text()
        assert str(home_root) not in mounts and str(data) not in mounts
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
