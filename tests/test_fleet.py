"""``nodemanager fleet simulate``: hollow nodes against a real authority, through real processes.

The simulator runs as a subprocess of the real CLI against the real bundled authority (in this
process, on a loopback port): every node applies the first document and a fleet-wide change (a
slice added for all nodes) through the node's real code path, visible in each node's own SQLite
store; a node with a wrong key is refused and reported while the others proceed; SIGTERM/SIGINT
end it with a summary. Against a source that offers no blocking queries (a fake: a static
slices.xml web server, which sends no index) the nodes poll and never send a wait.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from nodemanager.core.errors import ConfigError
from nodemanager.fleet.simulator import load_keys, shares
from nodemanager.plc.server import AuthorityServer
from nodemanager.store import Store

pytestmark = pytest.mark.timeout(180)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
NODES = 30
WRONG = 7
DEADLINE_S = 90.0


def authority_toml(nodes: int, slices: list[str]) -> str:
    parts = [f'[[nodes]]\nid = {i}\nkey = "key-{i}"\n' for i in range(1, nodes + 1)]
    parts += [f'[[slices]]\nname = "{name}"\nid = {100 + n}\nkeys = ["{KEY}"]\n' for n, name in enumerate(slices)]
    return "\n".join(parts)


def simulate(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "nodemanager", "fleet", "simulate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(report: Path) -> list[dict[str, Any]]:
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text().splitlines() if line.endswith("}")]


def wait_until(what: str, check: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    """Poll ``check`` until true; fail naming ``what`` if the simulator dies or the deadline
    (generous: a failure detector, not a timing assertion) passes."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the simulator exited ({process.returncode}) before {what}:\n{out}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"no {what} within {DEADLINE_S} s:\n{out}\n{err[-3000:]}")
        time.sleep(0.05)


def applied_by(report: Path, accept: Callable[[dict[str, Any]], bool] = lambda r: True) -> dict[int, dict[str, Any]]:
    return {r["node_id"]: r for r in records(report) if r["event"] == "applied" and accept(r)}


def store_slivers(data_dir: Path, node_id: int) -> set[str]:
    path = data_dir / f"node-{node_id}.db"
    if not path.exists():
        return set()
    with Store(path) as store:
        return set(store.slivers())


def stop(process: subprocess.Popen[str], signum: int) -> tuple[str, str]:
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    return out, err


@pytest.fixture
def authority(tmp_path: Path) -> Iterator[tuple[AuthorityServer, Path]]:
    data = tmp_path / "authority.toml"
    data.write_text(authority_toml(NODES, ["site_one", "site_two", "site_three"]))
    with AuthorityServer(data) as server:
        yield server, data


# --------------------------------------------------------------------------- pure parts


def test_shares_split_the_node_ids_into_contiguous_near_equal_ranges() -> None:
    assert shares(10, 1, 3) == [(1, 4), (5, 3), (8, 3)]
    assert shares(2, 100, 4) == [(100, 1), (101, 1)]
    assert sum(count for _, count in shares(10_001, 1, 7)) == 10_001


