"""The phase transition table (core.lifecycle)."""

from __future__ import annotations

import itertools

import pytest

from nodemanager.core.errors import IllegalTransition
from nodemanager.core.lifecycle import TRANSITIONS, is_legal, transition
from nodemanager.core.records import Phase

A, S, R, F, D = Phase.ABSENT, Phase.STOPPED, Phase.RUNNING, Phase.FAILED, Phase.DESTROYING

LEGAL = {
    A: {A, S, R, F, D},
    S: {S, R, F, D, A},
    R: {R, S, F, D, A},
    F: {F, S, R, D, A},
    D: {D, A},
}


def test_table_is_exactly_the_design() -> None:
    assert {phase: set(targets) for phase, targets in TRANSITIONS.items()} == LEGAL
    assert len(TRANSITIONS) == len(Phase)


@pytest.mark.parametrize(("current", "new"), list(itertools.product(Phase, Phase)))
def test_transition_accepts_legal_and_rejects_illegal(current: Phase, new: Phase) -> None:
    if new in LEGAL[current]:
        assert transition(current, new) is new
        assert is_legal(current, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{current.value} -> {new.value}"):
            transition(current, new)
        assert not is_legal(current, new)


@pytest.mark.parametrize(("current", "new"), [(D, R)])
def test_notable_illegal_jumps(current: Phase, new: Phase) -> None:
    with pytest.raises(IllegalTransition):
        transition(current, new)


def test_same_phase_is_always_allowed() -> None:
    assert all(transition(phase, phase) is phase for phase in Phase)


def test_string_values_are_accepted() -> None:
    assert transition("stopped", "running") is Phase.RUNNING  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        transition("stopped", "bogus")  # type: ignore[arg-type]


def test_table_cannot_be_modified() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[A] = frozenset(Phase)  # type: ignore[index]
    assert isinstance(TRANSITIONS[A], frozenset)
