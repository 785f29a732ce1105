"""The daemon with blocking queries: a change at the authority reaches the store in seconds.

A whole node (hollow backend, real store, real sockets) runs in this process against WaitAuthority
(``nodemanager.testing.waitauthority``), with an hour-long poll period: only the watcher can bring
a change in time. And against an authority without an index it keeps polling as before and never
sends ``GetSliversWait``. ``status`` and the metrics say which of the two the node does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodemanager.config import parse_config
from nodemanager.core.errors import StoreError
from nodemanager.daemon import Node, build_node
from nodemanager.datadir import Meta
from nodemanager.status import collect_status, render_status
from nodemanager.statusjson import status_document
from nodemanager.testing.accounts import wait_for
from nodemanager.testing.waitauthority import WaitAuthority

pytestmark = pytest.mark.timeout(120)

KEY = "daemon-node-key"
IDS = {"site_one": 11, "site_two": 12, "site_three": 13}


def sliver(name: str, slice_id: int) -> dict[str, Any]:
    return {"name": name, "slice_id": slice_id, "instantiation": "plc-instantiated", "expires": 2_100_000_000,
            "keys": [], "attributes": []}


def node_for(tmp_path: Path, url: str, blocking_wait: int = 30) -> Node:
    (tmp_path / "node_id").write_text("1\n")
    (tmp_path / "node_key").write_text(KEY + "\n")
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"url": url, "node_id_file": str(tmp_path / "node_id"),
                      "node_key_file": str(tmp_path / "node_key"), "poll_interval": 3600, "poll_jitter": 0,
                      "timeout": 5, "blocking_wait": blocking_wait},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"backend": "hollow"},
    })
    return build_node(config)


@pytest.fixture
def running() -> Iterator[Any]:
    started: list[tuple[Node, threading.Thread]] = []

    def run(node: Node) -> tuple[Node, threading.Thread]:
        thread = threading.Thread(target=node.run, name="test-daemon", daemon=True)
        thread.start()
        started.append((node, thread))
        return node, thread

    yield run
    for node, thread in started:
        node.stop()
        thread.join(30)
        assert not thread.is_alive(), "the daemon did not stop"


def metric(node: Node, line: str) -> float:
    for text in node.metrics.render().decode().splitlines():
        if text.startswith(line + " "):
            return float(text.split()[-1])
    raise AssertionError(f"no metric {line}")


def slivers(node: Node) -> set[str]:
    try:
        return set(node.store.slivers())
    except StoreError:  # not open yet
        return set()


def watch_meta(node: Node) -> str:
    try:
        return node.store.get_meta(Meta.AUTHORITY_WATCH, "")
    except StoreError:
        return ""


@pytest.mark.parametrize("form", ["xmlrpc", "slices.xml"])
def test_a_change_reaches_the_store_without_a_poll(tmp_path: Path, running: Any, form: str) -> None:
    with WaitAuthority(node_key=KEY) as authority:
        authority.set_slivers([sliver("site_one", 11)])
        url = authority.xmlrpc_url if form == "xmlrpc" else authority.slices_xml_url
        node, thread = running(node_for(tmp_path, url))
        assert wait_for(lambda: slivers(node) == {"site_one"}, timeout=30)
        assert wait_for(lambda: authority.held == 1, timeout=30)  # the watcher waits

        for round_, names in enumerate((["site_one", "site_two"], ["site_two"], ["site_two", "site_three"])):
            authority.set_slivers([sliver(name, IDS[name]) for name in names])
            assert wait_for(lambda: slivers(node) == set(names), timeout=30), f"round {round_}"
            assert wait_for(lambda: authority.held == 1, timeout=30)

        plain = [k for k, d in authority.requests if k == "GetSlivers" or (k == "GET" and "wait" not in d[0])]
        # every change came with its wait's answer: no ordinary fetch was needed after the first
        assert len(plain) == 1, authority.requests
        assert metric(node, "nodemanager_authority_blocking") == 1
        assert metric(node, 'nodemanager_authority_waits_total{outcome="changed"}') == 3
        assert metric(node, 'nodemanager_authority_waits_total{outcome="error"}') == 0
        facts = collect_status(node.store)
        assert "authority:      watching (blocking queries of up to 30 s)" in render_status(node.store)
        assert status_document(facts)["sync"]["authority_watch"] == {
            "mode": "watching", "detail": "blocking queries of up to 30 s"}
        store_path = node.datadir.store_path
        node.stop()
        thread.join(15)
        assert not thread.is_alive()  # stop did not wait for the 30 s wait
    from nodemanager.store import Store

    with Store(store_path) as store:
        assert store.get_meta(Meta.AUTHORITY_WATCH, "") == ""  # no daemon: no claim of watching


def test_an_authority_without_index_is_polled(tmp_path: Path, running: Any) -> None:
    with WaitAuthority(node_key=KEY, offer_index=False) as authority:
        authority.set_slivers([sliver("site_one", 11)])
        node, _ = running(node_for(tmp_path, authority.xmlrpc_url))
        assert wait_for(lambda: slivers(node) == {"site_one"}, timeout=30)
        authority.set_slivers([sliver("site_one", 11), sliver("site_two", 12)])
        node.poll_now()  # what `nodemanager sync` does: the only way in before the next hour
        assert wait_for(lambda: slivers(node) == {"site_one", "site_two"}, timeout=30)
        node.poll_now()
        assert wait_for(lambda: authority.count("GetSlivers") == 3, timeout=30)
        assert wait_for(lambda: "polling" in watch_meta(node), timeout=10)
        assert authority.count("GetSliversWait") == 0
        assert metric(node, "nodemanager_authority_blocking") == 0
        assert "authority:      polling (the authority sent no index" in render_status(node.store)


def test_blocking_wait_zero_only_polls(tmp_path: Path, running: Any) -> None:
    with WaitAuthority(node_key=KEY) as authority:
        node, _ = running(node_for(tmp_path, authority.xmlrpc_url, blocking_wait=0))
        assert node.watcher is None
        assert wait_for(lambda: authority.count("GetSlivers") == 1, timeout=30)
        assert wait_for(lambda: watch_meta(node) == "polling: authority.blocking_wait = 0", timeout=10)
        node.poll_now()
        assert wait_for(lambda: authority.count("GetSlivers") == 2, timeout=30)
        assert authority.count("GetSliversWait") == 0


# --- the real thing: `nodemanager run` against the bundled authority -----------------------------

AUTHORITY_DATA = """
[[nodes]]
id = 1
key = "{key}"
"""

SLICE = """
[[slices]]
name = "{name}"
id = {slice_id}
nodes = [1]
"""


def test_an_edit_of_the_authority_file_reaches_a_running_daemon(tmp_path: Path) -> None:
    """A real daemon process (hollow backend, an hour between polls) and the real bundled
    authority: appending a slice to the authority's data file puts its sliver in the store within
    seconds, with no `nodemanager sync`."""
    from nodemanager.plc.server import AuthorityServer
    from nodemanager.store import Store
    from nodemanager.testing.daemonproc import start_nodemanager
    import tomli_w

    data = tmp_path / "authority.toml"
    data.write_text(AUTHORITY_DATA.format(key=KEY) + SLICE.format(name="site_first", slice_id=21))
    (tmp_path / "node_id").write_text("1\n")
    (tmp_path / "node_key").write_text(KEY + "\n")
    with AuthorityServer(data, "127.0.0.1", 0) as authority:
        config = tmp_path / "nm.toml"
        config.write_text(tomli_w.dumps({
            "node": {"data_dir": str(tmp_path / "data"), "log_file": str(tmp_path / "nm.log")},
            "authority": {"url": authority.url, "node_id_file": str(tmp_path / "node_id"),
                          "node_key_file": str(tmp_path / "node_key"), "poll_interval": 3600, "poll_jitter": 0,
                          "blocking_wait": 60},
            "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""}, "slivers": {"backend": "hollow"},
        }))
        store_path = tmp_path / "data" / "nodemanager.sqlite"

        def in_store() -> set[str]:
            if not store_path.exists():
                return set()
            try:
                with Store(store_path) as store:
                    return set(store.slivers())
            except StoreError:
                return set()

        def watching() -> bool:
            log = tmp_path / "nm.log"
            return log.exists() and "event=authority-watching" in log.read_text()

        process = start_nodemanager(config, "run", "--quiet")
        try:
            assert wait_for(lambda: in_store() == {"site_first"}, timeout=60)
            assert wait_for(watching, timeout=30)
            for number, name in enumerate(("site_second", "site_third"), start=22):
                with data.open("a") as handle:
                    handle.write(SLICE.format(name=name, slice_id=number))
                assert wait_for(lambda: name in in_store(), timeout=30), f"{name} did not arrive"
            process.terminate()
            assert process.wait(20) == 0  # a held 60 s wait does not delay the stop
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    log = (tmp_path / "nm.log").read_text()
    assert log.count("event=authority-changed") >= 2 and "event=daemon-stopped" in log
