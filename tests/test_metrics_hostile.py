"""A sliver must not blind the node's monitoring: the metrics endpoint, tried as a hostile uid.

A sliver with a shell can connect to ``metrics.listen`` (loopback, or the node's own address)
like any local process. Without a per-caller cap it can hold every scrape connection the endpoint
allows, reconnecting whenever one is closed, and the node's Prometheus then reads 503 or
nothing -- the "node down" alerts fire while the sliver does as it likes. The promise: one uid
holds at most :data:`~nodemanager.metrics.MAX_SCRAPE_CONNECTIONS_PER_UID` connections; a scraper
running as another uid is answered meanwhile.

The attacker is a real process running as an unprivileged uid (``setpriv``, numeric: no account
is created) with ``/usr/bin/python3`` (root's own interpreter may be a private build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator

import pytest

from nodemanager.metrics import MAX_SCRAPE_CONNECTIONS, MAX_SCRAPE_CONNECTIONS_PER_UID, NodeMetrics

HOSTILE_UID, SCRAPER_UID = 64011, 64012
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs callers as other uids)"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)"),
    pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON}"),
    pytest.mark.timeout(120),
]

# Opens COUNT connections to HOST:PORT and keeps that many open, reconnecting whenever the server
# closes one; prints {"open": N, "refused": M} once all were tried, then holds until stdin closes.
ATTACKER = textwrap.dedent(r"""
    import json, select, socket, sys, threading
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks, refused = [], 0
    def opened():
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # a head never finished: the slowest scraper
        return s
    for _ in range(count):
        s = opened()
        ready, _, _ = select.select([s], [], [], 0.05)
        if ready:  # answered at once: refused (503) and closed
            refused += 1
            s.close()
        else:
            socks.append(s)
    print(json.dumps({"open": len(socks), "refused": refused}), flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not stop.is_set():
        ready, _, _ = select.select(socks, [], [], 0.2)
        for s in ready:  # closed by the server (read timeout): take its place again
            socks.remove(s)
            s.close()
            try:
                socks.append(opened())
            except OSError:
                pass
""")

# One scrape; prints the HTTP status (or the error).
SCRAPER = textwrap.dedent(r"""
    import sys, urllib.error, urllib.request
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=10) as answer:
            print(answer.status, "nodemanager_build_info" in answer.read().decode())
    except urllib.error.HTTPError as exc:
        print(exc.code, False)
    except OSError as exc:
        print("error", exc)
""")


def as_uid(uid: int, *argv: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c", *argv],
        text=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, **kwargs,  # type: ignore[arg-type]
    )


def finish(attacker: subprocess.Popen[str]) -> None:
    """Let the attacker go (its stdin closes), kill it if it lingers, close its pipes."""
    if attacker.stdin is not None:
        attacker.stdin.close()
    try:
        attacker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        attacker.kill()
        attacker.wait()
    for pipe in (attacker.stdout, attacker.stderr):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def exporter() -> Iterator[tuple[str, int]]:
    metrics = NodeMetrics(backend="hollow")
    address = metrics.start_http("127.0.0.1:0")
    assert address is not None
    try:
        yield address
    finally:
        metrics.stop()


def test_one_uid_cannot_take_every_scrape_connection(exporter: tuple[str, int]) -> None:
    host, port = exporter
    attacker = as_uid(HOSTILE_UID, ATTACKER, host, str(port), str(MAX_SCRAPE_CONNECTIONS + 16),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attacker.stdout is not None
        held = json.loads(attacker.stdout.readline() or "{}")
        assert held, attacker.stderr.read() if attacker.stderr else "the attacker printed nothing"
        # It got its own share and no more: everything beyond was refused at once.
        assert held["open"] == MAX_SCRAPE_CONNECTIONS_PER_UID
        assert held["refused"] == MAX_SCRAPE_CONNECTIONS + 16 - MAX_SCRAPE_CONNECTIONS_PER_UID
        # Another uid scrapes, again and again, while the attacker keeps its connections
        # (including across the server's read timeout closing and the attacker reopening them).
        deadline = time.monotonic() + 3
        scrapes = 0
        while time.monotonic() < deadline or scrapes < 3:
            scraper = as_uid(SCRAPER_UID, SCRAPER, f"http://{host}:{port}/metrics",
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = scraper.communicate(timeout=30)
            assert out.split() == ["200", "True"], (out, err)
            scrapes += 1
        # Root (the node's own tools) is not capped either way.
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as answer:
            assert answer.status == 200
        assert attacker.poll() is None, "the attacker gave up: the test proved nothing"
    finally:
        finish(attacker)


def test_the_scraper_s_own_connections_are_released(exporter: tuple[str, int]) -> None:
    """A uid's count goes back down as its connections close: it may scrape forever."""
    host, port = exporter
    for _ in range(MAX_SCRAPE_CONNECTIONS_PER_UID * 3):
        scraper = as_uid(SCRAPER_UID, SCRAPER, f"http://{host}:{port}/metrics",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = scraper.communicate(timeout=30)
        assert out.split() == ["200", "True"], (out, err)


def test_a_refused_scraper_reads_503_not_a_hang(exporter: tuple[str, int]) -> None:
    host, port = exporter
    attacker = as_uid(HOSTILE_UID, ATTACKER, host, str(port), str(MAX_SCRAPE_CONNECTIONS_PER_UID),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert attacker.stdout is not None
        assert json.loads(attacker.stdout.readline())["open"] == MAX_SCRAPE_CONNECTIONS_PER_UID
        scraper = as_uid(HOSTILE_UID, SCRAPER, f"http://{host}:{port}/metrics",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _err = scraper.communicate(timeout=30)
        assert out.split()[0] == "503"
    finally:
        finish(attacker)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
