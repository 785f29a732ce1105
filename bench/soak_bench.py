"""Soak benchmark: 64 concurrent API clients for 60 s while 1,000 slivers keep changing.

The node is a real ``Node`` (hollow backend, its poll loop, the API on a Unix socket in a
temporary directory) fed a ``file://`` slivers.json of 1,000 slivers that is rewritten every few
seconds (attributes of ~5 % of the slivers change and a few slivers are replaced, well under the
safety valve). ``--clients`` connections (default 64), spread over ``--procs`` client processes so
the clients do not share the daemon's interpreter lock, call GetRSpec / GetXIDs /
GetEffectiveRSpec in a loop over keep-alive connections for ``--seconds`` after a warm-up.

Targets: ``soak_errors`` 0, p99 latency reported, ``soak_rss_growth_mb`` flat (RSS of the daemon
process at the end minus RSS after the warm-up). Output: ``METRIC <name> <value> <unit>``.

    PYTHONPATH=src .venv/bin/python bench/soak_bench.py --seconds 60

As root every method is allowed (root may call GetRSpec on any sliver); as another user the
clients call GetXIDs only (the others need root or the sliver itself) and say so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from pathlib import Path

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAISoakBenchKey{:030d} s@b"
STABLE = 900  # slivers 0..899 never leave the document; the clients ask about them


# --------------------------------------------------------------------------- the document
def write_document(path: Path, timestamp: int, generation: int, rng: random.Random, size: int) -> None:
    """1,000 slivers; ``generation`` changes the attributes of ~5 % and replaces the tail."""
    expires = int(time.time()) + 86400
    slivers = []
    for i in range(size):
        name = f"site_s{i:04d}" if i < STABLE else f"site_t{generation % 7}{i:04d}"
        share = 1 + (i + (generation if rng.random() < 0.05 else 0)) % 8
        slivers.append({
            # a slice's id is its own for life (its uid derives from it): never reused by another
            "name": name, "slice_id": 1 + (generation % 7 if i >= STABLE else 7) * size + i,
            "instantiation": "plc-instantiated", "expires": expires,
            "keys": [{"key_type": "ssh", "key": KEY.format(i)}],
            "attributes": [{"tagname": "cpu_share", "value": str(share)},
                           {"tagname": "net_max_rate", "value": str(1000 + i)}],
        })
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": slivers}))
    tmp.replace(path)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- a client process
def client_main(socket_path: str, threads: int, seconds: float, methods: list[str], out: str) -> int:
    """Run ``threads`` clients for ``seconds``; write the results as JSON to ``out`` (a file, not
    stdout: a pipe nobody reads until the end would block a large result)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from nodemanager.api.client import local_proxy

    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        rng = random.Random(index)
        mine = latencies[index]
        with local_proxy(socket_path, timeout=30) as proxy:
            while time.monotonic() < deadline:
                method = rng.choice(methods)
                name = f"site_s{rng.randrange(STABLE):04d}"
                started = time.perf_counter()
                try:
                    if method == "GetXIDs":
                        result = proxy.GetXIDs()
                    elif method == "GetRSpec":
                        result = proxy.GetRSpec(name)
                    else:
                        result = proxy.GetEffectiveRSpec(name)
                    if not isinstance(result, dict) or not result:
                        raise ValueError(f"{method}: empty or not a struct")
                except (OSError, xmlrpc.client.Error, ValueError) as exc:
                    errors.append(f"{method}: {exc!r}"[:200])
                mine.append((time.perf_counter() - started) * 1000)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    merged = [round(x, 3) for sample in latencies for x in sample]
    Path(out).write_text(json.dumps({"latencies_ms": merged, "errors": len(errors), "error_samples": errors[:5]}))
    return 0


