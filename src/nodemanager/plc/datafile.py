"""The authority's data file, re-read when it changes.

:meth:`AuthorityDataFile.current` stats the file (cheap) and reloads it when its signature
(mtime, ctime, size, inode) changed; the server calls it for every request (off its event loop)
and from a watcher every 0.25 s, so that an edit wakes the nodes holding a blocking query
promptly even when no request arrives. A reload builds a :class:`~.documents.Snapshot` (the data
plus every node's document index) and passes ``(old, new)`` to the ``on_reload`` listener, in
reload order, while holding the file's lock.

With ``timestamp = "mtime"`` (the default) the document timestamp is the file's modification time,
forced to increase by at least one on every reload so that two edits within a second still
produce a newer document. An edit that does not validate is logged and the last good data keeps
being served.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..core.errors import ConfigError
from .documents import Snapshot
from .model import AuthorityData, load_authority_text

log = logging.getLogger(__name__)

#: ``on_reload(old, new)``: called after every successful reload, under the file's lock.
ReloadListener = Callable[[Snapshot, Snapshot], None]


class AuthorityDataFile:
    """The data file and its last good :class:`Snapshot`. Thread-safe."""

    def __init__(self, path: Path, on_reload: ReloadListener | None = None) -> None:
        self.path = Path(path)
        self.on_reload = on_reload
        self._lock = threading.Lock()
        self._signature: tuple[int, ...] | None = None
        self._snapshot: Snapshot | None = None
        self._last_mtime_timestamp = 0
        self.snapshot()  # the first load must succeed: ConfigError otherwise

    def current(self) -> AuthorityData:
        """The current data (re-read first if the file changed)."""
        return self.snapshot().data

    def snapshot(self) -> Snapshot:
        """The current snapshot (re-read first if the file changed)."""
        with self._lock:
            try:
                st = os.stat(self.path)
            except OSError as exc:
                if self._snapshot is None:
                    raise ConfigError(f"cannot read authority data {self.path}: {exc.strerror}") from exc
                if self._signature is not None:
                    log.error("event=authority-data-unreadable path=%s error=%s serving=last-good",
                              self.path, exc.strerror)
                    self._signature = None  # say it once, not at every request
                return self._snapshot
            signature = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
            if signature != self._signature:
                self._reload(signature, int(st.st_mtime))
            assert self._snapshot is not None
            return self._snapshot

    def _reload(self, signature: tuple[int, ...], mtime: int) -> None:
        timestamp = max(mtime, self._last_mtime_timestamp + 1)
        try:
            text = self.path.read_text(encoding="utf-8")
            data = load_authority_text(text, timestamp=timestamp, base_time=mtime, origin=str(self.path))
        except (OSError, UnicodeDecodeError, ConfigError) as exc:
            if self._snapshot is None:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"cannot read authority data {self.path}: {exc}") from exc
            log.error("event=authority-data-invalid path=%s error=%s serving=last-good", self.path, exc)
            self._signature = signature
            return
        if data.timestamp == timestamp:
            self._last_mtime_timestamp = timestamp
        old = self._snapshot
        new = Snapshot.of(data, 0 if old is None else old.generation + 1)
        self._snapshot, self._signature = new, signature
        log.info("event=authority-data-loaded path=%s timestamp=%d nodes=%d slices=%d",
                 self.path, data.timestamp, len(data.nodes), len(data.slices))
        if old is not None and self.on_reload is not None:
            self.on_reload(old, new)
