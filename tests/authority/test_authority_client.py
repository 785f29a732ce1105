"""AuthorityClient over real HTTP on 127.0.0.1: the bundled authority and scripted failures."""

from __future__ import annotations

import os
import time
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodemanager.authority.client import AuthorityClient, next_poll_delay
from nodemanager.core.retry import backoff_delay
from nodemanager.authority.parse import loads_xmlrpc_call
from nodemanager.plc.server import AuthorityServer
from nodemanager.config import parse_config
from nodemanager.core.errors import AuthorityError, AuthorityUnavailable, ConfigError, DocumentRejected

#: ``scripted_server`` fixture: starts a server answering ``(status, body[, delay])`` tuples in turn.
Scripted = Callable[..., Any]

pytestmark = pytest.mark.timeout(30)

GOOD_BODY = xmlrpc.client.dumps(({"timestamp": 10, "node_id": 1, "slivers": []},), methodresponse=True).encode()


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def client(url: str, sleep: FakeSleep | None = None, **overrides: object) -> AuthorityClient:
    options: dict[str, object] = dict(
        url=url, node_id=1, node_key="node-one-key", session=None, ca_file=None, timeout=0.5,
        retries=2, backoff_base=1.0, sleep=sleep or FakeSleep(), rng=lambda: 0.5,
    )
    options.update(overrides)
    return AuthorityClient(**options)  # type: ignore[arg-type]


def test_getslivers_with_the_right_key(authority: AuthorityServer) -> None:
    document, protected = client(authority.url).fetch()
    assert document.node_id == 1 and document.hostname == "node1.example.org" and document.bwcap_kbps == 50000
    assert [s.name for s in document.slivers] == ["site_alpha", "site_ctrl"]
    alpha = document.slivers[0]
    assert alpha.initscript == "echo hello"
    assert ("vsys", "a") in alpha.attributes and ("vsys", "b") in alpha.attributes
    assert document.rejected == () and protected == frozenset()


def test_other_node_sees_its_own_slivers(authority: AuthorityServer) -> None:
    document, _ = client(authority.url, node_id=2, node_key="node-two-key").fetch()
    assert [s.name for s in document.slivers] == ["site_ctrl", "site_deleg"]
    assert document.slivers[1].controller == "site_ctrl" and document.bwcap_kbps is None


def test_wrong_key_is_an_authority_fault_and_is_not_retried(authority: AuthorityServer) -> None:
    sleep = FakeSleep()
    with pytest.raises(AuthorityError, match="failed to authenticate") as info:
        client(authority.url, sleep, node_key="stolen-guess").fetch()
    assert not isinstance(info.value, (AuthorityUnavailable, DocumentRejected))
    assert sleep.calls == []


@pytest.mark.parametrize("path", ["/slices.xml", "/nodes/1/slices.xml"])
def test_slices_xml_over_http(authority: AuthorityServer, path: str) -> None:
    via_xmlrpc, _ = client(authority.url).fetch()
    via_xml, _ = client(f"http://127.0.0.1:{authority.port}{path}", node_key=None).fetch()
    assert via_xml == via_xmlrpc


def test_slices_xml_client_adds_the_node_id(scripted_server: Scripted) -> None:
    server = scripted_server([(200, b'<slices timestamp="3" node_id="1"/>')])
    document, _ = client(f"http://127.0.0.1:{server.port}/slices.xml?site=x", node_key=None).fetch()
    assert document.timestamp == 3
    assert server.requests == [("GET", "/slices.xml?site=x&node_id=1", b"")]


def test_editing_the_data_file_is_visible_at_the_next_fetch(authority: AuthorityServer, authority_file: Path) -> None:
    fetcher = client(authority.url)
    before, _ = fetcher.fetch()
    authority_file.write_text(authority_file.read_text().replace('name = "site_alpha"', 'name = "site_omega"'))
    after, _ = fetcher.fetch()  # same second: the timestamp must still grow
    assert [s.name for s in after.slivers] == ["site_omega", "site_ctrl"]
    assert after.timestamp > before.timestamp
    authority_file.write_text(authority_file.read_text().replace("nm_cpu_share = 2", "nm_cpu_share = true"))
    third, _ = fetcher.fetch()  # an invalid edit: the last good data keeps being served
    assert third == after