# --------------------------------------------------------------------------- the node
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured load duration")
    parser.add_argument("--warmup", type=float, default=10.0, help="load before RSS is sampled")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--procs", type=int, default=8, help="client processes")
    parser.add_argument("--slivers", type=int, default=1000)
    parser.add_argument("--change-every", type=float, default=3.0, help="seconds between document changes")
    parser.add_argument("--poll", type=int, default=2, help="authority.poll_interval")
    parser.add_argument("--client", nargs=5, metavar=("SOCKET", "THREADS", "SECONDS", "METHODS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        socket_path, threads, seconds, methods, out = args.client
        return client_main(socket_path, int(threads), float(seconds), methods.split(","), out)

    from nodemanager.config import parse_config
    from nodemanager.daemon import build_node

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    base = Path(tempfile.mkdtemp(prefix="nm-soak-"))
    try:
        return soak(args, base, parse_config, build_node)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def soak(args: argparse.Namespace, base: Path, parse_config, build_node) -> int:  # noqa: ANN001
    rng = random.Random(6)
    doc = base / "slivers.json"
    (base / "node_id").write_text("1\n")
    timestamp, generation = 1000, 0
    write_document(doc, timestamp, generation, rng, args.slivers)
    config = parse_config({
        "node": {"data_dir": str(base / "data"), "log_file": ""},
        "authority": {"url": f"file://{doc}", "node_id_file": str(base / "node_id"),
                      "poll_interval": args.poll, "poll_jitter": 0},
        "api": {"tcp": "", "unix_socket": str(base / "api.sock")},
        "metrics": {"listen": ""},
        "slivers": {"backend": "hollow", "workers": 4},
    })
    manager = build_node(config)
    syncs: list[float] = []
    failed_syncs: list[str] = []
    first = threading.Event()

    def on_sync(outcome) -> None:  # noqa: ANN001
        syncs.append(outcome.duration_s)
        if not outcome.ok:
            failed_syncs.append(outcome.summary()[:200])
        first.set()

    manager.on_sync.append(on_sync)
    loop = threading.Thread(target=manager.run, name="nm-loop", daemon=True)
    loop.start()
    if not first.wait(120) or not manager.pool.wait_idle(300):
        print("first sync did not finish", file=sys.stderr)
        manager.stop()
        return 1

    stop_changes = threading.Event()

    def change_documents() -> None:
        nonlocal timestamp, generation
        while not stop_changes.wait(args.change_every):
            timestamp += 10
            generation += 1
            write_document(doc, timestamp, generation, rng, args.slivers)

    changer = threading.Thread(target=change_documents, daemon=True)
    changer.start()

    methods = ["GetXIDs", "GetRSpec", "GetEffectiveRSpec"] if os.geteuid() == 0 else ["GetXIDs"]
    if os.geteuid() != 0:
        print("# not root: clients call GetXIDs only (GetRSpec needs root or the sliver itself)", flush=True)
    per_proc = [args.clients // args.procs + (1 if i < args.clients % args.procs else 0) for i in range(args.procs)]
    total = args.warmup + args.seconds
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    jobs = [(n, base / f"client{i}.json") for i, n in enumerate(per_proc) if n]
    clients = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", str(base / "api.sock"), str(n), str(total),
             ",".join(methods), str(out)],
            env=env,
        )
        for n, out in jobs
    ]
    syncs_before = len(syncs)
    time.sleep(args.warmup)
    rss_warm = rss_mb()
    rss_peak = rss_warm
    syncs_at_warm = len(syncs)
    while any(c.poll() is None for c in clients):
        time.sleep(0.5)
        rss_peak = max(rss_peak, rss_mb())
    rss_end = rss_mb()
    stop_changes.set()
    results = [json.loads(out.read_text()) if out.exists() else {} for _, out in jobs]
    manager.stop()
    loop.join(60)

    latencies = sorted(x for r in results for x in r.get("latencies_ms", []))
    errors = sum(r.get("errors", 1) for r in results) + sum(1 for c in clients if c.returncode)
    samples = [s for r in results for s in r.get("error_samples", [])]
    calls = len(latencies)
    if not calls:
        print("no calls were made", file=sys.stderr)
        return 1
    p50 = latencies[calls // 2]
    p99 = latencies[min(calls - 1, int(calls * 0.99))]
    measured_syncs = len(syncs) - syncs_before
    print(f"METRIC soak_errors {errors} count")
    print(f"METRIC soak_calls_per_s {calls / total:.0f} calls/s")
    print(f"METRIC soak_p50_ms {p50:.2f} ms")
    print(f"METRIC soak_p99_ms {p99:.2f} ms")
    print(f"METRIC soak_max_ms {latencies[-1]:.1f} ms")
    print(f"METRIC soak_rss_warm_mb {rss_warm:.1f} MB")
    print(f"METRIC soak_rss_peak_mb {rss_peak:.1f} MB")
    print(f"METRIC soak_rss_growth_mb {rss_end - rss_warm:.1f} MB")
    print(f"METRIC soak_syncs {measured_syncs} count")
    print(f"METRIC soak_syncs_after_warmup {len(syncs) - syncs_at_warm} count")
    print(f"METRIC soak_sync_failures {len(failed_syncs)} count")
    if syncs[syncs_before:]:
        print(f"METRIC soak_sync_median_s {statistics.median(syncs[syncs_before:]):.3f} s")
    print(f"METRIC soak_document_changes {generation} count", flush=True)
    for sample in samples[:5]:
        print(f"# error: {sample}")
    for failure in failed_syncs[:3]:
        print(f"# failed sync: {failure}")
    return 0 if errors == 0 and not failed_syncs else 1


if __name__ == "__main__":
    sys.exit(main())
