"""Logging under systemd: stderr lines carry the journal priority when stderr is the journal, and the
daemon logs there only (no file) unless the configuration sets ``node.log_file`` itself."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from nodemanager.config import Config, load_config, to_toml
from nodemanager.logsetup import JournalFormatter, journal_priority, log_destination, stderr_is_journal
from nodemanager.testing.daemonproc import SOURCE_ROOT, write_daemon_config, write_slivers_document


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (5, 7), (logging.INFO + 5, 6), (logging.CRITICAL + 10, 2),
])
def test_level_to_journal_priority(level: int, priority: int) -> None:
    assert journal_priority(level) == priority


def test_every_line_of_a_record_is_prefixed() -> None:
    formatter = JournalFormatter("level=%(levelname)s %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "event=failed", None, sys.exc_info())
    lines = formatter.format(record).split("\n")
    assert lines[0] == "<3>level=ERROR event=failed"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>ValueError: boom"


def test_detection_compares_device_and_inode_of_the_fd(tmp_path: Path) -> None:
    target, other = tmp_path / "journal", tmp_path / "other"
    target.touch()
    other.touch()
    with open(target, "w") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream.fileno())
        ost = os.stat(other)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{ost.st_dev}:{ost.st_ino}"}, stream.fileno())
        for value in ("", "garbage", f"{st.st_dev}", f"x:{st.st_ino}", f"{st.st_dev}:"):
            assert not stderr_is_journal({"JOURNAL_STREAM": value}, stream.fileno())
        assert not stderr_is_journal({}, stream.fileno())
    bad_fd = os.open(os.devnull, os.O_RDONLY)
    os.close(bad_fd)
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, bad_fd)


_CHILD = """
import logging, sys
from nodemanager.logsetup import configure_logging
problems = configure_logging(sys.argv[1], foreground=sys.argv[2] == "fg", level=logging.DEBUG)
log = logging.getLogger("nodemanager.test")
log.debug("event=d"); log.info("event=i"); log.warning("event=w"); log.error("event=e")
log.critical("event=c")
"""


def _run(tmp_path: Path, log_file: str, mode: str, journal: bool) -> str:
    err = tmp_path / "stderr"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with open(err, "w") as stream:
        if journal:  # as systemd does: the variable names the stream it connected to stderr
            st = os.fstat(stream.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", _CHILD, log_file, mode], stderr=stream, env=env,
                       check=True, timeout=60)
    return err.read_text()


def test_under_systemd_without_a_log_file_lines_go_to_the_journal_with_priorities(tmp_path: Path) -> None:
    lines = _run(tmp_path, "", "quiet", journal=True).splitlines()
    assert lines == [
        "<7>level=DEBUG logger=nodemanager.test event=d",
        "<6>level=INFO logger=nodemanager.test event=i",
        "<4>level=WARNING logger=nodemanager.test event=w",
        "<3>level=ERROR logger=nodemanager.test event=e",
        "<2>level=CRITICAL logger=nodemanager.test event=c",
    ]


def test_under_systemd_a_configured_log_file_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "nm.log"
    assert _run(tmp_path, str(log), "quiet", journal=True) == ""
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and not lines[0].startswith("<")
    assert " level=DEBUG logger=nodemanager.test event=d" in lines[0]


def test_stderr_that_is_not_the_journal_has_no_prefix(tmp_path: Path) -> None:
    lines = _run(tmp_path, "", "fg", journal=False).splitlines()
    assert len(lines) == 5
    assert all(not line.startswith("<") and " level=" in line for line in lines)


# --- the daemon's choice: journal by default under systemd, a file when configured ------------

def test_log_destination_journal_only_when_the_file_was_not_chosen(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        journal = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        default = "/var/log/pl_node_mgr.log"
        assert log_destination(default, explicit=False, environ=journal, fd=stream.fileno()) == ""
        assert log_destination(default, explicit=True, environ=journal, fd=stream.fileno()) == default
        assert log_destination("/x/nm.log", explicit=True, environ=journal, fd=stream.fileno()) == "/x/nm.log"
        # outside systemd nothing changes, set or not
        assert log_destination(default, explicit=False, environ={}, fd=stream.fileno()) == default
        assert log_destination("", explicit=True, environ={}, fd=stream.fileno()) == ""


def test_config_knows_which_keys_the_file_set_without_changing_equality_or_show(tmp_path: Path) -> None:
    written = tmp_path / "with.toml"
    written.write_text('[node]\nlog_file = "/var/log/pl_node_mgr.log"\n[sync]\nconfirm_after = 2\n')
    silent = tmp_path / "without.toml"
    silent.write_text('[node]\ndata_dir = "/var/lib/nodemanager"\n')
    with_key, without_key = load_config(written), load_config(silent)
    assert with_key.explicit == {"node.log_file", "sync.confirm_after"}
    assert without_key.explicit == {"node.data_dir"}
    assert Config().explicit == frozenset()
    # same values, same configuration: explicitness is not a key and is not compared
    assert with_key == without_key == Config()
    # `config show` keeps the contract's default visible
    assert 'log_file = "/var/log/pl_node_mgr.log"' in to_toml(without_key)
    assert "explicit" not in to_toml(with_key)


def _daemon_config(tmp_path: Path, *, log_file: str | None) -> Path:
    document = tmp_path / "slivers.json"
    write_slivers_document(document, ["site_log"], 1)
    path = write_daemon_config(tmp_path, document, slivers={"backend": "hollow"})
    data = tomllib.loads(path.read_text())
    if log_file is None:
        del data["node"]["log_file"]
    else:
        data["node"]["log_file"] = log_file
    path.write_text(tomli_w.dumps(data))
    return path


def _run_daemon_as_systemd_would(config: Path, stderr_path: Path, until: Path) -> None:
    """``nodemanager run --quiet`` with stderr connected the way systemd connects it to the
    journal (JOURNAL_STREAM names it); stopped with SIGTERM once ``until`` holds a sync line."""
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    with open(stderr_path, "w") as stream:
        st = os.fstat(stream.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        child = subprocess.Popen([sys.executable, "-m", "nodemanager", "-c", str(config), "run", "--quiet"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stream, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if until.exists() and "event=sync" in until.read_text():
                break
            time.sleep(0.1)
    finally:
        child.terminate()
        assert child.wait(timeout=60) == 0


@pytest.mark.slow
def test_daemon_under_systemd_logs_to_the_journal_unless_a_file_is_configured(tmp_path: Path) -> None:
    unset = tmp_path / "unset"
    unset.mkdir()
    stderr = unset / "stderr"
    _run_daemon_as_systemd_would(_daemon_config(unset, log_file=None), stderr, until=stderr)
    lines = stderr.read_text().splitlines()
    assert lines and all(re.match(r"<[2-7]>level=[A-Z]+ logger=nodemanager", line) for line in lines), lines
    assert any(line.startswith("<6>") and "event=sync" in line for line in lines)

    chosen = tmp_path / "chosen"
    chosen.mkdir()
    log = chosen / "nm.log"
    _run_daemon_as_systemd_would(_daemon_config(chosen, log_file=str(log)), chosen / "stderr", until=log)
    assert (chosen / "stderr").read_text() == ""
    assert "event=sync" in log.read_text() and not log.read_text().startswith("<")
