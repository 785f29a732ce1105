"""Bandwidth enforcement: one HTB tree on the uplink, packets classified by uid with nftables.

Kernel state owned here (and nothing else on the device):

* the uplink's root qdisc ``1: htb default 2``; class ``1:1`` at the node cap (rate = ceil);
  class ``1:2`` for unclassified traffic (the node's own); one class ``1:<minor>`` per sliver with
  rate/ceil/quantum from ``core.allocation.htb_plan``;
* the nftables table ``inet nodemanager``: one output chain with ONE rule,
  ``meta priority set meta skuid map { UID : 1:MINOR, ... }``. HTB uses a packet's priority as
  its class when it names one of its leaves, so no tc filter (and no ``cls_fw``) is needed and a
  sliver's packets are shaped whatever process of it sends them.

Class ids: the minor derives from the uid (``core.allocation.classid_minors``: ``0x10 + uid mod
span``, linear probing on the rare collision), so a restart finds the same ids without any
persisted state, and the nft map itself records which uid has which class.

``apply`` reads the kernel (``tc -d class show``, ``tc -j qdisc show``, ``nft -j list table``),
compares it with the plan and writes only the difference: one ``tc -batch`` and at most one
``nft -f`` (which replaces the table atomically). Re-applying the same RSpecs runs no writing
command at all.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.allocation import (
    DEFAULT_MINOR,
    MTU_QUANTUM,
    ROOT_MINOR,
    HtbClass,
    HtbPlan,
    classid_minors,
    htb_plan,
    quantum_unit,
)
from ..core.errors import BackendError
from ..core.rspec import DEFAULT_NET_MAX_KBPS
from ..host import Host
from .base import RSpecs

log = logging.getLogger(__name__)

_CLASS_LINE = re.compile(
    r"class htb 1:(?P<minor>[0-9a-f]+) (?:root|parent 1:(?P<parent>[0-9a-f]+))"
    r".*? (?:quantum (?P<quantum>\d+) )?rate (?P<rate>\S+) ceil (?P<ceil>\S+)"
)
_STATS_CLASS = re.compile(r"class htb 1:(?P<minor>[0-9a-f]+) ")
_SENT = re.compile(r"Sent (?P<bytes>\d+) bytes ")
_RATE = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>[KMGT]?)bit")
_UNITS = {"": 0.001, "K": 1, "M": 1000, "G": 1_000_000, "T": 1_000_000_000}


def parse_rate_kbit(text: str) -> int:
    """tc's printed rate (``8Kbit``, ``10Gbit``, ``1500bit``) in kbit/s."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise BackendError(f"cannot parse tc rate {text!r}")
    return round(float(match.group("n")) * _UNITS[match.group("unit")])


def shown_kbit(kbit: int) -> int:
    """The rate, in kbit/s, that tc prints for a class written with ``kbit``: iproute2's
    ``sprint_rate`` divides by 1000 while the value is round or above a million, so
    ``4999996kbit`` shows as ``4999Mbit``. What a class reads back as, to compare with a plan."""
    value, scale = kbit * 1000, 1
    while value >= 1000 and (value % 1000 == 0 or value >= 1_000_000) and scale < 1_000_000_000_000:
        value //= 1000
        scale *= 1000
    return value * scale // 1000


def as_shown(cls: HtbClass) -> HtbClass:
    """``cls`` as ``tc -d class show`` would print it back (rates rounded as tc rounds them)."""
    return replace(cls, rate_kbit=shown_kbit(cls.rate_kbit), ceil_kbit=shown_kbit(cls.ceil_kbit))


def parse_classes(text: str) -> dict[int, tuple[int | None, HtbClass]]:
    """``tc -d class show`` output -> minor -> (parent minor or None for a root class, class).
    A root class has no quantum in the output; it is reported as the MTU quantum."""
    result: dict[int, tuple[int | None, HtbClass]] = {}
    for line in text.splitlines():
        match = _CLASS_LINE.match(line.strip())
        if match is None:
            continue
        minor = int(match.group("minor"), 16)
        parent = int(match.group("parent"), 16) if match.group("parent") else None
        quantum = int(match.group("quantum")) if match.group("quantum") else MTU_QUANTUM
        cls = HtbClass(minor, parse_rate_kbit(match.group("rate")), parse_rate_kbit(match.group("ceil")), quantum)
        result[minor] = (parent, cls)
    return result


def parse_sent_bytes(text: str) -> dict[int, int]:
    """``tc -s class show`` output -> minor -> the class's ``Sent N bytes`` counter. A
    ``Sent`` line counts for the HTB class whose header precedes it; anything else (other
    kinds of class, rates, backlog, lending figures) is skipped."""
    result: dict[int, int] = {}
    minor: int | None = None
    for line in text.splitlines():
        header = _STATS_CLASS.match(line.strip() + " ")
        if header is not None:
            minor = int(header.group("minor"), 16)
            continue
        if line.startswith("class "):
            minor = None
            continue
        sent = _SENT.search(line)
        if sent is not None and minor is not None:
            result[minor] = int(sent.group("bytes"))
            minor = None
    return result


