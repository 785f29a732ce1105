"""Sync benchmark: full, no-op and one-change sync against the parse baseline.

For N slivers (2 keys and 5 attributes each) it builds a GetSlivers XML-RPC response, then in
the same run measures:

* the baseline: ``xmlrpc.client.loads`` of that body (what merely reading the document costs);
* a full sync into an empty store with the hollow backend (parse + validate + merge + persist +
  plan + create every sliver through the workers);
* a no-op sync of a newer document with the same content (must make zero backend calls);
* a one-change sync (one sliver's attribute changed: exactly one backend configure).

Sync times include parsing the body, exactly as the daemon does. Figures are medians of a few
runs; ratios are to the baseline of the same run. Output: ``METRIC <name> <value> <unit>``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path

from nodemanager.authority.parse import loads_xmlrpc_response, parse_getslivers_with_protection
from nodemanager.backends.hollow import HollowBackend
from nodemanager.config import parse_config
from nodemanager.daemon import Node, build_node

#: Backend calls that change the machine; observe/lookup only read.
MUTATING = ("create", "configure", "start", "stop", "destroy")
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{:040d} user{}@example.org"


def getslivers_body(n: int, timestamp: int, changed: int | None = None) -> bytes:
    slivers = []
    for i in range(n):
        share = "5" if i == changed else "1"
        slivers.append({
            "name": f"site{i // 100}_slice{i}",
            "slice_id": 1000 + i,
            "instantiation": "plc-instantiated",
            "expires": 2_100_000_000,
            "keys": [{"key_type": "ssh", "key": KEY.format(i, 1)}, {"key_type": "ssh", "key": KEY.format(i, 2)}],
            "attributes": [
                {"tagname": "nm_cpu_share", "value": share},
                {"tagname": "nm_net_max_rate", "value": "10000"},
                {"tagname": "nm_disk_quota", "value": "1048576"},
                {"tagname": "vsys", "value": "pl-ps"},
                {"tagname": "initscript_code", "value": "echo started"},
            ],
        })
    doc = {"timestamp": timestamp, "node_id": 1, "hostname": "node1.example.org", "slivers": slivers}
    return xmlrpc.client.dumps(({**doc},), methodresponse=True).encode()


def hollow_node(directory: Path, backend: HollowBackend, fetch: Callable[[], object]) -> Node:
    """A started node (no API, no metrics) as the daemon builds it, hollow backend, over ``fetch``."""
    config = parse_config({
        "node": {"data_dir": str(directory / "data"), "log_file": ""},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"backend": "hollow", "workers": 4},
    })
    node = build_node(config, backend=backend, fetch=fetch, tickets=None)  # type: ignore[arg-type]
    node.start(serve=False)
    return node


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(n: int, repeat: int, emit: Callable[[str, float, str], None]) -> None:
    bodies = {
        "full": getslivers_body(n, 1000),
        "noop": getslivers_body(n, 1001),
        "change": getslivers_body(n, 1002, changed=n // 2),
    }
    parse_s = timed(lambda: xmlrpc.client.loads(bodies["full"]), repeat)
    peak_threads = [threading.active_count()]

    def measure(kind: str) -> tuple[float, dict[str, int]]:
        samples = []
        calls: dict[str, int] = {}
        for _ in range(repeat):
            with tempfile.TemporaryDirectory() as tmp:
                backend = HollowBackend()
                current = {"body": bodies["full"]}

                def fetch():  # noqa: ANN202
                    data = loads_xmlrpc_response(current["body"], 1 << 30)
                    return parse_getslivers_with_protection(data, expected_node_id=1)

                node = hollow_node(Path(tmp), backend, fetch)
                if kind != "full":
                    node.sync_once(wait=True)
                    current["body"] = bodies[kind]
                    backend.calls.clear()
                gc.collect()
                start = time.perf_counter()
                outcome = node.sync_once(wait=True)
                samples.append(time.perf_counter() - start)
                peak_threads[0] = max(peak_threads[0], threading.active_count())
                assert outcome.ok, outcome.summary()
                calls = {k: v for k, v in backend.calls.items() if k in MUTATING and v}
                node.close()
        return statistics.median(samples), calls

    full_s, full_calls = measure("full")
    noop_s, noop_calls = measure("noop")
    change_s, change_calls = measure("change")
    assert full_calls.get("create") == n, full_calls
    assert noop_calls == {}, f"no-op sync made backend calls: {noop_calls}"
    assert change_calls == {"configure": 1}, f"one-change sync made: {change_calls}"
    emit(f"parse_s_{n}", parse_s, "s")
    emit(f"sync_full_s_{n}", full_s, "s")
    emit(f"sync_noop_s_{n}", noop_s, "s")
    emit(f"sync_onechange_s_{n}", change_s, "s")
    emit(f"sync_full_ratio_{n}", full_s / parse_s, "ratio")
    emit(f"sync_noop_ratio_{n}", noop_s / parse_s, "ratio")
    emit(f"sync_onechange_ratio_{n}", change_s / parse_s, "ratio")
    emit(f"noop_backend_calls_{n}", sum(noop_calls.values()), "calls")
    emit(f"threads_{n}", peak_threads[0], "threads")
    rss_mb, threads = daemon_footprint(bodies)
    emit(f"rss_mb_{n}", rss_mb, "MB")
    emit(f"threads_daemon_{n}", threads, "threads")


def daemon_footprint(bodies: dict[str, bytes]) -> tuple[float, int]:
    """Peak RSS and thread count of a fresh process that does what the daemon does: read each
    document's bytes, then a full, a no-op and a one-change sync. Measured in a child so the
    benchmark's own baggage (three bodies, the baseline's parse) does not count."""
    with tempfile.TemporaryDirectory() as tmp:
        for kind, body in bodies.items():
            Path(tmp, kind).write_bytes(body)
        out = subprocess.run([sys.executable, __file__, "--footprint", tmp], capture_output=True,
                             text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def footprint(directory: Path) -> None:
    current = {"kind": "full"}

    def fetch():  # noqa: ANN202
        body = (directory / current["kind"]).read_bytes()
        return parse_getslivers_with_protection(loads_xmlrpc_response(body, 1 << 30), expected_node_id=1)

    node = hollow_node(directory, HollowBackend(), fetch)
    threads = 0
    for kind in ("full", "noop", "change"):
        current["kind"] = kind
        assert node.sync_once(wait=True).ok
        threads = max(threads, threading.active_count())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a large parent
    # would report the parent's size.
    hwm_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(hwm_kib / 1024, threads)


def emit_line(name: str, value: float, unit: str) -> None:
    print(f"METRIC {name} {value:.4g} {unit}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--footprint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # the hollow backend announces itself at every node built
    if args.footprint:
        footprint(args.footprint)
        return 0
    for n in (int(x) for x in args.sizes.split(",")):
        run(n, args.repeat, emit_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
