"""Re-applying the same bandwidth plan runs no tc command, even for rates tc prints rounded.

tc prints a class's rate with at most the digits above the largest SI unit it fits
(iproute2's ``sprint_rate``): a class written with ``rate 4999996kbit`` reads back as
``4999Mbit``. The enforcer compared that printed value with the plan exactly, so every full
pass (every minute) rewrote every sliver class whose water-filled rate is not round -- almost
all of them. A class is up to date when tc shows it as it would show the plan.
"""

from __future__ import annotations

from nodemanager.enforce.bandwidth import BandwidthEnforcer
from nodemanager.testing.kernel import KernelHost

BASE = {"nm_cpu_share": 1, "nm_cpu_guaranteed_share": 0, "nm_memory_max": 0, "nm_pids_max": 1024,
        "nm_net_min_rate": 0, "nm_net_max_rate": 10_000_000, "nm_net_share": 1, "nm_disk_quota": 0}


def test_a_second_apply_of_the_same_plan_runs_no_tc_batch() -> None:
    host = KernelHost()
    enforcer = BandwidthEnforcer(host, "eth0")
    rspecs = {"acct_a": dict(BASE), "acct_b": dict(BASE, nm_net_share=3)}
    uids = {"acct_a": 200010, "acct_b": 200011}
    enforcer.apply(rspecs, uids)
    rates = sorted(c.rate_kbit for c in host.net.devices["eth0"].classes.values())
    assert any(r % 1000 and r > 1_000_000 for r in rates)  # some rate tc prints rounded
    host.commands.clear()
    enforcer.apply(rspecs, uids)
    assert [c for c in host.commands if c[:2] in (["tc", "-batch"], ["nft", "-f"])] == []


def test_a_real_change_is_still_written() -> None:
    host = KernelHost()
    enforcer = BandwidthEnforcer(host, "eth0")
    uids = {"acct_a": 200010}
    enforcer.apply({"acct_a": dict(BASE)}, uids)
    enforcer.apply({"acct_a": dict(BASE, nm_net_max_rate=5000)}, uids)
    (cls,) = [c for c in host.net.devices["eth0"].classes.values() if c.minor >= 0x10]
    assert cls.ceil_kbit == 5000
