"""Bandwidth enforcement measured with iperf3 through a veth pair made by the test.

The "uplink" is one end of a veth pair in the root namespace; the other end lives in a network
namespace running the iperf3 servers. Sliver users (real accounts, prefix ``nmx``) run the
iperf3 clients; their packets get their HTB class from the nftables uid map. Figures are
``end.sum_received`` (what crossed the shaper). HTB counts Ethernet + IP + TCP headers, so the
payload rate of a class capped at C is about 0.956 x C.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nodemanager.core.allocation import classid_minors
from nodemanager.core.records import Loan
from nodemanager.core.rspec import effective_rspecs
from nodemanager.enforce.bandwidth import BandwidthEnforcer
from nodemanager.host import Host

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, veth, tc, nft, accounts)"),
    pytest.mark.skipif(not all(shutil.which(p) for p in ("iperf3", "nft", "tc")), reason="needs iperf3, nft, tc"),
]

HEADER_FACTOR = 0.956
SECONDS = 4


@dataclass(frozen=True)
class Net:
    device: str
    peer_ip: str
    netns: str


@pytest.fixture
def net() -> Iterator[Net]:
    tag = secrets.token_hex(3)
    netns, dev, peer = f"nmx{tag}", f"nmx{tag}a", f"nmx{tag}b"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)
    run("ip", "netns", "add", netns)
    try:
        run("ip", "link", "add", dev, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", netns)
        run("ip", "addr", "add", f"{subnet}.1/30", "dev", dev)
        run("ip", "link", "set", dev, "up")
        run("ip", "netns", "exec", netns, "ip", "addr", "add", f"{subnet}.2/30", "dev", peer)
        run("ip", "netns", "exec", netns, "ip", "link", "set", peer, "up")
        run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")
        yield Net(dev, f"{subnet}.2", netns)
    finally:
        subprocess.run(["ip", "link", "del", dev], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


@pytest.fixture
def slivers() -> Iterator[dict[str, int]]:
    """Two real accounts: sliver name -> uid. Always removed."""
    names = [f"nmx{secrets.token_hex(3)}" for _ in range(2)]
    created = []
    try:
        for name in names:
            subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", name],
                           check=True, capture_output=True)
            created.append(name)
        yield {name: int(subprocess.run(["id", "-u", name], check=True, capture_output=True).stdout) for name in names}
    finally:
        for name in created:
            subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
            subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.fixture
def shaper(net: Net) -> Iterator[BandwidthEnforcer]:
    enforcer = BandwidthEnforcer(Host(), net.device, cap_kbit=8000, table=f"nmxtest{secrets.token_hex(2)}")
    assert enforcer.available() is None
    try:
        yield enforcer
    finally:
        enforcer.remove_all()


def measure(net: Net, clients: dict[str, int]) -> dict[str, float]:
    """Run one iperf3 client per sliver (as its uid) at the same time; kbit/s received each."""
    servers, procs = [], {}
    try:
        for i, name in enumerate(clients):
            servers.append(subprocess.Popen(["ip", "netns", "exec", net.netns, "iperf3", "-s", "-1",
                                             "-p", str(5301 + i)], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for i, (name, uid) in enumerate(clients.items()):
            procs[name] = subprocess.Popen(
                ["iperf3", "-c", net.peer_ip, "-p", str(5301 + i), "-t", str(SECONDS), "-J"],
                user=uid, group=uid, extra_groups=[], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        result = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=SECONDS + 20)
            assert proc.returncode == 0, err.decode() + out.decode()[-500:]
            result[name] = json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1000
        return result
    finally:
        for proc in [*procs.values(), *servers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def rspec(**values: int) -> dict[str, int]:
    base = {"nm_net_min_rate": 0, "nm_net_max_rate": 8000, "nm_net_share": 1}
    base.update(values)
    return base


def test_a_sliver_is_held_at_its_ceiling(net: Net, slivers: dict[str, int], shaper: BandwidthEnforcer) -> None:
    shaper.set_node_cap(20_000)
    (a, uid), = list(slivers.items())[:1]
    shaper.apply({a: rspec(nm_net_max_rate=8000)}, {a: uid})
    got = measure(net, {a: uid})[a]
    print(f"ceil 8000 kbit/s: measured {got:.0f} kbit/s ({got / 8000:.3f} of ceil)")
    assert abs(got - 8000 * HEADER_FACTOR) <= 0.10 * 8000 * HEADER_FACTOR


def test_shares_split_and_a_loan_moves_the_split(net: Net, slivers: dict[str, int], shaper: BandwidthEnforcer) -> None:
    a, b = sorted(slivers)
    own = {a: rspec(nm_net_share=1), b: rspec(nm_net_share=3)}
    shaper.apply(own, slivers)
    got = measure(net, slivers)
    share_a = got[a] / (got[a] + got[b])
    print(f"shares 1:3, cap 8000: {got[a]:.0f} / {got[b]:.0f} kbit/s, a's part {share_a:.3f}")
    assert abs(share_a - 0.25) <= 0.10
    assert sum(got.values()) <= 8000 * 1.02

    # a loan of minimum rate: a reserves 6000 kbit/s, then lends 4000 of it to b
    own = {a: rspec(nm_net_min_rate=6000), b: rspec()}
    shaper.apply(own, slivers)
    before = measure(net, slivers)
    lent = effective_rspecs(own, {a: (Loan(b, "nm_net_min_rate", 4000),)})
    assert lent[a]["nm_net_min_rate"] == 2000 and lent[b]["nm_net_min_rate"] == 4000
    shaper.apply(lent, slivers)
    after = measure(net, slivers)
    print(f"min rate 6000/0: {before[a]:.0f} / {before[b]:.0f}; after lending 4000: "
          f"{after[a]:.0f} / {after[b]:.0f} kbit/s")
    assert before[a] > 0.8 * 6000 and after[b] > 0.8 * 4000
    assert after[a] < before[a] - 2000 and after[b] > before[b] + 2000


def test_apply_is_idempotent_and_remove_cleans_up(net: Net, slivers: dict[str, int], shaper: BandwidthEnforcer) -> None:
    a, b = sorted(slivers)
    rspecs = {a: rspec(nm_net_share=2), b: rspec(nm_net_min_rate=100)}
    shaper.apply(rspecs, slivers)
    calls: list[list[str]] = []

    class Recording(Host):
        def run(self, argv, **kwargs):  # type: ignore[no-untyped-def]
            calls.append([str(x) for x in argv])
            return super().run(argv, **kwargs)

    again = BandwidthEnforcer(Recording(), net.device, cap_kbit=8000, table=shaper.table)
    again.apply(rspecs, slivers)  # a "restart": a fresh enforcer finds everything in place
    assert not [c for c in calls if c[:2] in (["tc", "-batch"], ["nft", "-f"])]
    observed = again.observed()
    plan, _ = again.plan(rspecs, slivers)
    assert observed[a]["nm_net_share"] == 2 and observed[a]["nm_net_max_rate"] == 8000
    assert observed[b]["nm_net_min_rate"] == plan.slivers[b].rate_kbit >= 100

    minors = classid_minors(slivers)
    shaper.remove(a, slivers[a])
    shaper.remove(a, slivers[a])  # idempotent
    classes = subprocess.run(["tc", "class", "show", "dev", net.device], capture_output=True, check=True).stdout.decode()
    assert f"1:{minors[a]:x} " not in classes and f"1:{minors[b]:x} " in classes
    table = subprocess.run(["nft", "list", "table", "inet", shaper.table], capture_output=True, check=True).stdout.decode()
    assert f"{slivers[a]} :" not in table and f"{slivers[b]} :" in table
