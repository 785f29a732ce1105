"""Capacity check: the bundled authority holding N blocking queries, woken by one edit.

Runs ``nodemanager authority serve`` as a subprocess on a data file of N nodes (a few slices on
every node), opens N connections from this process (asyncio, one raw socket each), sends each
node's ``GetSliversWait(auth, index, 600)`` with its current index, waits until the authority is
idle (every call held), then makes ONE edit that changes every node's document (an attribute of a
slice on all nodes) and reads every answer. Prints:

    METRIC authority_wake_N_p99_s <x> s         edit (atomic rename) -> each answer fully received
    METRIC authority_wake_N_p50_s <x> s
    METRIC authority_peak_rss_mb_N <x> MB       the authority process's VmHWM
    METRIC authority_cpu_s_per_change_N <x> s   the authority's CPU seconds (user+system, from
                                                /proc/PID/stat) from the edit until idle again
    METRIC authority_hold_cpu_ms_per_wait_N <x> ms   its CPU to accept and hold one wait
    METRIC authority_getslivers_ms_while_N_held <x> ms  median of 20 GetSlivers calls made while
                                                the N waits are held (the loop stays responsive)

No same-run baseline: the thread-per-connection server this replaced could not hold N waits.

    PYTHONPATH=src python bench/authority_wait_bench.py [--nodes 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm bench@example.org"
SLICES = 5
WAIT = 600
CONNECTS_IN_FLIGHT = 500
TICKS = os.sysconf("SC_CLK_TCK")


def data_text(nodes: int, share: int) -> str:
    parts = [f'[[nodes]]\nid = {n}\nkey = "key-{n}"\nhostname = "n{n}.example.org"\n' for n in range(1, nodes + 1)]
    for s in range(SLICES):
        value = share if s == 0 else 2
        parts.append(f'[[slices]]\nname = "bench_s{s}"\nid = {100 + s}\nkeys = ["{KEY}"]\n'
                     f'[slices.attributes]\nnm_cpu_share = {value}\n')
    return "".join(parts)


def write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".new")
    staging.write_text(text)
    os.replace(staging, path)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_idle(pid: int, quiet: float = 1.0, timeout: float = 300.0) -> None:
    """Until the process used (almost) no CPU for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = cpu_seconds(pid)
        if now - last < 0.02 * quiet:
            return
        last = now
    raise SystemExit("the authority never became idle")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def getslivers_ms(port: int, calls: int = 20) -> float:
    """Median milliseconds of ``calls`` sequential GetSlivers of node 1, each on a new connection."""
    import http.client

    from nodemanager.authority.auth import hmac_auth

    body = xmlrpc.client.dumps((hmac_auth(1, "key-1"),), "GetSlivers").encode()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/PLCAPI/", body=body)
        answer = xmlrpc.client.loads(connection.getresponse().read())[0][0]
        connection.close()
        times.append(time.perf_counter() - started)
        assert answer["node_id"] == 1
    return 1000 * statistics.median(times)


def call_body(node: int, index: str) -> bytes:
    from nodemanager.authority.auth import hmac_auth

    body = xmlrpc.client.dumps((hmac_auth(node, f"key-{node}", [index, WAIT]), index, WAIT), "GetSliversWait").encode()
    return b"POST /PLCAPI/ HTTP/1.1\r\nHost: a\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class Waiting(asyncio.Protocol):
    """One held call: records when its whole answer arrived."""

    def __init__(self, request: bytes, done: asyncio.Future[float]) -> None:
        self.request, self.done, self.data = request, done, bytearray()
        self.length: int | None = None
        self.head = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.length is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = end + 4
            for line in bytes(self.data[:end]).split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    self.length = int(line.split(b":")[1])
        if self.length is not None and len(self.data) >= self.head + self.length and not self.done.done():
            self.done.set_result(time.monotonic())
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed before the answer: {exc}"))


async def hold_all(port: int, requests: list[bytes]) -> tuple[list[asyncio.Future[float]], list[Waiting]]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    futures: list[asyncio.Future[float]] = [loop.create_future() for _ in requests]
    protocols: list[Waiting] = []

    async def open_one(request: bytes, done: asyncio.Future[float]) -> None:
        async with gate:
            _, protocol = await loop.create_connection(lambda: Waiting(request, done), "127.0.0.1", port)
            protocols.append(protocol)

    await asyncio.gather(*(open_one(r, f) for r, f in zip(requests, futures)))
    return futures, protocols


async def run(args: argparse.Namespace, work: Path) -> None:
    from nodemanager.plc.documents import Snapshot
    from nodemanager.plc.model import load_authority_text

    nodes = args.nodes
    data = work / "authority.toml"
    write_atomically(data, data_text(nodes, share=2))
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "nodemanager", "authority", "serve", "--data", str(data),
         "--listen", f"127.0.0.1:{port}", "--max-connections", str(nodes + 1000)],
        env=env, stdout=subprocess.DEVNULL, stderr=open(work / "authority.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the authority did not start; see " + str(work / "authority.log"))
                await asyncio.sleep(0.1)
        mtime = int(data.stat().st_mtime)
        text = data.read_text()
        snapshot = Snapshot.of(load_authority_text(text, timestamp=mtime, base_time=mtime, origin=str(data)))
        requests = [call_body(n, snapshot.indexes[n]) for n in range(1, nodes + 1)]
        wait_idle(process.pid)
        cpu_before_hold = cpu_seconds(process.pid)
        futures, _protocols = await hold_all(port, requests)
        await asyncio.to_thread(wait_idle, process.pid)
        cpu_held = cpu_seconds(process.pid)
        early = sum(f.done() for f in futures)
        if early:
            raise SystemExit(f"{early} calls were answered before the edit (index mismatch?)")
        responsive_ms = await asyncio.to_thread(getslivers_ms, port)
        await asyncio.to_thread(wait_idle, process.pid)
        cpu_before = cpu_seconds(process.pid)
        started = time.monotonic()
        write_atomically(data, data_text(nodes, share=3))
        finished = await asyncio.wait_for(asyncio.gather(*futures), 600)
        await asyncio.to_thread(wait_idle, process.pid)
        cpu_change = cpu_seconds(process.pid) - cpu_before
        delays = sorted(t - started for t in finished)
        p99 = delays[min(len(delays) - 1, int(0.99 * len(delays)))]
        print(f"METRIC authority_wake_{nodes}_p99_s {p99:.3f} s")
        print(f"METRIC authority_wake_{nodes}_p50_s {statistics.median(delays):.3f} s")
        print(f"METRIC authority_peak_rss_mb_{nodes} {peak_rss_mb(process.pid):.1f} MB")
        print(f"METRIC authority_cpu_s_per_change_{nodes} {cpu_change:.3f} s")
        print(f"METRIC authority_hold_cpu_ms_per_wait_{nodes} {1000 * (cpu_held - cpu_before_hold) / nodes:.3f} ms")
        print(f"METRIC authority_getslivers_ms_while_{nodes}_held {responsive_ms:.2f} ms", flush=True)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.nodes + 1000
    if hard != resource.RLIM_INFINITY and hard < wanted:
        print(f"# authority wait benchmark skipped: RLIMIT_NOFILE hard limit {hard} < {wanted}", flush=True)
        return 0
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    with tempfile.TemporaryDirectory(prefix="nm-authority-bench-") as work:
        asyncio.run(run(args, Path(work)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
