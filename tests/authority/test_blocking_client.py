"""Blocking queries over real sockets: AuthorityClient and AuthorityWatcher against WaitAuthority.

WaitAuthority (``nodemanager.testing.waitauthority``) is a small raw-socket authority speaking the
protocol; it records every request, so the tests can say how many were made, not just what came
back. Waits are 1-2 s and timeouts tiny so a "hung" server is detected quickly; nothing asserts a
duration: only what happened, and that threads ended within a join's bound.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodemanager.authority.client import AuthorityClient
from nodemanager.authority.watch import AuthorityWatcher
from nodemanager.core.errors import AuthorityError, AuthorityUnavailable, DocumentRejected
from nodemanager.testing.accounts import wait_for
from nodemanager.testing.waitauthority import WaitAuthority

pytestmark = pytest.mark.timeout(60)

KEY = "node-key"


def sliver(name: str, slice_id: int = 7) -> dict[str, Any]:
    return {"name": name, "slice_id": slice_id, "instantiation": "plc-instantiated", "expires": 2_100_000_000,
            "keys": [], "attributes": []}


@pytest.fixture
def authority() -> Iterator[WaitAuthority]:
    with WaitAuthority(node_key=KEY) as server:
        yield server


def make_client(url: str, timeout: float = 5.0) -> AuthorityClient:
    return AuthorityClient(url=url, node_id=1, node_key=KEY, session=None, ca_file=None, timeout=timeout,
                           retries=0, sleep=lambda _: None)


def later(seconds: float, action: Any) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------------ the client


@pytest.mark.parametrize("form", ["xmlrpc", "slices.xml"])
def test_wait_answers_not_modified_then_changed_and_fetch_takes_the_kept_document(
    authority: WaitAuthority, form: str
) -> None:
    url = authority.xmlrpc_url if form == "xmlrpc" else authority.slices_xml_url
    client = make_client(url)
    assert client.index is None  # nothing fetched yet
    document, _ = client.fetch()
    assert document.slivers == () and client.index == "v1"

    assert client.wait_for_change("v1", 1) is False  # held about a second, then not modified
    assert client.index == "v1"

    changer = later(0.3, lambda: authority.set_slivers([sliver("site_new")]))
    assert client.wait_for_change("v1", 30) is True  # answered as soon as it changed
    changer.join()
    assert client.index == "v2"
    fetches = authority.count("GetSlivers") + authority.count("GET")
    document, _ = client.fetch()  # the kept document: no request
    assert [s.name for s in document.slivers] == ["site_new"]
    assert authority.count("GetSlivers") + authority.count("GET") == fetches
    document, _ = client.fetch()  # nothing kept any more: an ordinary request
    assert [s.name for s in document.slivers] == ["site_new"]
    assert authority.count("GetSlivers") + authority.count("GET") == fetches + 1


def test_an_older_index_is_answered_at_once(authority: WaitAuthority) -> None:
    client = make_client(authority.xmlrpc_url)
    client.fetch()
    authority.set_slivers([sliver("site_a")])
    assert client.wait_for_change("v1", 600) is True and client.index == "v2"


def test_the_wait_request_carries_index_and_wait(authority: WaitAuthority) -> None:
    client = make_client(authority.slices_xml_url)
    client.fetch()
    client.wait_for_change("v1", 1)
    gets = [detail for kind, detail in authority.requests if kind == "GET"]
    query, if_none_match = gets[-1]
    assert query == {"node_id": ["1"], "wait": ["1"]} and if_none_match == '"v1"'
    assert authority.requests[-2] == ("GET", ({"node_id": ["1"]}, None))


def test_an_authority_without_index_is_polled_and_never_asked_to_wait() -> None:
    with WaitAuthority(node_key=KEY, offer_index=False) as server:
        for url in (server.xmlrpc_url, server.slices_xml_url):  # slices.xml sends a bare ETag
            client = make_client(url)
            client.fetch()
            assert client.index is None
        assert server.count("GetSliversWait") == 0


def test_a_file_source_has_no_index(tmp_path: Any) -> None:
    path = tmp_path / "slices.xml"
    path.write_text('<slices timestamp="1" node_id="1"/>')
    client = AuthorityClient(url=f"file://{path}", node_id=1, node_key=None, session=None, ca_file=None, timeout=1)
    client.fetch()
    assert client.index is None


def test_a_rejected_document_still_gives_its_index(authority: WaitAuthority) -> None:
    """Waiting on the index of a document that failed validation is what wakes the node when
    the authority fixes it -- and it does not spin on the broken one."""
    client = AuthorityClient(url=authority.xmlrpc_url, node_id=1, node_key=KEY, session=None, ca_file=None,
                             timeout=5, retries=0)
    authority.node_id = 1
    authority.set_slivers([{"name": 5}])  # a bad entry: dropped, the document is still good
    document, _ = client.fetch()
    assert document.rejected and client.index == "v2"


def test_a_hung_wait_is_detected_after_wait_plus_margin() -> None:
    with WaitAuthority(node_key=KEY, hang_waits=True) as server:
        client = make_client(server.xmlrpc_url, timeout=0.5)
        client.fetch()
        with pytest.raises(AuthorityUnavailable, match="within 1.5 s|deadline") as info:
            client.wait_for_change("v1", 1)
        assert not isinstance(info.value, DocumentRejected)
        assert server.count("GetSliversWait") == 1


def test_a_503_is_unavailable_and_a_fault_an_authority_error() -> None:
    with WaitAuthority(node_key=KEY, fail_waits=1) as server:
        client = make_client(server.xmlrpc_url)
        client.fetch()
        with pytest.raises(AuthorityUnavailable, match="HTTP 503"):
            client.wait_for_change("v1", 1)
    with WaitAuthority(node_key="another-key") as server:
        client = make_client(server.xmlrpc_url)
        with pytest.raises(AuthorityError, match="failed to authenticate"):
            client.wait_for_change("v1", 1)


def test_close_waits_ends_a_wait_in_flight_and_refuses_later_ones(authority: WaitAuthority) -> None:
    client = make_client(authority.xmlrpc_url, timeout=30)
    client.fetch()
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(errors, lambda: client.wait_for_change("v1", 600)), daemon=True)
    thread.start()
    assert wait_for(lambda: authority.held == 1, timeout=10)
    client.close_waits()
    thread.join(10)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], AuthorityUnavailable) and "stopping" in str(errors[0])
    with pytest.raises(AuthorityUnavailable, match="closed"):
        client.wait_for_change("v1", 600)
    assert authority.count("GetSliversWait") == 1


def _capture(errors: list[BaseException], action: Any) -> None:
    try:
        action()
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        errors.append(exc)


# ------------------------------------------------------------------------------ the watcher


class Recorder:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.modes: list[bool] = []
        self.changes = 0
        self.pauses: list[float] = []

    def change(self) -> None:
        self.changes += 1

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        time.sleep(0.01)


def watcher_for(client: AuthorityClient, record: Recorder, wait: int = 2) -> AuthorityWatcher:
    return AuthorityWatcher(client, wait=wait, on_change=record.change, on_outcome=record.outcomes.append,
                            on_mode=record.modes.append, backoff_base=1.0, backoff_cap=60.0, idle_check=0.05,
                            rng=lambda: 0.5, pause=record.pause)


def test_watcher_wakes_on_a_change_and_loops_on_not_modified(authority: WaitAuthority) -> None:
    client = make_client(authority.xmlrpc_url)
    record = Recorder()
    watcher = watcher_for(client, record, wait=1)
    watcher.start()
    try:
        time.sleep(0.2)
        assert record.modes == [] and authority.count("GetSliversWait") == 0  # no document yet: nothing to say
        client.fetch()
        watcher.poke()
        assert wait_for(lambda: record.modes == [True] and "not_modified" in record.outcomes, timeout=10)
        authority.set_slivers([sliver("site_x")])
        assert wait_for(lambda: record.changes == 1, timeout=10)
        assert "changed" in record.outcomes and client.index == "v2"
        assert wait_for(lambda: authority.held == 1, timeout=10)  # already waiting on the new index
        assert authority.requests[-1] == ("GetSliversWait", ("v2", 1))
    finally:
        watcher.stop()
    assert record.pauses == []


def test_watcher_backs_off_on_errors_and_recovers() -> None:
    with WaitAuthority(node_key=KEY, fail_waits=4) as server:
        client = make_client(server.xmlrpc_url)
        client.fetch()
        record = Recorder()
        watcher = watcher_for(client, record, wait=1)
        watcher.start()
        try:
            assert wait_for(lambda: "not_modified" in record.outcomes, timeout=20)  # the fifth wait
            assert record.outcomes[:5] == ["error"] * 4 + ["not_modified"]
            assert record.pauses == [1.0, 2.0, 4.0, 8.0]  # backoff_delay with rng 0.5: base doubled
            assert watcher.failures == 0  # a good answer ends the backoff
        finally:
            watcher.stop()


def test_watcher_on_a_hung_server_retries_after_wait_plus_margin() -> None:
    with WaitAuthority(node_key=KEY, hang_waits=True) as server:
        client = make_client(server.xmlrpc_url, timeout=0.3)
        client.fetch()
        record = Recorder()
        watcher = watcher_for(client, record, wait=1)
        watcher.start()
        try:
            assert wait_for(lambda: server.count("GetSliversWait") >= 2, timeout=20)
            assert record.outcomes[0] == "error" and record.pauses[0] == 1.0
        finally:
            watcher.stop()


def test_watcher_stop_is_prompt_during_a_long_wait(authority: WaitAuthority) -> None:
    client = make_client(authority.xmlrpc_url, timeout=30)
    client.fetch()
    record = Recorder()
    watcher = watcher_for(client, record, wait=600)
    watcher.start()
    thread = watcher._thread
    assert thread is not None
    assert wait_for(lambda: authority.held == 1, timeout=10)
    watcher.stop(timeout=10)  # a 600 s wait: only closing its socket ends it within the bound
    assert not thread.is_alive()
    assert record.outcomes == [] and record.changes == 0  # giving up is not an error to count
    assert authority.count("GetSliversWait") == 1


def test_watcher_idles_without_an_index() -> None:
    with WaitAuthority(node_key=KEY, offer_index=False) as server:
        client = make_client(server.xmlrpc_url)
        record = Recorder()
        watcher = watcher_for(client, record)
        watcher.start()
        try:
            for _ in range(3):
                client.fetch()
                watcher.poke()
            assert wait_for(lambda: record.modes == [False], timeout=5)
            assert server.count("GetSlivers") == 3
        finally:
            watcher.stop()
        assert server.count("GetSliversWait") == 0 and record.outcomes == []
