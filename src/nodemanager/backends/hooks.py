"""The account backend's hooks into resource enforcement (implemented by ``enforcing``).

A protocol of its own so that the backend knows the points of an account's life where
enforcement acts, without importing enforcement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..core.records import Sliver


class AccountHooks(Protocol):
    """What resource enforcement does at points of an account's life (see ``enforcing``).

    Called from worker threads (one call at a time per sliver)."""

    def account_created(self, sliver: Sliver, uid: int) -> None:
        """The account exists and nothing runs as ``uid`` yet: make the sliver's cgroups with its
        limits now, so that the very first process of the uid (a login a millisecond later) is
        placed into limits that already hold."""
        ...

    def home_created(self, sliver: Sliver, uid: int, gid: int, home: Path) -> None:
        """The empty home exists; nothing is written in it yet (a disk image mounts here)."""
        ...

    def stop_processes(self, name: str, uid: int, grace: float) -> bool:
        """End every process of the sliver: those in its cgroups and any process of ``uid``
        outside them. TERM, up to ``grace`` seconds, then kill through the cgroup (freeze and
        kill; ``cgroup.kill`` on v2), never by outrunning a fork loop. Returns False when cgroups
        are not in use here (the backend then stops the uid's processes by pid itself); raises
        ``BackendError`` when processes survive."""
        ...

    def start_cgroups(self, name: str) -> list[Path]:
        """The cgroups that programs started for the sliver join (created if missing)."""
        ...

    def before_removal(self, name: str, uid: int) -> None:
        """The sliver is stopped and its account about to go: remove its enforcement state."""
        ...
