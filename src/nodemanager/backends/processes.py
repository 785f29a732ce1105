"""Stopping every process of a uid: TERM, a grace period, then rounds of SIGKILL.

Apart from :mod:`.account` because it is one self-contained procedure with its own timing rules,
run through the :class:`~nodemanager.host.Host` seam only (``pids_of_uid``, ``kill``,
``monotonic``, ``sleep``), so a ``FakeHost`` with a manual clock drives it in tests. Processes
appearing while it runs (a forking sliver) are caught by the next scan; zombies are not listed by
the host, so they never keep a round going.

This is the fallback for machines where the sliver has no cgroups (``AccountHooks.stop_processes``
returns False): it races a fork loop, which the cgroup path (``enforce.tasks``) never does.
Signals go through pidfds with the uid checked once the process is open, so a pid that was
reused by another user's process between the scan and the signal is never hit.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence

from ..core.errors import BackendError
from ..core.records import StopOutcome
from ..host import Host

__all__ = ["GRACE_POLL", "KILL_PAUSE", "KILL_ROUNDS", "StopOutcome", "stop_processes"]

#: SIGKILL rounds before giving up (a fork bomb ends well before), and the pause between.
KILL_ROUNDS = 50
KILL_PAUSE = 0.05
#: How often the grace period checks whether the processes are gone.
GRACE_POLL = 0.1


def stop_processes(host: Host, uid: int, grace: float) -> StopOutcome | None:
    """TERM every process of ``uid`` (also those appearing meanwhile), wait up to ``grace``
    seconds, then SIGKILL in rounds until none is left (a forking sliver needs several).

    Returns None when ``uid`` had no process to begin with. Raises ``BackendError`` when
    processes survive ``KILL_ROUNDS`` rounds. Idempotent; callable from any thread."""
    pids = host.pids_of_uid(uid)
    if not pids:
        return None
    termed: set[int] = set()
    deadline = host.monotonic() + grace
    while pids:
        _signal_all(host, uid, [p for p in pids if p not in termed], signal.SIGTERM)
        termed.update(pids)
        remaining = deadline - host.monotonic()
        if remaining <= 0:
            break
        host.sleep(min(GRACE_POLL, remaining))
        pids = host.pids_of_uid(uid)
    rounds = 0
    while pids:
        if rounds == KILL_ROUNDS:
            raise BackendError(
                f"{len(pids)} process(es) of uid {uid} survived {KILL_ROUNDS} rounds of SIGKILL"
            )
        rounds += 1
        _signal_all(host, uid, pids, signal.SIGKILL)
        host.sleep(KILL_PAUSE)
        pids = host.pids_of_uid(uid)
    return StopOutcome(len(termed), rounds)


def _signal_all(host: Host, uid: int, pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        host.kill(pid, sig, uid=uid)
