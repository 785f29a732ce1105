"""The one logging set-up: logfmt-style lines to the log file and, in the foreground, stderr.

Library modules only call ``logging.getLogger(__name__)`` and log one line per event with the
sliver name as a field (``sliver=NAME event=...``). The file handler is a WatchedFileHandler, so a
log rotated away by logrotate is reopened by itself; ``reopen()`` does it explicitly on SIGHUP.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
_handlers: list[logging.Handler] = []


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
        stream.setFormatter(formatter)
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
