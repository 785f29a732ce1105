"""Blocking queries against the real bundled authority (docs/blocking-queries.md).

Real server, real sockets. Waits are observed through events and generous timeouts, never by
asserting how fast something was; data-file edits are atomic renames of a file whose mtime is
set first, so that no half-made state (or a mtime on another day) is ever loaded.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import resource
import threading
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nodemanager.authority.auth import hmac_auth
from nodemanager.authority.parse import parse_slices_xml
from nodemanager.plc.server import AuthorityServer

pytestmark = pytest.mark.timeout(120)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"
DAY = 1_700_006_400 - 1_700_006_400 % 86400  # a fixed UTC midnight: every edit lands on that day

DATA = f"""
[[nodes]]
id = 1
key = "node-one-key"
[[nodes]]
id = 2
key = "node-two-key"
[[slices]]
name = "site_alpha"
id = 101
nodes = [1]
keys = ["{KEY}"]
[slices.attributes]
nm_cpu_share = 2
[[slices]]
name = "site_beta"
id = 102
nodes = [2]
[slices.attributes]
nm_cpu_share = 2
[[slices]]
name = "site_everywhere"
id = 103
"""
KEYS = {1: "node-one-key", 2: "node-two-key"}


class DataFile:
    """The authority's data file; every :meth:`write` is atomic and one minute "later"."""

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text, self.minute = path, text, 0
        self.write(text)

    def write(self, text: str) -> None:
        self.minute += 1
        staging = self.path.with_name(self.path.name + ".new")
        staging.write_text(text)
        os.utime(staging, (DAY + 60 * self.minute, DAY + 60 * self.minute))
        os.replace(staging, self.path)
        self.text = text

    def edit(self, old: str, new: str) -> None:
        assert old in self.text
        self.write(self.text.replace(old, new, 1))


@pytest.fixture
def data_file(tmp_path: Path) -> DataFile:
    return DataFile(tmp_path / "authority.toml", DATA)


@pytest.fixture
def server(data_file: DataFile) -> Iterator[AuthorityServer]:
    with AuthorityServer(data_file.path) as running:
        yield running


