"""Benchmark: a full authority sync parse of 10,000 slivers against plain ``xmlrpc.client.loads``.

The document is a PLCAPI-shaped GetSlivers answer (2 keys and 5 attributes per sliver). "Ours" is
what the node does with a fetched body: the hardened XML-RPC unmarshaller plus the per-item
validation into an AuthorityDocument. The baseline is the stdlib parsing alone, no validation.
Prints ``METRIC parse_ratio_10000 <x> ratio`` (lower is better; the target is <= 1.3).

    python bench/parse_bench.py [--slivers N] [--repeat R]
"""

from __future__ import annotations

import argparse
import time
import xmlrpc.client
from collections.abc import Callable
from typing import Any

from nodemanager.authority.parse import loads_xmlrpc_response, parse_getslivers_with_protection

KEY_BLOB = "AAAAC3NzaC1lZDI1NTE5AAAAIKq7qbKk0vYl3vJ2o6sQ8m2x5dN9bTt1Yf0cGm4uQ1bP"


def make_body(count: int) -> bytes:
    slivers = []
    for i in range(count):
        slivers.append(
            {
                "name": f"site{i % 97}_slice{i}",
                "slice_id": 1000 + i,
                "instantiation": "plc-instantiated",
                "expires": 2_000_000_000,
                "keys": [
                    {"key_type": "ssh", "key": f"ssh-ed25519 {KEY_BLOB} user{i}@example.org"},
                    {"key_type": "ssh", "key": f"ssh-ed25519 {KEY_BLOB} admin{i}@example.org"},
                ],
                "attributes": [
                    {"tagname": "cpu_share", "value": "2"},
                    {"tagname": "net_max_rate", "value": "10000"},
                    {"tagname": "vsys", "value": "fd_tuntap"},
                    {"tagname": "vsys", "value": "vif_up"},
                    {"tagname": "hrn", "value": f"plc.site.slice{i}"},
                ],
                "GetSliceFamily": "lxc-f20-x86_64",
            }
        )
    document = {
        "timestamp": 1_700_000_000,
        "node_id": 1,
        "hostname": "node1.example.org",
        "interfaces": [{"is_primary": True, "bwlimit": None, "ip": "192.0.2.1"}],
        "initscripts": [],
        "accounts": [],
        "xmpp": None,
        "slivers": slivers,
    }
    return xmlrpc.client.dumps((document,), methodresponse=True, allow_none=True).encode()


def ours(body: bytes) -> Any:
    data = loads_xmlrpc_response(body, 1 << 30)
    document, _protected = parse_getslivers_with_protection(data, expected_node_id=1)
    assert len(document.slivers) == len(data["slivers"]) and not document.rejected
    return document


def baseline(body: bytes) -> Any:
    return xmlrpc.client.loads(body)


def best_of(function: Callable[[bytes], Any], body: bytes, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function(body)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slivers", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    body = make_body(args.slivers)
    ours(body)  # warm up
    base = best_of(baseline, body, args.repeat)
    mine = best_of(ours, body, args.repeat)
    print(f"body {len(body)} bytes; xmlrpc.client.loads {base:.3f} s; parse+validate {mine:.3f} s")
    print(f"METRIC parse_ratio_{args.slivers} {mine / base:.3f} ratio")


if __name__ == "__main__":
    main()
