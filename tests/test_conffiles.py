"""The ``conf_files`` handler on the real machine: real HTTP, real files, real shell commands.

Root: files are installed with their owner and group. The allowed directory is a temporary
directory; the sources come from a small ``http.server`` in a thread.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.conffiles import ConfFilesHandler, HttpSourceFetcher, status_lines, state_counts
from nodemanager.core.records import AuthorityDocument
from nodemanager.datadir import Meta
from nodemanager.host import Host
from nodemanager.hostshell import run_shell_command
from nodemanager.store import Store

pytestmark = pytest.mark.root

HUGE = 17 << 20


class Sources(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` by path (the query string is recorded and ignored); ``/huge-declared``
    announces 17 MiB, ``/huge-streamed`` sends them without a length."""

    files: dict[str, bytes] = {}
    seen: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        path, _, _ = self.path.partition("?")
        self.seen.append(self.path)
        if path == "/boot/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(HUGE))
            self.end_headers()
            return
        if path == "/boot/huge-streamed":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            block = b"x" * (1 << 20)
            try:
                for _ in range(HUGE >> 20):
                    self.wfile.write(block)
            except OSError:
                pass
            return
        data = self.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def server() -> Iterator[str]:
    Sources.files, Sources.seen = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sources)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/boot"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def allowed(tmp_path: Path, root_only: None) -> Path:
    path = tmp_path / "etc"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "nm.sqlite")
    yield s
    s.close()


def make_handler(store: Store, base: str, allowed: Path, **kwargs: object) -> ConfFilesHandler:
    return ConfFilesHandler(host=Host(), store=store, base_url=base, allowed_dirs=[str(allowed)],
                            fetch=HttpSourceFetcher(timeout=5), **kwargs)  # type: ignore[arg-type]


def entry(dest: Path | str, source: str = "f.conf", **changes: object) -> dict[str, object]:
    e: dict[str, object] = {"enabled": True, "source": source, "dest": str(dest), "file_owner": "root",
                            "file_group": "root", "file_permissions": "644", "preinstall_cmd": "",
                            "postinstall_cmd": None, "error_cmd": "", "ignore_cmd_errors": False,
                            "always_update": False}
    e.update(changes)
    return e


def apply(handler: ConfFilesHandler, *entries: dict[str, object]) -> dict[str, tuple[str, str]]:
    handler.apply(AuthorityDocument(timestamp=1, node_id=7, members={"conf_files": list(entries)}))
    state = json.loads(handler.store.get_meta(Meta.CONF_FILES))
    return {e["dest"]: (e["state"], e["reason"]) for e in state["entries"]}


