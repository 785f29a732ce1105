"""The HTB/nftables enforcer against a scripted host: the batches it writes, and that a kernel
already in the desired state gets no writing command at all."""

from __future__ import annotations

import json

from nodemanager.core.allocation import HtbPlan
from nodemanager.enforce.bandwidth import (
    BandwidthEnforcer,
    nft_script,
    parse_classes,
    parse_priority_map,
    parse_rate_kbit,
)

DEV = "eth9"
RSPECS = {"a": {"nm_net_min_rate": 1000, "nm_net_max_rate": 4000, "nm_net_share": 1},
          "b": {"nm_net_min_rate": 0, "nm_net_max_rate": 8000, "nm_net_share": 3}}
UIDS = {"a": 1001, "b": 1002}


def tc_text(plan: HtbPlan) -> bytes:
    def fmt(kbit: int) -> str:
        return f"{kbit // 1000}Mbit" if kbit % 1000 == 0 else f"{kbit}Kbit"
    lines = [f"class htb 1:1 root rate {fmt(plan.cap_kbit)} ceil {fmt(plan.cap_kbit)} linklayer ethernet burst 1600b/1"]
    for c in [plan.default, *plan.slivers.values()]:
        lines.append(f"class htb {c.classid} parent 1:1 prio 0 quantum {c.quantum} rate {fmt(c.rate_kbit)} "
                     f"ceil {fmt(c.ceil_kbit)} linklayer ethernet burst 1600b/1 mpu 0b level 0 ")
    return ("\n".join(lines) + "\n").encode()


def nft_json(priorities: dict[int, int]) -> bytes:
    items: list[dict[str, object]] = [{"metainfo": {"version": "1.0.6"}}, {"table": {"family": "inet", "name": "nodemanager"}},
                                      {"chain": {"family": "inet", "name": "output", "hook": "output", "prio": 0}}]
    if priorities:
        pairs = [[uid, f"1:{m:x}"] for uid, m in sorted(priorities.items())]
        items.append({"rule": {"expr": [{"mangle": {"key": {"meta": {"key": "priority"}}, "value": {
            "map": {"key": {"meta": {"key": "skuid"}}, "data": {"set": pairs}}}}}]}})
    return json.dumps({"nftables": items}).encode()


QDISC_OURS = json.dumps([{"kind": "htb", "handle": "1:", "root": True, "options": {"default": "0x2"}}]).encode()


def test_rates_parse_in_kbit() -> None:
    assert [parse_rate_kbit(t) for t in ("8Kbit", "10Gbit", "7653Kbit", "8Mbit", "2000bit")] == [8, 10_000_000, 7653, 8000, 2]


def test_parse_classes_reads_tc_output() -> None:
    text = ("class htb 1:3f1 parent 1:1 prio 0 quantum 4542 rate 8Kbit ceil 4Mbit linklayer ethernet burst 1600b/1\n"
            "class htb 1:1 root rate 8Mbit ceil 8Mbit linklayer ethernet burst 1600b/1 mpu 0b level 7\n")
    classes = parse_classes(text)
    assert classes[0x3F1][0] == 1 and classes[0x3F1][1].quantum == 4542 and classes[0x3F1][1].ceil_kbit == 4000
    assert classes[1][0] is None and classes[1][1].rate_kbit == 8000


def test_priority_map_round_trip_and_foreign_tables_rejected() -> None:
    assert parse_priority_map(nft_json({1001: 0x3F9, 1002: 0x3FA}).decode()) == {1001: 0x3F9, 1002: 0x3FA}
    assert parse_priority_map(nft_json({}).decode()) == {}
    assert parse_priority_map("not json") is None
    assert parse_priority_map(json.dumps({"nftables": [{"chain": {"hook": "input"}}]})) is None
    script = nft_script("nodemanager", {1001: 0x3F9})
    assert "meta priority set meta skuid map { 1001 : 1:3f9 }" in script
    assert script.index("delete table inet nodemanager") < script.index("chain output")