def post(server: AuthorityServer, method: str, *params: Any, timeout: float = 30) -> Any:
    """One XML-RPC call; a Fault is returned, not raised (so threads can hand it back)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request("POST", "/PLCAPI/", body=xmlrpc.client.dumps(params, method, allow_none=True).encode())
        response = connection.getresponse()
        assert response.status == 200
        try:
            return xmlrpc.client.loads(response.read())[0][0]
        except xmlrpc.client.Fault as fault:
            return fault
    finally:
        connection.close()


def get_slivers(server: AuthorityServer, node: int) -> dict[str, Any]:
    return post(server, "GetSlivers", hmac_auth(node, KEYS[node]))  # type: ignore[no-any-return]


def wait_call(server: AuthorityServer, node: int, index: str, wait: int, key: str | None = None) -> Any:
    return post(server, "GetSliversWait", hmac_auth(node, key or KEYS[node], [index, wait]), index, wait)


def get(server: AuthorityServer, target: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, target, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def waiting(server: AuthorityServer, *nodes: int) -> Callable[[], bool]:
    return lambda: all(server.waits.waiter_of(node) is not None for node in nodes)


@pytest.fixture
def background() -> Iterator[Callable[..., Future[Any]]]:
    with ThreadPoolExecutor(8) as pool:
        yield pool.submit


# --------------------------------------------------------------------------- XML-RPC
def test_getslivers_carries_the_index_and_slices_xml_the_same_etag(server: AuthorityServer) -> None:
    answer = get_slivers(server, 1)
    status, headers, body = get(server, "/slices.xml?node_id=1")
    assert status == 200 and headers["etag"] == f'"{answer["nm_index"]}"' and headers["nm-index"] == answer["nm_index"]
    assert get_slivers(server, 2)["nm_index"] != answer["nm_index"]
    assert [s.name for s in parse_slices_xml(body, expected_node_id=1)[0].slivers] == ["site_alpha", "site_everywhere"]


def test_a_stale_index_is_answered_at_once_with_the_document(server: AuthorityServer) -> None:
    answer = wait_call(server, 1, "stale-index", 600)
    assert answer == get_slivers(server, 1) and "nm_not_modified" not in answer


def test_a_held_wait_is_answered_when_its_node_changes(server: AuthorityServer, data_file: DataFile,
                                                      background: Callable[..., Future[Any]],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodemanager.plc")
    index = get_slivers(server, 1)["nm_index"]
    pending = background(wait_call, server, 1, index, 600)
    until(waiting(server, 1))
    assert not pending.done()
    data_file.edit("nm_cpu_share = 2", "nm_cpu_share = 7")  # site_alpha: node 1 only
    answer = pending.result(timeout=10)  # the watcher sees the edit within 0.25 s
    assert answer["nm_index"] != index and "nm_not_modified" not in answer
    alpha = next(s for s in answer["slivers"] if s["name"] == "site_alpha")
    assert {"tagname": "nm_cpu_share", "value": "7"} in alpha["attributes"]
    assert "event=data-reloaded nodes_changed=1 waiters_woken=1" in caplog.text


def test_an_edit_of_another_node_wakes_nobody_else(server: AuthorityServer, data_file: DataFile,
                                                   background: Callable[..., Future[Any]]) -> None:
    one, two = get_slivers(server, 1)["nm_index"], get_slivers(server, 2)["nm_index"]
    first = background(wait_call, server, 1, one, 2)
    second = background(wait_call, server, 2, two, 600)
    until(waiting(server, 1, 2))
    data_file.edit("nm_cpu_share = 2\n[[slices]]\nname = \"site_everywhere\"",
                   "nm_cpu_share = 3\n[[slices]]\nname = \"site_everywhere\"")  # site_beta: node 2 only
    assert second.result(timeout=10)["nm_index"] != two
    assert first.result(timeout=10) == {"nm_index": one, "nm_not_modified": True}  # its wait ran out
    assert get_slivers(server, 1)["nm_index"] == one


def test_a_wait_ends_not_modified(server: AuthorityServer) -> None:
    index = get_slivers(server, 2)["nm_index"]
    assert wait_call(server, 2, index, 1) == {"nm_index": index, "nm_not_modified": True}
    assert wait_call(server, 2, index, 0) == {"nm_index": index, "nm_not_modified": True}  # clamped to 1 s


def test_a_new_wait_supersedes_the_older_one(server: AuthorityServer, data_file: DataFile,
                                             background: Callable[..., Future[Any]]) -> None:
    index = get_slivers(server, 1)["nm_index"]
    older = background(wait_call, server, 1, index, 600)
    until(waiting(server, 1))
    held = server.waits.waiter_of(1)
    newer = background(wait_call, server, 1, index, 600)
    assert older.result(timeout=10) == {"nm_index": index, "nm_not_modified": True}
    until(lambda: server.waits.waiter_of(1) not in (None, held))
    assert not newer.done()
    data_file.edit("nm_cpu_share = 2", "nm_cpu_share = 9")
    assert newer.result(timeout=10)["nm_index"] != index


def test_the_jitter_shortens_the_wait_by_at_most_a_sixteenth(server: AuthorityServer,
                                                             background: Callable[..., Future[Any]]) -> None:
    index = get_slivers(server, 1)["nm_index"]
    # The deadline is read a moment after it was set: allow 2 s for a loaded machine (the three
    # expected values are 5 s apart).
    for fraction, low, high in ((0.0, 158.0, 160.0), (1.0, 148.0, 150.0), (0.5, 153.0, 155.0)):
        server.rng = lambda fraction=fraction: fraction
        pending = background(wait_call, server, 1, index, 160)
        until(waiting(server, 1))
        waiter = server.waits.waiter_of(1)
        assert waiter is not None
        assert low <= waiter.deadline - time.monotonic() <= high
        wait_call(server, 1, index, 1)  # supersede it (answered at once), then let the short one end
        assert pending.result(timeout=10)["nm_not_modified"] is True


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ((hmac_auth(1, "wrong-key", ["x", 5]), "x", 5), 108),
        ((hmac_auth(1, "node-one-key", ["x", 5]), "y", 5), 108),  # the HMAC covers index and wait
        ((hmac_auth(9, "node-one-key", ["x", 5]), "x", 5), 108),
        ((hmac_auth(1, "node-one-key"),), 101),
        ((hmac_auth(1, "node-one-key", ["x"]), "x"), 101),
        ((hmac_auth(1, "node-one-key", [5, 5]), 5, 5), 102),
        ((hmac_auth(1, "node-one-key", ["a b", 5]), "a b", 5), 102),
        ((hmac_auth(1, "node-one-key", ["x", "5"]), "x", "5"), 102),
        ((hmac_auth(1, "node-one-key", ["x", 1.5]), "x", 1.5), 102),
        ((hmac_auth(1, "node-one-key", ["x", True]), "x", True), 102),
        (("not a struct", "x", 5), 108),
    ],
)
def test_bad_calls_are_faults(server: AuthorityServer, params: tuple[Any, ...], code: int) -> None:
    fault = post(server, "GetSliversWait", *params)
    assert isinstance(fault, xmlrpc.client.Fault) and fault.faultCode == code
    assert get_slivers(server, 1)["node_id"] == 1  # and the server carries on


def test_stopping_answers_the_held_waits(data_file: DataFile, background: Callable[..., Future[Any]]) -> None:
    server = AuthorityServer(data_file.path)
    server.start()
    try:
        index = get_slivers(server, 1)["nm_index"]
        pending = background(wait_call, server, 1, index, 600)
        until(waiting(server, 1))
    finally:
        server.stop()
    assert pending.result(timeout=10) == {"nm_index": index, "nm_not_modified": True}


def test_connections_beyond_max_connections_are_refused(data_file: DataFile,
                                                        background: Callable[..., Future[Any]]) -> None:
    with AuthorityServer(data_file.path, max_connections=2) as server:
        one, two = get_slivers(server, 1)["nm_index"], get_slivers(server, 2)["nm_index"]
        held = [background(wait_call, server, 1, one, 600), background(wait_call, server, 2, two, 600)]
        until(waiting(server, 1, 2))
        status, _, body = get(server, "/nodes/1/slices.xml")
        assert status == 503 and b"too many connections" in body
        data_file.edit("nm_cpu_share = 2", "nm_cpu_share = 5")  # node 1 only
        assert held[0].result(timeout=10)["nm_index"] != one
        until(lambda: get(server, "/nodes/1/slices.xml")[0] == 200)  # a slot is free again
        server.rng = lambda: 0.0
        wait_call(server, 2, two, 1)  # supersedes node 2's wait
        assert held[1].result(timeout=10)["nm_not_modified"] is True


def test_dispatch_answers_a_wait_without_holding(server: AuthorityServer) -> None:
    index = get_slivers(server, 1)["nm_index"]
    body = server.dispatch("GetSliversWait", (hmac_auth(1, "node-one-key", [index, 600]), index, 600))
    assert xmlrpc.client.loads(body)[0][0] == {"nm_index": index, "nm_not_modified": True}


# --------------------------------------------------------------------------- slices.xml
def test_slices_xml_conditional_get(server: AuthorityServer) -> None:
    status, headers, body = get(server, "/nodes/1/slices.xml")
    etag, index = headers["etag"], headers["nm-index"]
    assert status == 200 and etag == f'"{index}"'
    for target in ("/nodes/1/slices.xml", "/slices.xml?node_id=1"):
        status, headers, body = get(server, target, {"If-None-Match": etag})
        assert (status, body, headers["etag"], headers["nm-index"]) == (304, b"", etag, index)
    assert get(server, "/nodes/1/slices.xml", {"If-None-Match": f'"other", W/{etag}'})[0] == 304
    assert get(server, "/nodes/1/slices.xml", {"If-None-Match": '"other"'})[0] == 200
    assert get(server, "/nodes/2/slices.xml", {"If-None-Match": etag})[0] == 200  # node 2's index differs
    assert get(server, "/nodes/1/slices.xml", method="HEAD")[1]["etag"] == etag


def test_slices_xml_waits_then_304(server: AuthorityServer) -> None:
    etag = get(server, "/nodes/1/slices.xml")[1]["etag"]
    status, headers, body = get(server, "/slices.xml?node_id=1&wait=1", {"If-None-Match": etag})
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert get(server, "/slices.xml?node_id=1&wait=1")[0] == 200  # no If-None-Match: at once
    assert get(server, "/slices.xml?node_id=1&wait=soon", {"If-None-Match": etag})[0] == 400


def test_slices_xml_wait_is_answered_by_a_change(server: AuthorityServer, data_file: DataFile,
                                                 background: Callable[..., Future[Any]]) -> None:
    etag = get(server, "/nodes/1/slices.xml")[1]["etag"]
    pending = background(get, server, "/nodes/1/slices.xml?wait=600", {"If-None-Match": etag})
    until(waiting(server, 1))
    data_file.edit('keys = ["' + KEY + '"]\n', "")  # site_alpha loses its key
    status, headers, body = pending.result(timeout=10)
    assert status == 200 and headers["etag"] != etag
    alpha = parse_slices_xml(body, expected_node_id=1)[0].slivers[0]
    assert alpha.name == "site_alpha" and alpha.keys == ()


# --------------------------------------------------------------------------- many waiters
def many_nodes(count: int) -> str:
    nodes = "".join(f'[[nodes]]\nid = {n}\nkey = "key-{n}"\n' for n in range(1, count + 1))
    return nodes + f'[[slices]]\nname = "site_all"\nid = 1\nkeys = ["{KEY}"]\n'


async def hold_and_collect(port: int, calls: dict[int, bytes], registered: Callable[[], bool],
                           edit: Callable[[], None]) -> dict[int, bytes]:
    """Open one connection per call, send them all, wait until the server holds them, edit, and
    read every answer."""
    connections = {}
    for node, body in calls.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /PLCAPI/ HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        connections[node] = (reader, writer)
    deadline = time.monotonic() + 60
    while not registered():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await asyncio.to_thread(edit)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = await reader.readexactly(length)
        writer.close()
        return body

    results = await asyncio.wait_for(asyncio.gather(*(answer(*connections[n]) for n in calls)), 90)
    return dict(zip(calls, results))


@pytest.mark.slow
def test_two_thousand_waiting_connections_are_all_answered_after_one_edit(tmp_path: Path) -> None:
    count = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * count + 200  # both ends of every connection live in this process
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    try:
        data = DataFile(tmp_path / "authority.toml", many_nodes(count))
        with AuthorityServer(data.path) as server:
            indexes = server.snapshot().indexes
            calls = {n: xmlrpc.client.dumps((hmac_auth(n, f"key-{n}", [indexes[n], 600]), indexes[n], 600),
                                            "GetSliversWait").encode() for n in indexes}
            answers = asyncio.run(hold_and_collect(
                server.port, calls, lambda: len(server.waits) == count,
                lambda: data.edit('id = 1\nkeys', 'id = 1\ninitscript = "echo new"\nkeys'),
            ))
            assert len(server.waits) == 0
        for node, body in answers.items():
            answer = xmlrpc.client.loads(body)[0][0]
            assert answer["node_id"] == node and answer["nm_index"] != indexes[node]
            assert answer["slivers"][0]["attributes"] == [{"tagname": "initscript_code", "value": "echo new"}]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
