"""Benchmark: the API server against the stdlib SimpleXMLRPCServer + ThreadingMixIn baseline.

Both serve ``GetRSpec(name)`` from a real Store (a temporary directory, a few records, the RSpec
computed by ``rspec_from_attributes``): ours through ``NodeManagerApi.dispatch`` when
``api/methods.py`` provides it (else an equivalent function), the baseline through the very same
callable with a root identity (it has no peer lookup of its own). Each runs in this process, on a
Unix socket and on TCP 127.0.0.1; the baseline carries the four fixes it needs to run on a Unix
socket at all (no TCP_NODELAY, ``logRequests``, a class-level ``request_queue_size``, a non-empty
``client_address``) and answers HTTP/1.0-style (one connection per call), as the original did.

Clients are separate processes (1, 16, 64 in total) running the same small keep-alive HTTP/1.1
client against both servers: it reconnects whenever a response says ``Connection: close``. Every
configuration makes the same fixed number of calls; each client's clock starts at a common
barrier. Prints, per transport T and client count N:

    METRIC api_T_N_calls_per_s <x> calls/s
    METRIC api_T_N_p50_ms <x> ms
    METRIC api_T_N_p99_ms <x> ms
    METRIC api_T_N_vs_stdlib <x> ratio        (our calls/s over the baseline's)

and, from the 16-client Unix-socket runs, the server's own CPU per call -- this process's user +
system time (``getrusage(RUSAGE_SELF)``, every server thread included, the client processes not)
over the calls of the run -- which does not depend on how fast the clients are. It is the median
of ``--cpu-repeats`` runs per server (default 3, the two servers alternating), because a burst of
load from other programs on the machine inflates one run's figure:

    METRIC api_server_cpu_us_per_call <x> us
    METRIC api_server_cpu_vs_stdlib <x> ratio  (the baseline's CPU per call over ours)

Targets (2 cores): api_server_cpu_vs_stdlib >= 3, api_unix_16_vs_stdlib >= 2, api_unix_16_p99_ms
<= 10. The header names the event loop that ran (the standard asyncio loop: uvloop is not used).

    PYTHONPATH=src python bench/api_bench.py [--calls 4000] [--clients 1,16,64] [--cpu-repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SLIVERS = 8
RUN_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- client processes
def _request(name: str) -> bytes:
    import xmlrpc.client

    body = xmlrpc.client.dumps((name,), "GetRSpec").encode()
    head = f"POST /RPC2 HTTP/1.1\r\nHost: nm\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _connect(target: str) -> socket.socket:
    if target.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(target)
        return sock
    host, port = target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bool]:
    """(body, server keeps the connection) of one response; ``buffer`` carries leftovers."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buffer += chunk
    head = bytes(buffer[:end]).lower()
    del buffer[: end + 4]
    length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(buffer) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a response body")
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    if head[8:13] != b" 200 ":
        raise ConnectionError(f"HTTP error: {head[:40]!r}")
    keep = b"connection: close" not in head and not head.startswith(b"http/1.0")
    return body, keep