def test_first_apply_builds_the_tree_in_one_batch(host) -> None:  # type: ignore[no-untyped-def]
    host.answers[("nft", "-j", "list")] = (1, b"")
    enforcer = BandwidthEnforcer(host, DEV, cap_kbit=8000)
    notes = enforcer.apply(RSPECS, UIDS)
    assert notes == ()
    (batch,) = host.batches("tc")
    lines = batch.decode().splitlines()
    assert lines[0] == f"qdisc replace dev {DEV} root handle 1: htb default 2"
    assert lines[1] == f"class replace dev {DEV} parent 1: classid 1:1 htb rate 8000kbit ceil 8000kbit quantum 1514"
    assert len(lines) == 2 + 1 + 2  # qdisc, root, default, two slivers
    plan, priorities = enforcer.plan(RSPECS, UIDS)
    assert f"classid {plan.slivers['b'].classid} htb rate {plan.slivers['b'].rate_kbit}kbit ceil 8000kbit quantum 4542" in batch.decode()
    (script,) = host.batches("nft")
    assert script.decode() == nft_script("nodemanager", priorities)
    assert len(host.commands_named("tc")) == 2  # qdisc show, then the batch (no class show: tree replaced)


def test_reapply_on_a_kernel_in_the_desired_state_writes_nothing(host) -> None:  # type: ignore[no-untyped-def]
    enforcer = BandwidthEnforcer(host, DEV, cap_kbit=8000)
    plan, priorities = enforcer.plan(RSPECS, UIDS)
    host.answers[("tc", "-j", "qdisc")] = (0, QDISC_OURS)
    host.answers[("tc", "-d", "class")] = (0, tc_text(plan))
    host.answers[("nft", "-j", "list")] = (0, nft_json(priorities))
    enforcer.apply(RSPECS, UIDS)
    assert host.batches("tc") == [] and host.batches("nft") == []
    observed = enforcer.observed()
    assert observed["b"]["nm_net_share"] == 3 and observed["a"]["nm_net_max_rate"] == 4000


def test_a_changed_or_removed_sliver_changes_only_its_class(host) -> None:  # type: ignore[no-untyped-def]
    enforcer = BandwidthEnforcer(host, DEV, cap_kbit=8000)
    plan, priorities = enforcer.plan(RSPECS, UIDS)
    host.answers[("tc", "-j", "qdisc")] = (0, QDISC_OURS)
    host.answers[("tc", "-d", "class")] = (0, tc_text(plan))
    host.answers[("nft", "-j", "list")] = (0, nft_json(priorities))
    enforcer.apply({"b": RSPECS["b"]}, UIDS)
    (batch,) = host.batches("tc")
    text = batch.decode()
    assert f"class del dev {DEV} classid {plan.slivers['a'].classid}" in text
    assert "qdisc" not in text
    (script,) = host.batches("nft")
    assert "1001" not in script.decode() and "1002 : " in script.decode()


def test_remove_drops_the_map_entry_and_the_class(host) -> None:  # type: ignore[no-untyped-def]
    enforcer = BandwidthEnforcer(host, DEV, cap_kbit=8000)
    plan, priorities = enforcer.plan(RSPECS, UIDS)
    host.answers[("tc", "-j", "qdisc")] = (0, QDISC_OURS)
    host.answers[("tc", "-d", "class")] = (0, tc_text(plan))
    host.answers[("nft", "-j", "list")] = (0, nft_json(priorities))
    enforcer.remove("a", 1001)
    assert ["tc", "class", "del", "dev", DEV, "classid", plan.slivers["a"].classid] in host.commands
    (script,) = host.batches("nft")
    assert "1001" not in script.decode()


def test_uplink_defaults_to_the_default_route(host) -> None:  # type: ignore[no-untyped-def]
    host.answers[("ip", "-j", "route")] = (0, b'[{"dst":"default","gateway":"192.0.2.1","dev":"ens3"}]')
    assert BandwidthEnforcer(host).device() == "ens3"
    host.answers[("ip", "-j", "route")] = (0, b"[]")
    reason = BandwidthEnforcer(host).available()
    assert reason is not None and "no default route" in reason
