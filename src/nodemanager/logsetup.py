"""The one logging set-up: logfmt-style lines to the log file and, in the foreground, stderr.

With no log file (``node.log_file = ""``, or one that cannot be opened) the lines go to stderr
even with ``run --quiet``. Under systemd the daemon logs to the journal only unless the
configuration sets ``node.log_file`` itself (:func:`log_destination`): the contract's default file
is used outside systemd, or when an operator writes it down. When stderr is the systemd journal (``JOURNAL_STREAM`` names stderr's
device and inode, as systemd sets it for a unit's stdout/stderr), each line carries the
sd-daemon(3) ``<N>`` prefix so that the journal records the level as its priority
(``journalctl -p warning``), and no timestamp (the journal has its own).

Library modules only call ``logging.getLogger(__name__)`` and log one line per event with the
sliver name as a field (``sliver=NAME event=...``). The file handler is a WatchedFileHandler, so a
log rotated away by logrotate is reopened by itself; ``reopen()`` does it explicitly on SIGHUP.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
JOURNAL_FORMAT = "level=%(levelname)s logger=%(name)s %(message)s"
_handlers: list[logging.Handler] = []

#: sd-daemon(3) priority prefixes (syslog levels) for Python's levels.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def journal_priority(levelno: int) -> int:
    """The syslog priority for a logging level: CRITICAL 2, ERROR 3, WARNING 4, INFO 6, DEBUG 7."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """Prefix every line of a record (tracebacks included) with ``<priority>``."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal(environ: dict[str, str] | None = None, fd: int | None = None) -> bool:
    """True when ``fd`` (stderr) is the stream systemd connected to the journal."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno() if fd is None else fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):  # closed/replaced stderr, malformed variable
        return False


def log_destination(log_file: str, *, explicit: bool, environ: dict[str, str] | None = None,
                    fd: int | None = None) -> str:
    """The log file the daemon opens: ``""`` (stderr only) when stderr is the journal and the
    configuration did not set ``node.log_file``; otherwise ``log_file`` unchanged.

    Why: a unit's stderr already reaches the journal with priorities, rotation and retention; a
    second copy in /var/log would double the disk writes and be the one nobody reads. An operator
    who wants the file (the original's ``/var/log/pl_node_mgr.log``, for existing tooling) writes
    it down, even with its default value, and gets it as before."""
    if not explicit and stderr_is_journal(environ, fd):
        return ""
    return log_file


def configure_logging(log_file: str | None, *, foreground: bool = True, level: int = logging.INFO) -> list[str]:
    """Install handlers on the root logger (replacing ours from an earlier call).

    Returns the problems met (e.g. an unwritable log file), which the caller reports; logging to
    stderr still works then."""
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    problems: list[str] = []
    formatter = logging.Formatter(FORMAT)
    if log_file:
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
            handler.setFormatter(formatter)
            _handlers.append(handler)
        except OSError as exc:
            problems.append(f"cannot open log file {log_file}: {exc.strerror}")
    if foreground or not _handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JournalFormatter(JOURNAL_FORMAT) if stderr_is_journal() else formatter)
        _handlers.append(stream)
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(level)
    return problems


def reopen() -> None:
    """Reopen the log file (SIGHUP after a rotation)."""
    for handler in _handlers:
        if isinstance(handler, logging.handlers.WatchedFileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()  # type: ignore[attr-defined]
                handler._statstream()  # type: ignore[attr-defined]
            finally:
                handler.release()
