"""SimHost: the fake machine of the crash simulation, which can die at any effect.

It is :class:`~nodemanager.testing.kernel.KernelHost` (a FakeHost: every OS effect recorded,
nothing reaches the real machine; with a model of the kernel objects enforcement manages) plus:

* **effects are numbered.** Every call that changes the machine -- a file written or removed, a
  directory made, a cgroup file written, a signal, a program started, a command that is not a
  pure query -- and every write transaction of the node's store (:class:`SimStore`) gets the
  next index. ``arm(k)`` makes effect ``k`` raise :class:`SimulatedCrash` *instead of happening*,
  and every later call of any kind raise it too: the daemon process is dead, its threads stop at
  their next contact with the world. What happened before ``k`` stays (the machine and the store
  file survive a ``kill -9``), what would have happened after never does.
* **queries are not effects**: reads of files and commands that only look (:data:`READS`,
  :data:`QUERIES`) never count and never crash; so the crash points are exactly the changes.

The machine model (``nodemanager.testing.kernel``) is what lets the invariants ask which
cgroups, HTB classes, nft entries, mounts, loop devices and images exist.

The crash is a ``BaseException`` on purpose: the node's per-sliver guards catch ``Exception``
(every failure of an operation is that sliver's), and a crash must pass through them as a real
``SIGKILL`` would, not become a recorded failure.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from nodemanager.enforce.cgroups import Hierarchy
from nodemanager.store import Store
from nodemanager.testing.kernel import HYBRID, KernelHost

#: FakeHost methods that only look: never an effect, never a crash point.
READS = frozenset({
    "getpwnam", "getpwuid", "all_users", "getgrnam", "getgrgid", "all_groups", "shadow_entry",
    "shadow_entries", "stat_file", "read_file", "list_dirs", "list_executables", "list_names",
    "pids_of_uid", "pids_by_uid", "monotonic", "sleep", "scan_files", "file_stamps", "mounts",
})

#: Commands (by argv prefix) that only query the machine.
QUERIES: tuple[tuple[str, ...], ...] = (
    ("tc", "-V"), ("tc", "-d", "class", "show"), ("tc", "-j", "qdisc", "show"), ("tc", "-s"),
    ("nft", "-j", "list"), ("nft", "list"),
    ("ip", "-j", "route"), ("ip", "link", "show"), ("ip", "-j", "link"),
    ("losetup", "-J"), ("losetup", "-V"), ("findmnt",), ("mkfs.ext4", "-V"), ("quotaon", "-p"),
    ("repquota",), ("setquota", "-V"), ("sshd", "-T"), ("find", "-V"), ("id",), ("ipcs",), ("stat", "-f"),
)


class SimulatedCrash(BaseException):
    """The node died here (``kill -9``): nothing of it runs after this point."""


class SimHost(KernelHost):
    """A FakeHost whose effects are numbered and can crash (module docstring). Thread-safe."""

    def __init__(self, hierarchies: Sequence[Hierarchy] = HYBRID) -> None:
        super().__init__(hierarchies)
        self._sim_lock = threading.RLock()
        self.effects: list[tuple[object, ...]] = []
        self.crash_at: int | None = None
        self.crashed = False

    # --- crash control ----------------------------------------------------------------------
    def arm(self, index: int | None) -> None:
        """Crash at effect ``index`` (None: never); a fresh count starts now."""
        with self._sim_lock:
            self.crash_at = index
            self.crashed = False
            self.effects = []

    def revive(self) -> None:
        """The next node runs on this machine: no crash is pending and nothing is dead."""
        self.arm(None)

    def effect(self, what: tuple[object, ...]) -> None:
        """Count one effect; die instead of doing it when it is the armed one."""
        with self._sim_lock:
            if self.crashed:
                raise SimulatedCrash("the node is dead")
            if self.crash_at is not None and len(self.effects) == self.crash_at:
                self.crashed = True
                raise SimulatedCrash(f"crash at effect {self.crash_at}: {what!r}")
            self.effects.append(what)

    def _alive(self) -> None:
        if self.crashed:
            raise SimulatedCrash("the node is dead")

    # --- FakeHost hooks ---------------------------------------------------------------------
    def _record(self, method: str, *args: object) -> None:
        if method in READS or self._changes_nothing(method, args):
            self._alive()
        else:
            self.effect((method, *args[:1]))
        super()._record(method, *args)

    def _changes_nothing(self, method: str, args: tuple[object, ...]) -> bool:
        """A call that would leave the machine as it is (``makedirs_owned`` of a directory that
        exists with that owner and mode): dying there is dying at the next effect, so it is not
        a crash point of its own."""
        return method == "makedirs_owned" and self.dirs.get(args[0]) == args[1:4]  # type: ignore[call-overload]

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True):  # noqa: ANN201 - CommandResult
        args = tuple(str(a) for a in argv)
        named = (Path(args[0]).name, *args[1:])  # /usr/sbin/sshd is sshd
        if any(named[: len(q)] == q for q in QUERIES) or _is_query(named):
            self._alive()
        else:
            self.effect(("run", *args[:3]))
        return super().run(argv, input=input, timeout=timeout, check=check)

    def sleep(self, seconds: float) -> None:
        self._alive()
        super().sleep(seconds)


def _is_query(args: tuple[str, ...]) -> bool:
    """Queries whose argv does not start with a fixed prefix (``find DIR ... -printf``, ``find
    HOME ... -print -quit``): a ``find`` that deletes nothing."""
    return args[:1] == ("find",) and "-delete" not in args


class SimStore(Store):
    """The node's store, whose write transactions are effects of ``host`` (crash points)."""

    def __init__(self, path: Path, host: SimHost) -> None:
        super().__init__(path, deferred=True)
        self._sim = host

    @contextlib.contextmanager
    def _transaction(self, what: str, write: bool = True, durable: bool = False) -> Iterator[object]:
        if write:
            self._sim.effect(("store", what))
        else:
            self._sim._alive()
        with super()._transaction(what, write, durable) as conn:
            yield conn
