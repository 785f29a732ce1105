"""A :class:`~nodemanager.host.Host` that cannot change the machine, for ``nodemanager doctor``.

The doctor reuses the daemon's own probes (``EnforcementSet.probe``, ``sshd_problems``...) rather
than copies of them, but some of those probes *prepare* as they look: ``EnforcementSet.probe``
makes the parent cgroups and enables controllers in ``cgroup.subtree_control``, the disk enforcer
makes its images directory. Run over this wrapper, they read the machine as usual while:

* creating a directory or writing a small file (``makedirs_owned``, ``write_text``) is skipped
  and recorded in :attr:`ReadOnlyHost.would` ("would create ...") -- the probe carries on as if
  it had worked, so the doctor can say what the first start will do;
* every other effect (removing, signalling, spawning, writing files, running as a user, shell
  commands) raises ``BackendError``;
* :meth:`run` runs only commands known to be read-only (:func:`is_read_only_command`: version
  queries, ``show``/``list`` forms, ``sshd -T``, ``findmnt``...); any other raises.

Reading process events (``open_proc_events``) is allowed: it opens a netlink socket and
subscribes; nothing outlives the socket.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core.errors import BackendError
from .host import CommandResult, Host

__all__ = ["ReadOnlyHost", "is_read_only_command"]

#: Host methods that only read; passed through unchanged.
_READS = frozenset({
    "read_file", "stat_file", "list_dirs", "list_executables", "file_stamps", "mounts", "inspect_below",
    "getpwnam", "getpwuid", "all_users", "getgrnam", "getgrgid", "all_groups", "shadow_entry",
    "shadow_entries", "pids_of_uid", "pids_by_uid", "open_proc_events", "sleep", "monotonic",
})


def is_read_only_command(argv: Sequence[str]) -> bool:
    """True for the commands the probes run that change nothing: ``PROGRAM -V``/``--version``,
    ``tc ... show``, ``nft list ...``, ``ip ... show``, ``findmnt``, ``quotaon -p``, ``losetup -l``,
    ``sshd -T``, ``timedatectl show``."""
    if not argv:
        return False
    program, args = os.path.basename(str(argv[0])), [str(a) for a in argv[1:]]
    if args in (["-V"], ["--version"]):
        return True
    if program == "tc":
        return "show" in args and not {"add", "del", "delete", "replace", "change", "-batch", "-b"} & set(args)
    if program == "nft":
        rest = [a for a in args if a not in ("-j", "--json")]
        return bool(rest) and rest[0] == "list"
    if program == "ip":
        return "show" in args and not {"add", "del", "delete", "set", "replace", "change", "flush"} & set(args)
    if program == "findmnt":
        return True
    if program == "quotaon":
        return "-p" in args
    if program == "losetup":
        return "-l" in args and not {"-d", "-D", "-f", "-c", "-a", "--detach"} & set(args)
    if program == "sshd":
        return "-T" in args
    if program == "timedatectl":
        return bool(args) and args[0] == "show"
    return False


class ReadOnlyHost:
    """Wraps ``inner`` (a ``Host`` or a ``FakeHost``); see the module docstring. Any thread."""

    def __init__(self, inner: Host, *, max_timeout: float = 60) -> None:
        self.inner = inner
        #: No command runs longer than this, whatever the probe asked for.
        self.max_timeout = max_timeout
        #: What the probes would have changed, in order ("would create /sys/fs/cgroup/cpu/nodemanager").
        self.would: list[str] = []

    def __getattr__(self, name: str) -> Any:
        if name in _READS:
            return getattr(self.inner, name)
        if name.startswith("_"):
            raise AttributeError(name)

        def refuse(*args: object, **kwargs: object) -> None:
            target = f" {args[0]}" if args else ""
            raise BackendError(f"read-only check: would {name}{target}")

        return refuse

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True, **kwargs: Any) -> CommandResult[bytes]:
        if not is_read_only_command(argv) or kwargs:
            raise BackendError(f"read-only check: would run {' '.join(str(a) for a in argv)}")
        return self.inner.run(argv, input=input, timeout=min(timeout, self.max_timeout), check=check)

    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        if self.inner.stat_file(Path(path)) is None:
            self.would.append(f"would create {path}")

    def write_text(self, path: Path, text: str) -> None:
        self.would.append(f"would write {text.strip()!r} to {path}")
