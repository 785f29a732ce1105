"""Placement latency: from a process's uid change to its reading its sliver's cgroups in
``/proc/self/cgroup``, with the process-event listener, and with the periodic sweep only.

Needs root (cgroups, uid changes, the process-event connector). Each of ``--count`` children is
forked by this process (as sshd forks a session), drops to the sliver's uid with
``setresuid`` and takes a timestamp at once, then reads ``/proc/self/cgroup`` until every
hierarchy shows the sliver's group and reports the time that took. Children start every
``--stagger`` ms, so several overlap, as logins do. The sliver's groups live under a private
parent (``nmbbench<hex>``), removed at the end; the uid is one no account uses.

Prints ``METRIC placement_ms_p50|p99 <value> ms`` (listener) and
``METRIC placement_sweep_ms_p50|p99 <value> ms`` (the baseline: the sweep every ``--place-s``
seconds, as the daemon runs it behind the listener). Target: p99 <= 50 ms.
"""

from __future__ import annotations

import argparse
import os
import pwd
import secrets
import select
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from nodemanager.enforce.cgroups import CgroupTree  # noqa: E402
from nodemanager.enforce.placement import PlacementListener, Target  # noqa: E402
from nodemanager.enforce.tasks import kill_and_remove  # noqa: E402
from nodemanager.host import Host  # noqa: E402

NAME = "nmbbench_sliver"
TIMEOUT_NS = 20 * 10**9


def free_uid() -> int:
    used = {p.pw_uid for p in pwd.getpwall()}
    busy = {int(line.split()[1]) for pid in os.listdir("/proc") if pid.isdigit()
            for line in _status(pid) if line.startswith("Uid:")}
    return next(uid for uid in range(61_000, 65_000) if uid not in used and uid not in busy)


def _status(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read().splitlines()
    except OSError:
        return []


def child(uid: int, wanted: list[frozenset[str]], path: str, out: int) -> None:
    """In the forked child: only plain system calls (the parent has threads)."""
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        start = time.monotonic_ns()
        while True:
            with open("/proc/self/cgroup", "rb") as f:
                text = f.read().decode()
            if placed(text, wanted, path):
                elapsed = time.monotonic_ns() - start
                break
            if time.monotonic_ns() - start > TIMEOUT_NS:
                elapsed = -1
                break
            # poll finely at first (the listener's range), then gently: 200 busy pollers would
            # starve whatever is meant to place them
            time.sleep(0.0002 if time.monotonic_ns() - start < 100_000_000 else 0.005)
        os.write(out, struct.pack("=q", elapsed))
    finally:
        os._exit(0)


def placed(text: str, wanted: list[frozenset[str]], path: str) -> bool:
    """True when every hierarchy of ``wanted`` (its controllers; empty: the v2 one) shows
    ``path`` in a ``/proc/self/cgroup`` text."""
    found = []
    for line in text.splitlines():
        hid, controllers, where = line.split(":", 2)
        if where == path:
            found.append(frozenset() if hid == "0" else frozenset(controllers.split(",")))
    return all(any(w <= f if w else not f for f in found) for w in wanted)


def run(tree: CgroupTree, uid: int, count: int, stagger_s: float) -> list[float]:
    """Fork ``count`` children, one every ``stagger_s``; their latencies in ms."""
    wanted = [frozenset() if h.version == 2 else h.controllers for h in tree.used()]
    path = f"/{tree.group}/{NAME}"
    read_end, write_end = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child(uid, wanted, path, write_end)
        pids.append(pid)
        time.sleep(stagger_s)
    os.close(write_end)
    results: list[float] = []
    buffer = b""
    deadline = time.monotonic() + TIMEOUT_NS / 1e9 + 5
    while len(results) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], 1.0)
        if ready:
            chunk = os.read(read_end, 8 * count)
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 8:
                (ns,), buffer = struct.unpack("=q", buffer[:8]), buffer[8:]
                results.append(ns / 1e6 if ns >= 0 else float("inf"))
    os.close(read_end)
    for pid in pids:
        os.waitpid(pid, 0)
    return results


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def report(prefix: str, values: list[float], count: int) -> None:
    print(f"METRIC {prefix}_p50 {percentile(values, 50):.2f} ms", flush=True)
    print(f"METRIC {prefix}_p99 {percentile(values, 99):.2f} ms", flush=True)
    missing = count - len([v for v in values if v != float("inf")])
    print(f"# {prefix}: {len(values)} samples, max {max(values):.2f} ms, not placed: {missing}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--stagger", type=float, default=5.0, help="ms between children")
    parser.add_argument("--place-s", type=float, default=5.0, help="the sweep's period (baseline)")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("# placement benchmark skipped: needs root", flush=True)
        return 0
    host = Host()
    tree = CgroupTree(host, ["cpu", "memory", "pids", "freezer"], group=f"nmbbench{secrets.token_hex(3)}")
    uid = free_uid()
    try:
        tree.ensure_parents()
        tree.ensure(NAME)
        listener = PlacementListener(host, tree)
        if not listener.start():
            print(f"# {listener.problem}", flush=True)
            return 1
        listener.set_target(uid, Target(NAME, tuple(d / "cgroup.procs" for d in tree.dirs(NAME))))
        try:
            report("placement_ms", run(tree, uid, args.count, args.stagger / 1000), args.count)
        finally:
            listener.stop()
        if not args.no_baseline:
            stop = threading.Event()

            def sweep() -> None:
                while not stop.wait(args.place_s):
                    tree.place({NAME: uid})

            sweeper = threading.Thread(target=sweep, daemon=True)
            sweeper.start()
            try:
                report("placement_sweep_ms", run(tree, uid, args.count, args.stagger / 1000), args.count)
            finally:
                stop.set()
                sweeper.join()
    finally:
        kill_and_remove(tree, NAME, uid)
        for h in tree.used():
            host.remove_dir(tree.parent(h))
    return 0


if __name__ == "__main__":
    sys.exit(main())