def test_500_then_200_is_retried_with_backoff(scripted_server: Scripted) -> None:
    server = scripted_server([(500, b""), (503, b""), (200, GOOD_BODY)])
    sleep = FakeSleep()
    document, _ = client(f"http://127.0.0.1:{server.port}/PLCAPI/", sleep).fetch()
    assert document.timestamp == 10
    assert sleep.calls == [1.0, 2.0]  # base 1 s then 2 s, jittered by 0.5 + rng (rng 0.5)
    method, params = loads_xmlrpc_call(server.requests[0][2], 4096)
    assert method == "GetSlivers" and params[0]["AuthMethod"] == "hmac" and params[0]["node_id"] == 1


def test_persistent_5xx_gives_up_as_unavailable(scripted_server: Scripted) -> None:
    server = scripted_server([(502, b"")])
    sleep = FakeSleep()
    with pytest.raises(AuthorityUnavailable, match="3 attempt"):
        client(f"http://127.0.0.1:{server.port}/PLCAPI/", sleep).fetch()
    assert len(server.requests) == 3 and len(sleep.calls) == 2


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        ((404, b"no"), AuthorityUnavailable),
        ((200, b"<html>proxy login</html>"), DocumentRejected),
        ((200, b"x" * 5000), DocumentRejected),
    ],
)
def test_no_retry_for_client_errors_or_garbage(
    scripted_server: Scripted, reply: tuple[int, bytes], error: type[Exception]
) -> None:
    server = scripted_server([reply])
    sleep = FakeSleep()
    with pytest.raises(error):
        client(f"http://127.0.0.1:{server.port}/PLCAPI/", sleep, max_bytes=4096).fetch()
    assert len(server.requests) == 1 and sleep.calls == []


def test_a_stalled_server_times_out(stalled_port: int) -> None:
    sleep = FakeSleep()
    start = time.monotonic()
    with pytest.raises(AuthorityUnavailable, match="2 attempt"):
        client(f"http://127.0.0.1:{stalled_port}/PLCAPI/", sleep, retries=1).fetch()
    assert len(sleep.calls) == 1
    assert time.monotonic() - start < 3


def test_a_slow_server_answering_too_late_times_out(scripted_server: Scripted) -> None:
    server = scripted_server([(200, GOOD_BODY, 2.0)])
    with pytest.raises(AuthorityUnavailable, match="1 attempt"):
        client(f"http://127.0.0.1:{server.port}/PLCAPI/", retries=0).fetch()


def test_a_trickling_answer_hits_the_whole_response_deadline(trickling_server: int) -> None:
    start = time.monotonic()
    with pytest.raises(AuthorityUnavailable, match="within 0.5 s"):
        client(f"http://127.0.0.1:{trickling_server}/PLCAPI/", retries=0).fetch()
    assert time.monotonic() - start < 2


def test_connection_refused_is_unavailable(stalled_port: int) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleep = FakeSleep()
    with pytest.raises(AuthorityUnavailable):
        client(f"http://127.0.0.1:{port}/PLCAPI/", sleep).fetch()
    assert len(sleep.calls) == 2


def test_file_urls(tmp_path: Path) -> None:
    (tmp_path / "slices.xml").write_bytes(b'<slices timestamp="4" node_id="1"/>')
    (tmp_path / "slivers.json").write_bytes(b'{"timestamp": 5, "slivers": []}')
    assert client((tmp_path / "slices.xml").as_uri(), node_key=None).fetch()[0].timestamp == 4
    assert client((tmp_path / "slivers.json").as_uri(), node_id=None, node_key=None).fetch()[0].timestamp == 5
    with pytest.raises(DocumentRejected, match="node 1"):
        client((tmp_path / "slices.xml").as_uri(), node_id=2).fetch()
    with pytest.raises(AuthorityUnavailable, match="cannot read"):
        client((tmp_path / "missing.json").as_uri()).fetch()
    with pytest.raises(DocumentRejected, match="cap"):
        client((tmp_path / "slices.xml").as_uri(), max_bytes=10).fetch()