def test_the_keys_file_is_node_id_and_key_per_line_and_a_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text("# node keys\n1 alpha\n\n  2   beta  \n")
    assert load_keys(path) == {1: "alpha", 2: "beta"}
    path.write_text("1 alpha\nthree gamma\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_keys(path)


def test_an_xmlrpc_authority_without_a_key_for_every_node_starts_nothing(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("1 a\n")
    result = subprocess.run([sys.executable, "-m", "nodemanager", "fleet", "simulate", "--authority",
                             "http://127.0.0.1:9/PLCAPI/", "--nodes", "2", "--keys", str(keys),
                             "--data-dir", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no node key for 1 node(s) (e.g. 2)" in result.stderr
    assert not list((tmp_path / "d").glob("node-*.db"))


# --------------------------------------------------------------------------- against the bundled authority


def test_every_node_applies_the_first_document_and_a_fleet_wide_change_by_blocking_query(
        authority: tuple[AuthorityServer, Path], tmp_path: Path) -> None:
    server, data = authority
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{i} {'wrong' if i == WRONG else f'key-{i}'}\n" for i in range(1, NODES + 1)))
    report, stores = tmp_path / "report.jsonl", tmp_path / "stores"
    good = set(range(1, NODES + 1)) - {WRONG}
    # --poll 600: a change can only arrive within the test through a blocking query
    process = simulate("--authority", server.url, "--nodes", str(NODES), "--keys", str(keys),
                       "--data-dir", str(stores), "--report", str(report), "--wait", "60", "--poll", "600",
                       "--ramp", "0.5")
    try:
        wait_until("first document on every good node and an error for the wrong key",
                   lambda: set(applied_by(report)) == good
                   and any(r["event"] == "error" and r["node_id"] == WRONG for r in records(report)), process)
        first = applied_by(report)
        assert all(r["slivers"] == 3 and r["nm_index"] for r in first.values())
        time.sleep(0.5)  # let the nodes enter their waits (a change before that is answered at once anyway)
        data.write_text(authority_toml(NODES, ["site_one", "site_two", "site_three", "site_new"]))
        wait_until("the new slice on every good node",
                   lambda: set(applied_by(report, lambda r: r["slivers"] == 4)) == good, process)
    finally:
        if process.poll() is None:
            out, err = stop(process, signal.SIGTERM)
    changed = applied_by(report, lambda r: r["slivers"] == 4)
    assert all(changed[n]["nm_index"] != first[n]["nm_index"] and changed[n]["timestamp"] > first[n]["timestamp"]
               for n in good)
    assert f"{NODES} nodes" in out and "errors on 1 nodes" in out and f"{len(good)} nodes on blocking" in out
    assert f"node {WRONG}: " in out and "authenticate" in out
    for node_id in good:
        assert store_slivers(stores, node_id) == {"site_one", "site_two", "site_three", "site_new"}
    assert store_slivers(stores, WRONG) == set()
    assert WRONG not in applied_by(report)


# --------------------------------------------------------------------------- fallback: no index, polling


class StaticSlicesXml:
    """A FAKE authority: a static web server of per-node slices.xml files, which (like any static
    server or a real PLC) sends no NM-Index. It records whether anyone sent a blocking query."""

    def __init__(self) -> None:
        self.slices = ["site_one"]
        self.timestamp = 1_700_000_000
        self.waits = 0
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (stdlib name)
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                fake.requests += 1
                if "wait" in query or self.headers.get("If-None-Match"):
                    fake.waits += 1
                node_id = int(query["node_id"][0])
                body = fake.document(node_id)
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def document(self, node_id: int) -> bytes:
        slices = "".join(f'<slice name="{name}" id="{100 + n}" instantiation="plc-instantiated" '
                         f'expires="4000000000"><key type="ssh">{KEY}</key></slice>'
                         for n, name in enumerate(self.slices))
        return f'<slices timestamp="{self.timestamp}" node_id="{node_id}">{slices}</slices>'.encode()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/slices.xml"


@pytest.fixture
def static_source() -> Iterator[StaticSlicesXml]:
    fake = StaticSlicesXml()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_without_an_index_the_nodes_poll_and_never_wait_in_several_processes(
        static_source: StaticSlicesXml, tmp_path: Path) -> None:
    report, stores = tmp_path / "report.jsonl", tmp_path / "stores"
    process = simulate("--authority", static_source.url, "--nodes", "20", "--first-node-id", "101",
                       "--data-dir", str(stores), "--report", str(report), "--poll", "0.5", "--ramp", "0.2",
                       "--processes", "2")
    try:
        wait_until("a first document on every node", lambda: len(applied_by(report)) == 20, process)
        static_source.slices = ["site_one", "site_two"]
        static_source.timestamp += 10
        wait_until("the second slice on every node by polling",
                   lambda: len(applied_by(report, lambda r: r["slivers"] == 2)) == 20, process)
    finally:
        if process.poll() is None:
            out, _ = stop(process, signal.SIGINT)
    assert set(applied_by(report)) == set(range(101, 121))
    assert all(r["nm_index"] is None for r in records(report) if r["event"] == "applied")
    assert static_source.waits == 0 and static_source.requests >= 40
    assert "20 nodes" in out and "0 errors" in out and "0 nodes on blocking" in out
    assert all(store_slivers(stores, n) == {"site_one", "site_two"} for n in range(101, 121))


# --------------------------------------------------------------------------- failures back off, then recover


def test_nodes_back_off_while_the_authority_is_down_and_recover_when_it_comes_up(tmp_path: Path) -> None:
    data = tmp_path / "authority.toml"
    data.write_text(authority_toml(20, ["site_one"]))
    keys = tmp_path / "keys.txt"
    keys.write_text("".join(f"{i} key-{i}\n" for i in range(1, 21)))
    with socket.socket() as probe:  # a port with nothing listening (yet)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = tmp_path / "report.jsonl"
    process = simulate("--authority", f"http://127.0.0.1:{port}/PLCAPI/", "--nodes", "20", "--keys", str(keys),
                       "--data-dir", str(tmp_path / "stores"), "--report", str(report), "--ramp", "0.2")
    try:
        wait_until("a refused connection reported for every node",
                   lambda: {r["node_id"] for r in records(report) if r["event"] == "error"} == set(range(1, 21)),
                   process)
        with AuthorityServer(data, port=port):
            wait_until("every node's first document once the authority is up",
                       lambda: len(applied_by(report)) == 20, process)
    finally:
        if process.poll() is None:
            out, _ = stop(process, signal.SIGTERM)
    errors = [r for r in records(report) if r["event"] == "error"]
    assert all("refused" in r["error"] for r in errors)
    assert "20 nodes, 20 documents applied" in out and "0 without any document" in out


def test_slices_xml_nodes_wait_with_if_none_match_and_get_the_change(
        authority: tuple[AuthorityServer, Path], tmp_path: Path) -> None:
    server, data = authority
    report, stores = tmp_path / "report.jsonl", tmp_path / "stores"
    url = server.url.replace("/PLCAPI/", "/slices.xml")
    process = simulate("--authority", url, "--nodes", "10", "--data-dir", str(stores), "--report", str(report),
                       "--wait", "60", "--poll", "600", "--ramp", "0.2")
    try:
        wait_until("a first document on every node", lambda: len(applied_by(report)) == 10, process)
        time.sleep(0.5)
        data.write_text(authority_toml(NODES, ["site_one", "site_two", "site_three", "site_new"]))
        wait_until("the new slice on every node",
                   lambda: len(applied_by(report, lambda r: r["slivers"] == 4)) == 10, process)
    finally:
        if process.poll() is None:
            out, _ = stop(process, signal.SIGTERM)
    assert all(r["nm_index"] for r in records(report) if r["event"] == "applied")
    assert "10 nodes on blocking queries" in out and "0 errors" in out
    assert all("site_new" in store_slivers(stores, n) for n in range(1, 11))


def test_duration_ends_the_run_with_a_summary_and_a_temporary_data_dir_is_removed(
        static_source: StaticSlicesXml, tmp_path: Path) -> None:
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    result = subprocess.run([sys.executable, "-m", "nodemanager", "fleet", "simulate", "--authority",
                             static_source.url, "--nodes", "5", "--duration", "1.5", "--ramp", "0.1"],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(env_tmp)})
    assert result.returncode == 0, result.stderr
    assert "5 nodes, 5 documents applied" in result.stdout and "0 without any document" in result.stdout
    assert "stores in " + str(env_tmp) in result.stderr
    assert list(env_tmp.iterdir()) == []
