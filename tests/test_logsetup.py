"""Logging under systemd: stderr lines carry the journal priority when stderr is the journal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nodemanager.logsetup import JournalFormatter, journal_priority, stderr_is_journal


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
