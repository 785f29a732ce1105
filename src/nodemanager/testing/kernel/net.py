"""Traffic control and nftables as ``tc``, ``nft`` and ``ip`` present them: the part of the
network stack bandwidth enforcement manages.

* **tc**: per device, a root qdisc (the device's default, handle ``0:``, or an HTB with a handle
  and a default class) and the HTB's classes (rate, ceil, quantum, parent). Commands: ``tc -V``,
  ``tc -j qdisc show dev D`` (JSON as iproute2 6.1 prints it), ``tc -d class show dev D`` and
  ``tc -s class show dev D`` (byte counters, :meth:`Network.send` adds to them) (text,
  rates printed as tc's ``sprint_rate`` does), ``tc -batch -`` (lines applied in order; the first
  failing line stops the batch, the earlier ones stay), ``tc class del``, ``tc qdisc del``,
  ``tc qdisc/class replace``. Kernel rules kept: replacing an existing class changes its
  parameters, never its parent; a class with children cannot be deleted ("HTB class in use");
  replacing the root qdisc by an HTB of the same handle keeps its classes, by anything else
  drops them; the device's default qdisc cannot be deleted.
* **nft**: tables by family and name, each with chains (base chain type, hook, priority, policy)
  and rules; the only rule understood is ``meta priority set meta skuid map { UID : 1:MINOR,
  ... }``. ``nft -f -`` applies a script atomically (all or nothing); ``nft -j list table`` answers
  in the JSON shape of nft 1.0.6; ``nft list tables``, ``nft list table``, ``nft delete table``.
* **ip**: ``ip -j route show default`` (one default route through the uplink, or none) and
  ``ip link show dev D``.

Anything else raises :class:`Unmodelled`: a command the model does not know is noticed, never
answered by a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

#: (returncode, stdout, stderr) of one command.
Answer = tuple[int, bytes, str]
OK: Answer = (0, b"", "")


class Unmodelled(Exception):
    """A command (or a form of one) the machine model does not know."""


@dataclass
class TcClass:
    minor: int
    parent: int | None  # None: directly under the qdisc ("root")
    rate_kbit: int
    ceil_kbit: int
    quantum: int
    sent_bytes: int = 0  # ``tc -s``'s counter: from 0 when the class is made, kept by a change


@dataclass
class Device:
    name: str
    kind: str = "pfifo_fast"  # the root qdisc
    handle: int = 0  # its major number; 0: the device's default qdisc
    default: int = 0  # HTB's default class minor
    classes: dict[int, TcClass] = field(default_factory=dict)


@dataclass
class NftChain:
    name: str
    hook: str | None = None
    type: str = "filter"
    priority: int = 0
    policy: str = "accept"
    #: The skuid -> priority map of the one rule understood (None: no rule).
    priorities: dict[int, int] | None = None


@dataclass
class NftTable:
    family: str
    name: str
    handle: int
    chains: dict[str, NftChain] = field(default_factory=dict)


_RATE = re.compile(r"(\d+)(bit|kbit|mbit|gbit|tbit)", re.IGNORECASE)
_RATE_BITS = {"bit": 1, "kbit": 1000, "mbit": 1_000_000, "gbit": 1_000_000_000, "tbit": 1_000_000_000_000}


def sprint_rate(bits: int) -> str:
    """A rate in bit/s as tc prints it (iproute2 ``sprint_rate``, SI units)."""
    units = ["", "K", "M", "G", "T"]
    i = 0
    value = bits
    while i < len(units) - 1 and value >= 1000 and (value % 1000 == 0 or value >= 1_000_000):
        value //= 1000
        i += 1
    return f"{value}{units[i]}bit"


def _parse_rate(text: str) -> int:
    """A tc rate argument in kbit/s."""
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f'Illegal "rate" {text!r}')
    return int(match.group(1)) * _RATE_BITS[match.group(2).lower()] // 1000


def _parse_handle(text: str) -> tuple[int, int]:
    """``1:1a`` -> (1, 0x1a); ``1:`` -> (1, 0)."""
    major, _, minor = text.partition(":")
    return int(major or "0", 16), int(minor or "0", 16)


class Network:
    """The devices, qdiscs, classes and nftables of one machine (module docstring)."""

    def __init__(self, uplink: str | None = "eth0", devices: Sequence[str] = ("lo", "eth0")) -> None:
        self.uplink = uplink
        self.devices = {name: Device(name) for name in devices}
        if uplink is not None and uplink not in self.devices:
            self.devices[uplink] = Device(uplink)
        self.tables: dict[tuple[str, str], NftTable] = {}
        self._next_handle = 1

    # --- commands -----------------------------------------------------------------------------
    def run(self, args: Sequence[str], input: bytes | None) -> Answer:
        program = args[0]
        if program == "tc":
            return self._tc(list(args[1:]), input)
        if program == "nft":
            return self._nft(list(args[1:]), input)
        if program == "ip":
            return self._ip(list(args[1:]))
        raise Unmodelled(" ".join(args))

    def _ip(self, args: list[str]) -> Answer:
        if args == ["-j", "route", "show", "default"]:
            routes = [] if self.uplink is None else [{"dst": "default", "gateway": "192.0.2.1", "dev": self.uplink,
                                                      "flags": []}]
            return 0, json.dumps(routes).encode() + b"\n", ""
        if args[:3] == ["link", "show", "dev"] and len(args) == 4:
            device = self.devices.get(args[3])
            if device is None:
                return 1, b"", f'Device "{args[3]}" does not exist.'
            index = sorted(self.devices).index(device.name) + 1
            return 0, (f"{index}: {device.name}: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc "
                       f"{device.kind} state UP mode DEFAULT group default qlen 1000\n").encode(), ""
        raise Unmodelled("ip " + " ".join(args))

    # --- tc -----------------------------------------------------------------------------------
    def _tc(self, args: list[str], input: bytes | None) -> Answer:
        if args == ["-V"]:
            return 0, b"tc utility, iproute2-6.1.0, libbpf 1.1.0\n", ""
        if args == ["-batch", "-"]:
            lines = (input or b"").decode().splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                code, _, err = self._tc_change(line.split())
                if code != 0:
                    return 1, b"", f"{err}\nCommand failed -:{number}"
            return OK
        if args[:4] == ["-j", "qdisc", "show", "dev"] and len(args) == 5:
            device = self.devices.get(args[4])
            return (1, b"", f'Cannot find device "{args[4]}"') if device is None else (0, self._qdisc_json(device), "")
        if args[:4] == ["-s", "class", "show", "dev"] and len(args) == 5:
            device = self.devices.get(args[4])
            return (1, b"", f'Cannot find device "{args[4]}"') if device is None else (0, self._stats_text(device), "")
        if args[:4] == ["-d", "class", "show", "dev"] and len(args) == 5:
            device = self.devices.get(args[4])
            return (1, b"", f'Cannot find device "{args[4]}"') if device is None else (0, self._class_text(device), "")
        return self._tc_change(args)

    def _tc_change(self, args: list[str]) -> Answer:
        """One ``qdisc``/``class`` command (a batch line or a command line)."""
        if len(args) < 4 or args[2] != "dev":
            raise Unmodelled("tc " + " ".join(args))
        device = self.devices.get(args[3])
        if device is None:
            return 1, b"", f'Cannot find device "{args[3]}"'
        what, verb, rest = args[0], args[1], args[4:]
        if what == "qdisc" and verb == "replace":
            if len(rest) != 6 or rest[:2] != ["root", "handle"] or rest[3:5] != ["htb", "default"]:
                raise Unmodelled("tc " + " ".join(args))
            major, _ = _parse_handle(rest[2])
            if not (device.kind == "htb" and device.handle == major):
                device.kind, device.handle, device.classes = "htb", major, {}
            device.default = int(rest[5], 16)
            return OK
        if what == "qdisc" and verb == "del" and rest == ["root"]:
            if device.handle == 0:
                return 2, b"", "Error: Cannot delete qdisc with handle of zero."
            device.kind, device.handle, device.default, device.classes = "pfifo_fast", 0, 0, {}
            return OK
        if what == "class" and verb == "del" and rest[:1] == ["classid"] and len(rest) == 2:
            major, minor = _parse_handle(rest[1])
            if device.kind != "htb" or major != device.handle or minor not in device.classes:
                return 2, b"", "RTNETLINK answers: No such file or directory"
            if any(c.parent == minor for c in device.classes.values()):
                return 2, b"", "Error: HTB class in use."
            del device.classes[minor]
            return OK
        if what == "class" and verb == "replace":
            return self._class_replace(device, args, rest)
        raise Unmodelled("tc " + " ".join(args))

    def _class_replace(self, device: Device, args: list[str], rest: list[str]) -> Answer:
        if len(rest) < 5 or rest[0] != "parent" or rest[2] != "classid" or rest[4] != "htb":
            raise Unmodelled("tc " + " ".join(args))
        options = dict(zip(rest[5::2], rest[6::2], strict=False))
        if set(options) - {"rate", "ceil", "quantum"} or "rate" not in options:
            raise Unmodelled("tc " + " ".join(args))
        if device.kind != "htb":
            return 2, b"", "Error: Specified qdisc kind is unknown."
        parent_major, parent_minor = _parse_handle(rest[1])
        major, minor = _parse_handle(rest[3])
        if parent_major != device.handle or major != device.handle or minor == 0:
            return 2, b"", "Error: Specified qdisc not found."
        try:
            rate = _parse_rate(options["rate"])
            ceil = _parse_rate(options.get("ceil", options["rate"]))
        except ValueError as exc:
            return 1, b"", str(exc)
        quantum = int(options.get("quantum", "0")) or 1514
        existing = device.classes.get(minor)
        if existing is not None:  # the kernel changes the parameters, never the parent
            existing.rate_kbit, existing.ceil_kbit, existing.quantum = rate, ceil, quantum
            return OK
        parent = None if parent_minor == 0 else parent_minor
        if parent is not None and parent not in device.classes:
            return 2, b"", "Error: Specified class not found."
        device.classes[minor] = TcClass(minor, parent, rate, ceil, quantum)
        return OK

    def _qdisc_json(self, device: Device) -> bytes:
        if device.kind == "htb":
            entry = {"kind": "htb", "handle": f"{device.handle:x}:", "root": True, "refcnt": 2,
                     "options": {"r2q": 10, "default": hex(device.default), "direct_packets_stat": 0,
                                 "direct_qlen": 1000}}
        else:
            entry = {"kind": device.kind, "handle": "0:", "root": True, "refcnt": 2,
                     "options": {"bands": 3, "priomap": [1, 2, 2, 2, 1, 2, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1],
                                 "multiqueue": False}}
        return json.dumps([entry], separators=(",", ":")).encode() + b"\n"

    def _class_text(self, device: Device) -> bytes:
        lines = []
        for minor, cls in sorted(device.classes.items()):
            inner = any(c.parent == minor for c in device.classes.values())
            where = "root" if cls.parent is None else f"parent {device.handle:x}:{cls.parent:x}"
            leaf = "" if inner else f"prio 0 quantum {cls.quantum} "
            rate, ceil = sprint_rate(cls.rate_kbit * 1000), sprint_rate(cls.ceil_kbit * 1000)
            lines.append(f"class htb {device.handle:x}:{minor:x} {where} {leaf}rate {rate} ceil {ceil} "
                         f"linklayer ethernet burst 1600b/1 mpu 0b cburst 1600b/1 mpu 0b level {7 if inner else 0} \n")
        return "".join(lines).encode()

    def _stats_text(self, device: Device) -> bytes:
        """``tc -s class show`` as iproute2 6.1 prints it for HTB classes."""
        lines = []
        for minor, cls in sorted(device.classes.items()):
            where = "root" if cls.parent is None else f"parent {device.handle:x}:{cls.parent:x} prio 0"
            rate, ceil = sprint_rate(cls.rate_kbit * 1000), sprint_rate(cls.ceil_kbit * 1000)
            lines.append(f"class htb {device.handle:x}:{minor:x} {where} rate {rate} ceil {ceil} burst 1600b "
                         f"cburst 1600b \n Sent {cls.sent_bytes} bytes {cls.sent_bytes // 1500} pkt (dropped 0, "
                         "overlimits 0 requeues 0) \n backlog 0b 0p requeues 0\n lended: 0 borrowed: 0 giants: 0\n"
                         " tokens: 200000 ctokens: 25000\n\n")
        return "".join(lines).encode()

    def send(self, device: str, minor: int, nbytes: int) -> None:
        """Count ``nbytes`` as sent by class ``minor`` of ``device`` (a test's traffic)."""
        self.devices[device].classes[minor].sent_bytes += nbytes

    # --- nft ----------------------------------------------------------------------------------
    def _nft(self, args: list[str], input: bytes | None) -> Answer:
        if args == ["list", "tables"]:
            return 0, "".join(f"table {f} {n}\n" for f, n in sorted(self.tables)).encode(), ""
        if args[:2] == ["-j", "list"] and args[2:3] == ["table"] and len(args) == 5:
            table = self.tables.get((args[3], args[4]))
            if table is None:
                return 1, b"", _nft_missing("list table", args[3], args[4])
            return 0, self._table_json(table), ""
        if args[:2] == ["list", "table"] and len(args) == 4:
            table = self.tables.get((args[2], args[3]))
            if table is None:
                return 1, b"", _nft_missing("list table", args[2], args[3])
            return 0, f"table {table.family} {table.name} {{\n}}\n".encode(), ""
        if args[:2] == ["delete", "table"] and len(args) == 4:
            if self.tables.pop((args[2], args[3]), None) is None:
                return 1, b"", _nft_missing("delete table", args[2], args[3])
            return OK
        if args == ["-f", "-"]:
            return self._nft_script((input or b"").decode())
        raise Unmodelled("nft " + " ".join(args))

    def _nft_script(self, script: str) -> Answer:
        """Apply ``script`` to a copy of the tables; commit only when every line applies."""
        tables = {key: NftTable(t.family, t.name, t.handle, {n: NftChain(**vars(c)) for n, c in t.chains.items()})
                  for key, t in self.tables.items()}
        table: NftTable | None = None
        chain: NftChain | None = None
        for number, raw in enumerate(script.splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            words = line.split()
            if chain is not None:
                if line == "}":
                    chain = None
                elif m := re.fullmatch(r"type (\w+) hook (\w+) priority (-?\d+); policy (accept|drop);", line):
                    chain.type, chain.hook, chain.priority, chain.policy = m[1], m[2], int(m[3]), m[4]
                elif m := re.fullmatch(r"meta priority set meta skuid map \{ (.*) \}", line):
                    try:
                        chain.priorities = _map_elements(m[1])
                    except ValueError as exc:
                        return 1, b"", f"/dev/stdin:{number}: Error: {exc}"
                else:
                    raise Unmodelled(f"nft -f: {line}")
            elif table is not None:
                if line == "}":
                    table = None
                elif len(words) == 3 and words[0] == "chain" and words[2] == "{":
                    chain = table.chains.setdefault(words[1], NftChain(words[1]))
                else:
                    raise Unmodelled(f"nft -f: {line}")
            elif len(words) == 4 and words[0] == "table" and words[3] in ("{}", "{"):
                table = self._table(tables, words[1], words[2])
                if words[3] == "{}":
                    table = None
            elif len(words) == 4 and words[:2] == ["delete", "table"]:
                if tables.pop((words[2], words[3]), None) is None:
                    return 1, b"", f"/dev/stdin:{number}: " + _nft_missing("delete table", words[2], words[3])
            else:
                raise Unmodelled(f"nft -f: {line}")
        if table is not None or chain is not None:
            return 1, b"", "Error: syntax error, unexpected end of file"
        self.tables = tables
        return OK

    def _table(self, tables: dict[tuple[str, str], NftTable], family: str, name: str) -> NftTable:
        if (family, name) not in tables:
            tables[(family, name)] = NftTable(family, name, self._next_handle)
            self._next_handle += 1
        return tables[(family, name)]

    def _table_json(self, table: NftTable) -> bytes:
        items: list[dict[str, object]] = [
            {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
            {"table": {"family": table.family, "name": table.name, "handle": table.handle}},
        ]
        handle = 1
        rules = []
        for chain in table.chains.values():
            entry: dict[str, object] = {"family": table.family, "table": table.name, "name": chain.name,
                                        "handle": handle}
            if chain.hook is not None:
                entry.update({"type": chain.type, "hook": chain.hook, "prio": chain.priority, "policy": chain.policy})
            items.append({"chain": entry})
            handle += 1
            if chain.priorities:
                pairs = [[uid, f"1:{minor:x}"] for uid, minor in sorted(chain.priorities.items())]
                mangle = {"key": {"meta": {"key": "priority"}},
                          "value": {"map": {"key": {"meta": {"key": "skuid"}}, "data": {"set": pairs}}}}
                rules.append({"rule": {"family": table.family, "table": table.name, "chain": chain.name,
                                       "handle": handle, "expr": [{"mangle": mangle}]}})
                handle += 1
        return json.dumps({"nftables": items + rules}).encode() + b"\n"

    # --- what the invariants ask ----------------------------------------------------------------
    def priority_map(self, family: str, name: str) -> dict[int, int]:
        """uid -> class minor of every map rule of the table (empty when there is none)."""
        table = self.tables.get((family, name))
        found: dict[int, int] = {}
        for chain in table.chains.values() if table is not None else ():
            found.update(chain.priorities or {})
        return found


def _map_elements(text: str) -> dict[int, int]:
    """``200010 : 1:1a, 200011 : 1:1b`` -> {200010: 0x1a, ...}; duplicates are refused."""
    found: dict[int, int] = {}
    for element in text.split(","):
        key, sep, value = element.strip().partition(" : ")
        major, colon, minor = value.partition(":")
        if not sep or not key.isdigit() or major != "1" or not colon:
            raise ValueError(f"syntax error in map element {element.strip()!r}")
        if int(key) in found:
            raise ValueError(f"duplicate map element {key}")
        found[int(key)] = int(minor, 16)
    return found


def _nft_missing(command: str, family: str, name: str) -> str:
    return f"Error: No such file or directory\n{command} {family} {name}"
