"""The node's conf_files fetcher (:class:`nodemanager.conffiles.HttpSourceFetcher`) against scripted
servers: CA verification, a whole-answer deadline, no redirects, a size cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nodemanager.conffiles import HttpSourceFetcher
from nodemanager.core.errors import AuthorityUnavailable, ConfigError, DocumentRejected

pytestmark = pytest.mark.timeout(30)


def test_the_fetcher_verifies_https_against_ca_file(scripted_server: Any, self_signed: tuple[Path, Path]) -> None:
    server = scripted_server([(200, b"content")], tls=self_signed)
    url = f"https://127.0.0.1:{server.port}/conf_files/x"
    assert HttpSourceFetcher(timeout=5, ca_file=str(self_signed[0]))(url) == b"content"
    with pytest.raises(AuthorityUnavailable, match="certificate verification failed"):
        HttpSourceFetcher(timeout=5)(url)  # the system CAs do not know this certificate


def test_the_fetcher_refuses_an_unreadable_ca_file_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        HttpSourceFetcher(timeout=5, ca_file=str(tmp_path / "missing.pem"))


def test_the_fetcher_has_a_whole_answer_deadline(trickling_server: int, stalled_port: int) -> None:
    for port in (trickling_server, stalled_port):
        with pytest.raises(AuthorityUnavailable, match="within 1 s"):
            HttpSourceFetcher(timeout=1)(f"http://127.0.0.1:{port}/x")


def test_the_fetcher_refuses_redirects_and_caps_the_size(scripted_server: Any) -> None:
    server = scripted_server([(302, b""), (200, b"x" * 2000)])
    fetch = HttpSourceFetcher(timeout=5, max_bytes=1000)
    with pytest.raises(AuthorityUnavailable, match="HTTP 302"):
        fetch(f"http://127.0.0.1:{server.port}/x")
    with pytest.raises(DocumentRejected, match="1000-byte cap"):
        fetch(f"http://127.0.0.1:{server.port}/x")
