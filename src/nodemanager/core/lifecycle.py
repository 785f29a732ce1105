"""Sliver phases and their legal transitions, in one table.

Workers move a sliver's ``AccountState.phase`` only through :func:`transition`, so an impossible
jump (say, a destroyed account becoming RUNNING without being created again) is a loud bug at the
point it happens, not a puzzling state found later in the store (Supervisor's asserted process
states) -- and, being ``IllegalTransition``, that sliver's failure, never the daemon's.

The table is exactly what the crash simulation (``tests/crash``) reaches: every scenario crashed
at every effect, restarted and converged; a test fails if a reachable change is missing here or
a change here is never reached.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .errors import IllegalTransition
from .records import Phase


class _FrozenMapping(Mapping[Phase, frozenset[Phase]]):
    """A read-only mapping, so no caller can widen the table at run time."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[Phase, frozenset[Phase]]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: Phase) -> frozenset[Phase]:
        return self._data[key]

    def __iter__(self) -> Iterator[Phase]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._data!r})"


def _table(edges: Mapping[Phase, tuple[Phase, ...]]) -> _FrozenMapping:
    # Staying in the same phase is always legal (an idempotent repeat of the same operation).
    return _FrozenMapping({phase: frozenset(edges[phase]) | {phase} for phase in Phase})


#: phase -> the phases it may move to (itself included).
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = _table(
    {
        # -> DESTROYING: an account whose creation was only intended (or cut short) is removed.
        Phase.ABSENT: (Phase.STOPPED, Phase.RUNNING, Phase.FAILED, Phase.DESTROYING),
        # -> ABSENT: the account vanished behind our back (drift) and is about to be re-created.
        Phase.STOPPED: (Phase.RUNNING, Phase.FAILED, Phase.DESTROYING, Phase.ABSENT),
        Phase.RUNNING: (Phase.STOPPED, Phase.FAILED, Phase.DESTROYING, Phase.ABSENT),
        Phase.FAILED: (Phase.STOPPED, Phase.RUNNING, Phase.DESTROYING, Phase.ABSENT),
        # A destroy cut short (crash) of a sliver that is wanted again is finished first
        # (-> ABSENT), then the account is created afresh: never DESTROYING -> STOPPED. A failed
        # destroy stays DESTROYING (retried, or finished before the sliver is created again).
        Phase.DESTROYING: (Phase.ABSENT,),
    }
)


def is_legal(current: Phase, new: Phase) -> bool:
    """Whether a sliver may move from ``current`` to ``new``."""
    return Phase(new) in TRANSITIONS[Phase(current)]


def transition(current: Phase, new: Phase) -> Phase:
    """Return ``new`` if moving there from ``current`` is legal, else raise
    ``IllegalTransition``: that sliver's operation fails (and is retried), nothing else."""
    current, new = Phase(current), Phase(new)
    if not is_legal(current, new):
        raise IllegalTransition(f"illegal sliver phase transition {current.value} -> {new.value}")
    return new