@dataclass(frozen=True, slots=True)
class ClassCounter:
    """A sliver class's ``Sent`` bytes and its generation: how many times this enforcer has
    created the class (a new class counts from 0; ``core.bwbudget.counted``)."""

    sent_bytes: int
    generation: int


def parse_priority_map(document: str) -> dict[int, int] | None:
    """``nft -j list table`` output -> uid -> class minor, or None when the table does not have
    exactly our shape (one output chain whose rules are at most our one map rule)."""
    try:
        items = json.loads(document).get("nftables", [])
    except (ValueError, AttributeError):
        return None
    chains = [i["chain"] for i in items if "chain" in i]
    rules = [i["rule"] for i in items if "rule" in i]
    if len(chains) != 1 or chains[0].get("hook") != "output" or len(rules) > 1:
        return None
    if not rules:
        return {}
    try:
        (expr,) = rules[0]["expr"]
        mangle = expr["mangle"]
        if mangle["key"] != {"meta": {"key": "priority"}}:
            return None
        mapping = mangle["value"]["map"]
        if mapping["key"] != {"meta": {"key": "skuid"}}:
            return None
        pairs = mapping["data"]["set"]
        result = {}
        for uid, classid in pairs:
            major, minor = str(classid).split(":")
            if major != "1":
                return None
            result[int(uid)] = int(minor, 16)
        return result
    except (KeyError, TypeError, ValueError):
        return None