def test_install_with_owner_group_mode_and_postinstall(store: Store, server: str, allowed: Path,
                                                       tmp_path: Path) -> None:
    Sources.files["/boot/PlanetLabConf/f.conf"] = b"hello\n"
    dest = allowed / "sub" / "dir" / "f.conf"
    log = tmp_path / "log"
    handler = make_handler(store, server, allowed)
    result = apply(handler, entry(dest, "PlanetLabConf/f.conf", file_owner="nobody", file_group="nogroup",
                                  file_permissions="0640", preinstall_cmd=f"echo pre >> {log}",
                                  postinstall_cmd=f"cat {dest} >> {log}; echo \"$HOME $FOO\" >> {log}"))
    assert result == {str(dest): ("installed", "")}
    info = dest.stat()
    assert dest.read_bytes() == b"hello\n" and stat.S_IMODE(info.st_mode) == 0o640
    assert (info.st_uid, info.st_gid) == (65534, 65534)
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o755 and dest.parent.stat().st_uid == 0
    assert log.read_text() == "pre\nhello\n/root \n"  # post ran after the write; clean environment
    assert Sources.seen == ["/boot/PlanetLabConf/f.conf?node_id=7"]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_unchanged_file_is_skipped_and_runs_nothing(store: Store, server: str, allowed: Path,
                                                   tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"v1"
    dest, log = allowed / "f.conf", tmp_path / "log"
    handler = make_handler(store, server, allowed)
    e = entry(dest, postinstall_cmd=f"echo post >> {log}")
    assert apply(handler, e)[str(dest)][0] == "installed"
    inode = dest.stat().st_ino
    assert apply(handler, e)[str(dest)][0] == "unchanged"
    assert log.read_text() == "post\n" and dest.stat().st_ino == inode
    # always_update reinstalls (and reruns the commands) even when nothing changed
    assert apply(handler, {**e, "always_update": True})[str(dest)][0] == "installed"
    assert log.read_text() == "post\npost\n" and dest.stat().st_ino != inode
    # new content, or a mode changed behind our back, is reinstalled
    os.chmod(dest, 0o600)
    assert apply(handler, e)[str(dest)][0] == "installed" and stat.S_IMODE(dest.stat().st_mode) == 0o644
    Sources.files["/boot/f.conf"] = b"v2"
    assert apply(handler, e)[str(dest)][0] == "installed" and dest.read_bytes() == b"v2"


def test_failing_preinstall_runs_error_cmd_and_skips_the_entry(store: Store, server: str, allowed: Path,
                                                               tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"new"
    dest, log = allowed / "f.conf", tmp_path / "log"
    dest.write_bytes(b"old")
    handler = make_handler(store, server, allowed)
    e = entry(dest, preinstall_cmd="echo nope; exit 3", error_cmd=f"echo error >> {log}",
              postinstall_cmd=f"echo post >> {log}")
    state, reason = apply(handler, e)[str(dest)]
    assert state == "failed" and "preinstall_cmd exited with status 3: nope" in reason
    assert dest.read_bytes() == b"old" and log.read_text() == "error\n"
    state, reason = apply(handler, {**e, "ignore_cmd_errors": True})[str(dest)]
    assert state == "installed" and "ignored" in reason
    assert dest.read_bytes() == b"new" and log.read_text() == "error\nerror\npost\n"


def test_failing_postinstall_runs_error_cmd_and_keeps_the_file(store: Store, server: str, allowed: Path,
                                                               tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"new"
    dest, log = allowed / "f.conf", tmp_path / "log"
    handler = make_handler(store, server, allowed)
    state, reason = apply(handler, entry(dest, postinstall_cmd="false", error_cmd=f"echo error >> {log}"))[str(dest)]
    assert state == "failed" and reason.startswith("installed, but postinstall_cmd exited with status 1")
    assert dest.read_bytes() == b"new" and log.read_text() == "error\n"


def test_a_hanging_command_is_killed_with_its_process_group(store: Store, server: str, allowed: Path,
                                                            tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"x"
    dest, pidfile = allowed / "f.conf", tmp_path / "pid"
    handler = make_handler(store, server, allowed, command_timeout=1.0)
    started = time.monotonic()
    state, reason = apply(handler, entry(dest, preinstall_cmd=f"sleep 60 & echo $! > {pidfile}; wait"))[str(dest)]
    assert time.monotonic() - started < 10
    assert state == "failed" and "killed after 1 s" in reason and not dest.exists()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_shell_output_is_bounded_and_stdin_is_devnull() -> None:
    result = run_shell_command("head -c 100000 /dev/zero; cat", timeout=10, output_limit=1000)
    assert result.ok and len(result.output) == 1000 and result.truncated
    closed = run_shell_command("exec >&-; sleep 30", timeout=1, output_limit=10)
    assert closed.timed_out and not closed.ok


def test_dest_outside_the_allow_list_or_with_dotdot_is_refused(store: Store, server: str, allowed: Path,
                                                               tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"evil"
    handler = make_handler(store, server, allowed)
    outside = tmp_path / "outside"
    result = apply(handler, entry(outside), entry(f"{allowed}/../outside2"), entry(allowed / "ok"),
                   entry(allowed / "suid", file_permissions="4755"))
    assert result[str(outside)][0] == "refused" and "allowed_dirs" in result[str(outside)][1]
    assert result[f"{allowed}/../outside2"][0] == "refused"
    assert result[str(allowed / "suid")][0] == "refused" and "setuid" in result[str(allowed / "suid")][1]
    assert result[str(allowed / "ok")][0] == "installed"
    assert not outside.exists() and not (tmp_path / "outside2").exists() and not (allowed / "suid").exists()


def test_symlinks_below_the_allowed_dir_are_never_followed(store: Store, server: str, allowed: Path,
                                                          tmp_path: Path) -> None:
    Sources.files["/boot/f.conf"] = b"evil"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (allowed / "linkdir").symlink_to(elsewhere)
    (allowed / "real").mkdir()
    (allowed / "real" / "deeper").symlink_to(elsewhere)
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (allowed / "final").symlink_to(target)
    handler = make_handler(store, server, allowed)
    result = apply(handler, entry(allowed / "linkdir" / "x"), entry(allowed / "real" / "deeper" / "y"),
                   entry(allowed / "final"))
    for dest in (allowed / "linkdir" / "x", allowed / "real" / "deeper" / "y"):
        assert result[str(dest)][0] == "refused" and "symbolic link" in result[str(dest)][1]
    assert list(elsewhere.iterdir()) == []
    # a link in the final position is replaced, never written through
    assert result[str(allowed / "final")][0] == "installed"
    assert target.read_bytes() == b"precious" and not (allowed / "final").is_symlink()


def test_missing_owner_or_group_is_refused(store: Store, server: str, allowed: Path) -> None:
    Sources.files["/boot/f.conf"] = b"x"
    handler = make_handler(store, server, allowed)
    result = apply(handler, entry(allowed / "a", file_owner="nmnosuchuser"),
                   entry(allowed / "b", file_group="nmnosuchgroup"))
    assert result[str(allowed / "a")] == ("refused", "no such user 'nmnosuchuser'")
    assert result[str(allowed / "b")] == ("refused", "no such group 'nmnosuchgroup'")
    assert list(allowed.iterdir()) == []


def test_fetch_failures_leave_the_installed_file(store: Store, server: str, allowed: Path, tmp_path: Path) -> None:
    dest, log = allowed / "f.conf", tmp_path / "log"
    dest.write_bytes(b"old")
    handler = make_handler(store, server, allowed)
    e = entry(dest, "missing.conf", preinstall_cmd=f"echo pre >> {log}")
    state, reason = apply(handler, e)[str(dest)]
    assert state == "failed" and "HTTP 404" in reason and dest.read_bytes() == b"old"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = make_handler(store, f"http://127.0.0.1:{port}/", allowed)
    state, reason = apply(refused, e)[str(dest)]
    assert state == "failed" and "ConnectionRefusedError" in reason and dest.read_bytes() == b"old"
    assert not log.exists()


@pytest.mark.parametrize("source", ["huge-declared", "huge-streamed"])
def test_a_huge_source_is_refused(store: Store, server: str, allowed: Path, source: str) -> None:
    dest = allowed / "f.conf"
    dest.write_bytes(b"old")
    state, reason = apply(make_handler(store, server, allowed), entry(dest, source))[str(dest)]
    assert state == "refused" and "cap" in reason and dest.read_bytes() == b"old"


def test_disabled_entries_are_skipped_and_status_shows_everything(store: Store, server: str,
                                                                  allowed: Path) -> None:
    Sources.files["/boot/f.conf"] = b"x"
    handler = make_handler(store, server, allowed)
    result = apply(handler, entry(allowed / "off", enabled=False), entry(allowed / "on"), entry("/etc/shadow"))
    assert result[str(allowed / "off")] == ("disabled", "") and not (allowed / "off").exists()
    raw = store.get_meta(Meta.CONF_FILES)
    assert state_counts(raw) == {"installed": 1, "unchanged": 0, "refused": 1, "failed": 0, "disabled": 1}
    lines = status_lines(raw, lambda epoch: "just now")
    assert lines[0] == "conf files:     1 installed, 1 refused, 1 disabled (just now)"
    assert lines[1].split() == ["REFUSED", "/etc/shadow:", "dest", "is", "not", "inside", "conf_files.allowed_dirs"]
    assert status_lines("", str) == [] and status_lines("{bad", str) == []


def test_a_document_without_conf_files_records_no_entries(store: Store, server: str, allowed: Path) -> None:
    handler = make_handler(store, server, allowed)
    handler.apply(AuthorityDocument(timestamp=1, node_id=7))
    assert state_counts(store.get_meta(Meta.CONF_FILES)) == dict.fromkeys(
        ("installed", "unchanged", "refused", "failed", "disabled"), 0)


def test_a_sync_installs_the_documents_conf_files(tmp_path: Path, server: str, allowed: Path,
                                                  home_root: Path) -> None:
    """Through ``daemon.build_node`` with the account backend on this machine (no slivers in the
    document, so no account is made): the sync hands ``conf_files`` to the handler."""
    from nodemanager.config import parse_config
    from nodemanager.daemon import build_node
    from nodemanager.status import render_status
    from nodemanager.testing.accounts import purge_accounts, uid_base_for_tests

    Sources.files["/boot/PlanetLabConf/motd"] = b"welcome\n"
    document = tmp_path / "slivers.json"
    document.write_text(json.dumps({"timestamp": 100, "node_id": 1, "slivers": [], "conf_files": [
        entry(allowed / "motd", "PlanetLabConf/motd", file_permissions="444"), entry("/etc/motd", "x")]}))
    config = parse_config({
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"url": document.as_uri(), "timeout": 5},
        "api": {"tcp": "", "unix_socket": ""}, "metrics": {"listen": ""},
        "slivers": {"home_root": str(home_root), "name_prefix": "nmcf", "uid_base": uid_base_for_tests(),
                    "keys_dir": str(tmp_path / "keys"), "group": "nmcfslivers"},
        "conf_files": {"enabled": True, "base_url": server, "allowed_dirs": [str(allowed)]},
    })
    node = build_node(config, enforcement=None, tickets=None)
    assert [h.name for h in node.syncer.document_handlers] == ["conf_files", "leases"]  # leases: always
    try:
        node.start(serve=False)
        outcome = node.sync_once(wait=True)
        assert outcome.ok, outcome.message
        assert (allowed / "motd").read_bytes() == b"welcome\n"
        assert stat.S_IMODE((allowed / "motd").stat().st_mode) == 0o444
        text = render_status(node.store)
        assert "conf files:     1 installed, 1 refused" in text and "REFUSED    /etc/motd" in text
        metrics = node.metrics.render().decode()
        assert 'nodemanager_conf_files{state="installed"} 1.0' in metrics
        assert 'nodemanager_conf_files{state="refused"} 1.0' in metrics
    finally:
        node.close()
        purge_accounts("nmcf")
