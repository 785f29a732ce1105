"""Restart benchmark: a node with N slivers is stopped and started again.

What a restart must cost (issue 11): the API answers at once, and the first cycle after it makes
no backend call that changes anything and restarts no sliver. The node runs the hollow backend;
its in-memory "machine" (the backend object) survives the restart, as real accounts survive a
restart of the real daemon. Both nodes are built by ``daemon.build_node`` from one configuration.

Prints ``METRIC restart_to_api_s_<N>`` (from building the node to the first ``Help()`` answered
over the Unix socket, the store and its N records opened on the way), ``METRIC
restart_backend_calls_<N>`` (mutating backend calls of the first cycle after the restart: create,
configure, start, stop, destroy) and ``METRIC restart_sliver_starts_<N>``, plus the first cycle's
duration beside a plain full sync of the same document as the baseline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from nodemanager.api.client import local_proxy
from nodemanager.backends.hollow import HollowBackend
from nodemanager.config import parse_config
from nodemanager.daemon import build_node

MUTATING = ("create", "configure", "start", "stop", "destroy")


def write_document(path: Path, n: int) -> None:
    slivers = [{
        "name": f"site{i // 100}_slice{i}", "slice_id": 1000 + i, "instantiation": "plc-instantiated",
        "expires": 2_100_000_000,
        "keys": [{"key_type": "ssh", "key": f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:040d} u@x"}],
        "attributes": [{"tagname": "nm_cpu_share", "value": "2"}],
    } for i in range(n)]
    path.write_text(json.dumps({"timestamp": 1000, "node_id": 1, "slivers": slivers}))


def run(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="nm-restart-") as tmp:
        base = Path(tmp)
        (base / "node_id").write_text("1\n")
        write_document(base / "slivers.json", n)
        config = parse_config({
            "node": {"data_dir": str(base / "data"), "log_file": ""},
            "authority": {"url": f"file://{base / 'slivers.json'}", "node_id_file": str(base / "node_id")},
            "api": {"tcp": "", "unix_socket": str(base / "api.sock")},
            "metrics": {"listen": ""},
            "slivers": {"backend": "hollow"},
        })
        machine = HollowBackend()
        first = build_node(config, backend=machine, tickets=None)
        first.start()
        started = time.perf_counter()
        outcome = first.sync_once(wait=True)
        full_s = time.perf_counter() - started
        assert outcome.ok and len(outcome.actions) == n, outcome.summary()
        first.close()

        machine.calls.clear()
        started = time.perf_counter()
        second = build_node(config, backend=machine, tickets=None)
        second.start()
        with local_proxy(str(config.api.unix_socket), timeout=10) as proxy:
            assert proxy.Help()
        to_api_s = time.perf_counter() - started
        started = time.perf_counter()
        outcome = second.sync_once(wait=True)
        first_cycle_s = time.perf_counter() - started
        assert outcome.ok, outcome.summary()
        second.close()
        calls = {k: v for k, v in machine.calls.items() if k in MUTATING and v}
        return {
            f"restart_to_api_s_{n}": to_api_s,
            f"restart_backend_calls_{n}": float(sum(calls.values())),
            f"restart_sliver_starts_{n}": float(calls.get("start", 0)),
            f"restart_first_cycle_s_{n}": first_cycle_s,
            f"restart_first_cycle_ratio_{n}": first_cycle_s / full_s,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    units = {"calls": "calls", "starts": "starts", "ratio": "ratio"}
    for n in (int(x) for x in args.sizes.split(",")):
        for name, value in run(n).items():
            unit = next((u for key, u in units.items() if f"_{key}_" in name), "s")
            print(f"METRIC {name} {value:.4g} {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