def nft_script(table: str, priorities: Mapping[int, int]) -> str:
    """An ``nft -f`` script that atomically replaces ``inet <table>`` with our one chain."""
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "  chain output {",
        "    type filter hook output priority 0; policy accept;",
    ]
    if priorities:
        elements = ", ".join(f"{uid} : 1:{minor:x}" for uid, minor in sorted(priorities.items()))
        lines.append(f"    meta priority set meta skuid map {{ {elements} }}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


class BandwidthEnforcer:
    name = "bandwidth"

    def __init__(self, host: Host, device: str = "", *, cap_kbit: int | None = None,
                 table: str = "nodemanager") -> None:
        self.host = host
        self._device = device
        self.cap_kbit = cap_kbit
        self.table = table
        self._names: dict[int, str] = {}  # uid -> sliver, from the last apply (for observed)
        self._unit = MTU_QUANTUM
        self._created: dict[int, int] = {}  # minor -> classes created by this enforcer (counters)

    def set_node_cap(self, kbit: int | None) -> None:
        """The node's bandwidth cap (bwcap), kbit/s; None or <= 0: no cap (10 Gbit/s)."""
        self.cap_kbit = kbit

    @property
    def cap(self) -> int:
        return self.cap_kbit if self.cap_kbit and self.cap_kbit > 0 else DEFAULT_NET_MAX_KBPS

    def device(self) -> str:
        """The configured uplink, else the default route's interface (resolved once)."""
        if not self._device:
            out = self.host.run(["ip", "-j", "route", "show", "default"]).stdout
            try:
                routes = json.loads(out or b"[]")
            except ValueError as exc:
                raise BackendError("cannot parse `ip -j route show default`") from exc
            devices = [r.get("dev") for r in routes if r.get("dev")]
            if not devices:
                raise BackendError("no default route: set [enforce] uplink to the interface to shape")
            self._device = devices[0]
        return self._device

    def available(self) -> str | None:
        try:
            self.host.run(["tc", "-V"])
            self.host.run(["nft", "list", "tables"])
            device = self.device()
            self.host.run(["ip", "link", "show", "dev", device])
        except BackendError as exc:
            return f"bandwidth shaping unavailable: {exc}"
        return None

    # --- reading the kernel ---------------------------------------------------------------
    def _root_is_ours(self, device: str) -> bool:
        out = self.host.run(["tc", "-j", "qdisc", "show", "dev", device]).stdout
        try:
            qdiscs = json.loads(out or b"[]")
        except ValueError:
            return False
        for q in qdiscs:
            if q.get("root"):
                return (q.get("kind") == "htb" and q.get("handle") == "1:"
                        and int(str(q.get("options", {}).get("default", "0")), 0) == DEFAULT_MINOR)
        return False

    def _classes(self, device: str) -> dict[int, tuple[int | None, HtbClass]]:
        out = self.host.run(["tc", "-d", "class", "show", "dev", device]).stdout
        return parse_classes((out or b"").decode("utf-8", "replace"))

    def _priorities(self) -> dict[int, int] | None:
        result = self.host.run(["nft", "-j", "list", "table", "inet", self.table], check=False)
        if result.returncode != 0:
            return None
        return parse_priority_map((result.stdout or b"").decode("utf-8", "replace"))

    # --- writing --------------------------------------------------------------------------
    def plan(self, rspecs: RSpecs, uids: Mapping[str, int]) -> tuple[HtbPlan, dict[int, int]]:
        """The HTB plan and the uid -> minor map for these slivers (pure once uids are known)."""
        known = {n: uids[n] for n in rspecs if n in uids}
        minors = classid_minors(known)
        plan = htb_plan(self.cap, rspecs, minors)
        return plan, {known[n]: c.minor for n, c in plan.slivers.items()}

    def apply(self, rspecs: RSpecs, uids: Mapping[str, int], homes: Mapping[str, Path] | None = None) -> tuple[str, ...]:
        device = self.device()
        plan, priorities = self.plan(rspecs, uids)
        self._names = {uids[n]: n for n in plan.slivers}
        self._unit = quantum_unit({n: r.get("nm_net_share", 1) for n, r in rspecs.items() if n in plan.slivers})
        batch: list[str] = []
        if self._root_is_ours(device):
            current = self._classes(device)
        else:
            batch.append(f"qdisc replace dev {device} root handle 1: htb default {DEFAULT_MINOR:x}")
            current = {}
        desired: list[tuple[str, HtbClass]] = [("1:", plan.root), (f"1:{ROOT_MINOR:x}", plan.default)]
        desired += [(f"1:{ROOT_MINOR:x}", c) for _, c in sorted(plan.slivers.items(), key=lambda kv: kv[1].minor)]
        wanted_minors = {c.minor for _, c in desired}
        created: list[int] = []
        for minor in sorted(set(current) - wanted_minors, reverse=True):
            batch.append(f"class del dev {device} classid 1:{minor:x}")
        for parent, cls in desired:
            have = current.get(cls.minor)
            parent_minor = None if parent == "1:" else int(parent.split(":")[1], 16)
            if have is not None and have == (parent_minor, as_shown(cls)):
                continue  # tc shows rates rounded: equal as shown is equal
            if have is None:
                created.append(cls.minor)
            batch.append(f"class replace dev {device} parent {parent} classid {cls.classid} htb "
                         f"rate {cls.rate_kbit}kbit ceil {cls.ceil_kbit}kbit quantum {cls.quantum}")
        if batch:
            log.info("event=tc_batch device=%s lines=%d", device, len(batch))
            self.host.run(["tc", "-batch", "-"], input=("\n".join(batch) + "\n").encode())
            self._created.update({minor: self._created.get(minor, 0) + 1 for minor in created})
        if self._priorities() != priorities:
            log.info("event=nft_replace table=%s slivers=%d", self.table, len(priorities))
            self.host.run(["nft", "-f", "-"], input=nft_script(self.table, priorities).encode())
        return plan.notes

    def remove(self, name: str, uid: int) -> None:
        """Drop the sliver's uid from the map and delete its class. Idempotent."""
        device = self.device()
        priorities = self._priorities()
        minor = None
        if priorities is not None and uid in priorities:
            minor = priorities.pop(uid)
            self.host.run(["nft", "-f", "-"], input=nft_script(self.table, priorities).encode())
        if minor is None:
            minor = classid_minors({name: uid})[name]
        self._names.pop(uid, None)
        if self._root_is_ours(device) and minor in self._classes(device) and minor not in (ROOT_MINOR, DEFAULT_MINOR):
            self.host.run(["tc", "class", "del", "dev", device, "classid", f"1:{minor:x}"])

    def remove_all(self) -> None:
        """Remove the whole tree and table (for uninstall and tests). Idempotent."""
        device = self.device()
        if self._root_is_ours(device):
            self.host.run(["tc", "qdisc", "del", "dev", device, "root"])
        if self._priorities() is not None or self.host.run(
                ["nft", "list", "table", "inet", self.table], check=False).returncode == 0:
            self.host.run(["nft", "delete", "table", "inet", self.table])

    def sent_bytes(self) -> dict[int, ClassCounter]:
        """uid -> its class's byte counter, for every uid of the nft map whose class exists:
        one ``tc -s class show`` and one ``nft -j list table`` for all slivers (bwmon's poll).
        Any thread: only reads the kernel."""
        priorities = self._priorities()
        if not priorities:
            return {}
        out = self.host.run(["tc", "-s", "class", "show", "dev", self.device()]).stdout
        sent = parse_sent_bytes((out or b"").decode("utf-8", "replace"))
        created = dict(self._created)
        return {uid: ClassCounter(sent[minor], created.get(minor, 0))
                for uid, minor in sorted(priorities.items()) if minor in sent}

    def observed(self) -> dict[str, dict[str, int]]:
        device = self.device()
        if not self._root_is_ours(device):
            return {}
        classes = self._classes(device)
        priorities = self._priorities() or {}
        result: dict[str, dict[str, int]] = {}
        for uid, minor in sorted(priorities.items()):
            entry = classes.get(minor)
            if entry is None:
                continue
            cls = entry[1]
            name = self._names.get(uid, f"uid {uid}")
            result[name] = {
                "nm_net_min_rate": cls.rate_kbit,
                "nm_net_max_rate": cls.ceil_kbit,
                "nm_net_share": max(1, cls.quantum // self._unit),
                "htb_quantum": cls.quantum,
            }
        return result