def test_xmlrpc_without_credentials_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="node key"):
        client("https://plc.example.org/PLCAPI/", node_key=None)


def config_for(tmp_path: Path, url: str, **files: str) -> object:
    return parse_config({"authority": {"url": url, "node_id_file": str(tmp_path / "node_id"),
                                       "node_key_file": str(tmp_path / "node_key"), **files}})


def test_from_config_reads_the_node_files(tmp_path: Path, authority: AuthorityServer) -> None:
    (tmp_path / "node_id").write_text("1\n")
    (tmp_path / "node_key").write_text("node-one-key\n")
    fetcher = AuthorityClient.from_config(config_for(tmp_path, authority.url))  # type: ignore[arg-type]
    assert fetcher.node_id == 1 and fetcher.timeout == 30.0
    assert fetcher.fetch()[0].node_id == 1


def test_from_config_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "node_id").write_text("1")
    with pytest.raises(ConfigError, match="node_key_file .*node_key"):
        AuthorityClient.from_config(config_for(tmp_path, "https://plc/PLCAPI/"))  # type: ignore[arg-type]
    (tmp_path / "node_key").write_text("k")
    (tmp_path / "node_id").write_text("seven")
    with pytest.raises(ConfigError, match="node_id_file"):
        AuthorityClient.from_config(config_for(tmp_path, "https://plc/PLCAPI/"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="session_file"):
        AuthorityClient.from_config(config_for(tmp_path, "https://plc/PLCAPI/", session_file=str(tmp_path / "nope")))  # type: ignore[arg-type]


def test_from_config_without_node_files_for_slices_xml(tmp_path: Path) -> None:
    fetcher = AuthorityClient.from_config(config_for(tmp_path, "http://a/slices.xml"))  # type: ignore[arg-type]
    assert fetcher.node_id is None
    (tmp_path / "node_id").write_text("12")
    assert AuthorityClient.from_config(config_for(tmp_path, "file:///x/slivers.json")).node_id == 12  # type: ignore[arg-type]


def test_session_auth_is_sent_when_configured(
    tmp_path: Path, scripted_server: Scripted
) -> None:
    server = scripted_server([(200, GOOD_BODY)])
    (tmp_path / "session").write_text("abc123\n")
    (tmp_path / "node_id").write_text("1")
    url = f"http://127.0.0.1:{server.port}/PLCAPI/"
    fetcher = AuthorityClient.from_config(config_for(tmp_path, url, session_file=str(tmp_path / "session")))  # type: ignore[arg-type]
    fetcher.fetch()
    assert loads_xmlrpc_call(server.requests[0][2], 4096) == ("GetSlivers", ({"AuthMethod": "session", "session": "abc123"},))


def test_https_verifies_the_server_against_ca_file(scripted_server: Scripted, self_signed: tuple[Path, Path]) -> None:
    server = scripted_server([(200, GOOD_BODY)], tls=self_signed)
    url = f"https://127.0.0.1:{server.port}/PLCAPI/"
    assert client(url, ca_file=str(self_signed[0])).fetch()[0].timestamp == 10
    sleep = FakeSleep()
    with pytest.raises(AuthorityUnavailable, match="certificate verification failed"):
        client(url, sleep).fetch()  # system CAs do not know this certificate
    assert sleep.calls == [] and len(server.requests) == 1


def test_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        client("https://plc/PLCAPI/", ca_file=os.fspath(tmp_path / "missing.pem"))


def test_poll_and_backoff_delays() -> None:
    assert next_poll_delay(600, 300, lambda: 0.0) == 600
    assert next_poll_delay(600, 300, lambda: 0.999) == pytest.approx(899.7)
    inf = float("inf")
    assert [backoff_delay(n, 1.0, inf, lambda: 0.5) for n in range(1, 5)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(4, 1.0, inf, lambda: 0.0) == 4.0
    assert backoff_delay(31, 1.0, 300.0, lambda: 0.5) == 300.0
    assert backoff_delay(10_000, 1.0, inf, lambda: 0.5) > 0  # no overflow