def _client(target: str, names: list[str], calls: int, ready: Any, go: Any, results: Any) -> None:
    """One client process: ``calls`` sequential calls on a keep-alive connection."""
    requests = [_request(name) for name in names]
    latencies: list[float] = []
    sock: socket.socket | None = None
    buffer = bytearray()
    error = ""
    try:
        sock = _connect(target)  # connected before the clock starts (reconnects are timed)
        ready.release()
        go.wait()
        for i in range(calls):
            started = time.perf_counter()
            if sock is None:
                sock = _connect(target)
                buffer.clear()
            sock.sendall(requests[i % len(requests)])
            body, keep = _read_response(sock, buffer)
            if b"nm_cpu_share" not in body or b"<fault>" in body:
                raise ValueError(f"unexpected answer: {body[:200]!r}")
            if not keep:
                sock.close()
                sock = None
            latencies.append(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        error = f"{type(exc).__name__}: {exc}"
        ready.release()
    finally:
        if sock is not None:
            sock.close()
    results.put((latencies, error))


def run_load(target: str, names: list[str], clients: int, calls: int) -> dict[str, float]:
    """Run ``calls`` calls spread over ``clients`` processes; calls/s and latency percentiles."""
    ctx = mp.get_context("spawn")  # the servers run threads: never fork this process
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    share = [calls // clients + (1 if i < calls % clients else 0) for i in range(clients)]
    procs = [ctx.Process(target=_client, args=(target, names, n, ready, go, results)) for n in share]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    waiting = len(procs)
    while waiting:
        if ready.acquire(timeout=0.5):
            waiting -= 1
        elif time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
            for proc in procs:
                proc.kill()
            raise RuntimeError("clients did not start")
    cpu_started = _process_cpu()
    started = time.perf_counter()
    go.set()
    latencies: list[float] = []
    errors: list[str] = []
    for _ in procs:
        got, error = results.get(timeout=RUN_TIMEOUT_S)
        latencies.extend(got)
        if error:
            errors.append(error)
    elapsed = time.perf_counter() - started
    cpu = _process_cpu() - cpu_started  # this process = the server (the clients are others)
    for proc in procs:
        proc.join(10)
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed, e.g. {errors[0]}")
    ordered = sorted(latencies)
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "cpu_us_per_call": cpu / len(latencies) * 1e6,
    }


def _process_cpu() -> float:
    """User + system CPU seconds of this process, every thread included (its rusage)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- the method served
def make_dispatch(directory: Path) -> tuple[Callable[..., Any], list[str], str, Callable[[], None]]:
    """(dispatch, sliver names, description, close): GetRSpec from a real store."""
    from nodemanager.api.identity import PeerIdentity
    from nodemanager.core.errors import UnknownMethod, UnknownSliver
    from nodemanager.core.records import PLC_INSTANTIATED, Sliver
    from nodemanager.core.rspec import rspec_from_attributes
    from nodemanager.store import Store

    store = Store(directory / "state.db")
    now = int(time.time())
    slivers = [
        Sliver(
            name=f"nmasite_bench{i}",
            slice_id=1000 + i,
            instantiation=PLC_INSTANTIATED,
            expires=now + 86400,
            timestamp=now,
            keys=(f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBench{i} user@example.org",),
            attributes=(("cpu_share", str(i + 1)), ("net_max_rate", "10000"), ("vsys", "fd_tuntap")),
        )
        for i in range(SLIVERS)
    ]
    store.apply_records(slivers, [])
    names = [s.name for s in slivers]
    closers: list[Callable[[], None]] = [store.close]
    try:
        import pwd

        from nodemanager.api.methods import NodeManagerApi, caller_resolver
        from nodemanager.backends.hollow import HollowBackend
        from nodemanager.clock import SystemClock
        from nodemanager.operations import SliverOperations
        from nodemanager.workers import WorkerPool

        def getpwuid(uid: int) -> object | None:
            try:
                return pwd.getpwuid(uid)
            except KeyError:
                return None

        pool = WorkerPool(2)
        closers.insert(0, pool.shutdown)
        api = NodeManagerApi(
            store=store,
            pool=pool,
            operations=SliverOperations(store, HollowBackend(), SystemClock()),
            resolve_caller=caller_resolver(store, getpwuid),
        )
        api.dispatch("GetRSpec", (names[0],), PeerIdentity("unix", os.geteuid()))
        dispatch, what = api.dispatch, "NodeManagerApi.dispatch"
    except Exception as exc:  # noqa: BLE001 - the methods module is optional here
        print(f"# NodeManagerApi unusable ({type(exc).__name__}: {exc}); using an equivalent function")

        def dispatch(method: str, params: tuple[Any, ...], peer: PeerIdentity) -> Any:
            if method != "GetRSpec" or len(params) != 1:
                raise UnknownMethod(method)
            record = store.sliver(params[0])
            if record is None:
                raise UnknownSliver(params[0])
            return rspec_from_attributes(record.attributes)

        what = "store + rspec_from_attributes"

    def close() -> None:
        for closer in closers:
            closer()

    return dispatch, names, what, close


# --------------------------------------------------------------------------- servers
@contextmanager
def ours(dispatch: Callable[..., Any], directory: Path) -> Iterator[dict[str, str]]:
    from nodemanager.api.server import ApiServer

    server = ApiServer(dispatch, tcp="127.0.0.1:0", unix_socket=str(directory / "ours.sock"))
    server.start()
    try:
        assert server.tcp_address is not None
        yield {"unix": str(server.unix_path), "tcp": "{}:{}".format(*server.tcp_address)}
    finally:
        server.stop()


@contextmanager
def stdlib(dispatch: Callable[..., Any], directory: Path) -> Iterator[dict[str, str]]:
    import socketserver
    from xmlrpc.server import (
        SimpleXMLRPCDispatcher,
        SimpleXMLRPCRequestHandler,
        SimpleXMLRPCServer,
    )

    from nodemanager.api.identity import PeerIdentity

    root = PeerIdentity("unix", 0, None)

    def get_rspec(name: str) -> Any:
        return dispatch("GetRSpec", (name,), root)

    class UnixHandler(SimpleXMLRPCRequestHandler):
        disable_nagle_algorithm = False  # fix 1: TCP_NODELAY fails on AF_UNIX

    class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer, SimpleXMLRPCDispatcher):
        daemon_threads = True
        request_queue_size = 128  # fix 3: read by server_activate() from the class
        logRequests = False  # fix 2: the handler reads it from the server

        def __init__(self, path: str) -> None:
            SimpleXMLRPCDispatcher.__init__(self, allow_none=False, encoding=None)
            socketserver.UnixStreamServer.__init__(self, path, UnixHandler)

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, _ = super().get_request()
            return sock, ("unix", 0)  # fix 4: AF_UNIX peers have an empty address

    class TcpServer(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
        daemon_threads = True
        request_queue_size = 128

    (directory / "stdlib.sock").unlink(missing_ok=True)  # left by a previous run of this server
    unix = UnixServer(str(directory / "stdlib.sock"))
    tcp = TcpServer(("127.0.0.1", 0), logRequests=False, allow_none=False)
    threads = []
    for server in (unix, tcp):
        server.register_function(get_rspec, "GetRSpec")
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        threads.append(thread)
    try:
        yield {"unix": str(directory / "stdlib.sock"), "tcp": f"127.0.0.1:{tcp.server_address[1]}"}
    finally:
        for server in (unix, tcp):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(5)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per configuration")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated client counts")
    parser.add_argument("--cpu-repeats", type=int, default=3,
                        help="16-client Unix runs per server whose median gives the CPU figures")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    directory = Path(tempfile.mkdtemp(prefix="nm-api-bench-"))
    dispatch, names, what, close = make_dispatch(directory)
    try:
        import asyncio

        loop = asyncio.new_event_loop()  # what ApiServer.start() runs (uvloop is never used)
        loop_kind = f"{type(loop).__module__}.{type(loop).__name__}"
        loop.close()
        print(f"# GetRSpec via {what}; server loop: {loop_kind}; {os.cpu_count()} CPUs; {args.calls} calls per run")
        results: dict[tuple[str, str, int], dict[str, float]] = {}
        for label, factory in (("stdlib", stdlib), ("ours", ours)):
            with factory(dispatch, directory) as targets:
                for transport in ("unix", "tcp"):
                    for clients in counts:
                        run_load(targets[transport], names, clients, min(200, args.calls))  # warm-up
                        figures = run_load(targets[transport], names, clients, args.calls)
                        results[(label, transport, clients)] = figures
                        print(
                            f"# {label:6} {transport:4} {clients:3} clients: {figures['calls_per_s']:8.0f} calls/s"
                            f"  p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms"
                            f"  server CPU {figures['cpu_us_per_call']:6.1f} us/call",
                            flush=True,
                        )
        for transport in ("unix", "tcp"):
            for clients in counts:
                mine, base = results[("ours", transport, clients)], results[("stdlib", transport, clients)]
                prefix = f"api_{transport}_{clients}"
                print(f"METRIC {prefix}_calls_per_s {mine['calls_per_s']:.0f} calls/s")
                print(f"METRIC {prefix}_p50_ms {mine['p50_ms']:.2f} ms")
                print(f"METRIC {prefix}_p99_ms {mine['p99_ms']:.2f} ms")
                print(f"METRIC {prefix}_vs_stdlib {mine['calls_per_s'] / base['calls_per_s']:.2f} ratio")
        cpu_clients = 16 if 16 in counts else counts[0]
        cpu: dict[str, list[float]] = {
            label: [results[(label, "unix", cpu_clients)]["cpu_us_per_call"]] for label in ("stdlib", "ours")
        }
        for _ in range(args.cpu_repeats - 1):  # alternate the two servers: a burst of load hits both
            for label, factory in (("stdlib", stdlib), ("ours", ours)):
                with factory(dispatch, directory) as targets:
                    run_load(targets["unix"], names, cpu_clients, min(200, args.calls))
                    cpu[label].append(run_load(targets["unix"], names, cpu_clients, args.calls)["cpu_us_per_call"])
        mine_cpu, base_cpu = statistics.median(cpu["ours"]), statistics.median(cpu["stdlib"])
        shown = {label: " ".join(f"{v:.1f}" for v in values) for label, values in cpu.items()}
        print(f"# server CPU per call on the {cpu_clients}-client Unix-socket runs (us; median of"
              f" {args.cpu_repeats}): stdlib {shown['stdlib']}; ours {shown['ours']}")
        print(f"METRIC api_server_cpu_us_per_call {mine_cpu:.1f} us")
        print(f"METRIC api_server_cpu_vs_stdlib {base_cpu / mine_cpu:.2f} ratio")
        return 0
    finally:
        close()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
