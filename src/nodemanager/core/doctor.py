"""``nodemanager doctor``'s verdicts: one :class:`Check` per precondition of the node, how a list
of them becomes the exit status, and how it is printed. Pure: the probes that produce checks are
``nodemanager.doctor``.

Exit status (``docs/doctor.md``): the worst severity found --
``0`` every check OK, ``1`` at least one WARN and no FAIL, ``2`` at least one FAIL.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Check", "Severity", "exit_code", "render", "summary"]


class Severity(IntEnum):
    """Ordered: the worst of a list is its ``max``; the value is the exit status it asks for."""

    OK = 0
    WARN = 1
    FAIL = 2


@dataclass(frozen=True, slots=True)
class Check:
    """One precondition: ``name`` (short, stable: ``cgroups``, ``authority``...), what was found
    (``detail``) and, unless OK, what to do about it (``fix``)."""

    name: str
    severity: Severity
    detail: str
    fix: str = ""

    @classmethod
    def ok(cls, name: str, detail: str) -> Check:
        return cls(name, Severity.OK, detail)

    @classmethod
    def warn(cls, name: str, detail: str, fix: str) -> Check:
        return cls(name, Severity.WARN, detail, fix)

    @classmethod
    def fail(cls, name: str, detail: str, fix: str) -> Check:
        return cls(name, Severity.FAIL, detail, fix)

    @property
    def line(self) -> str:
        """``SEVERITY name: detail -- fix: ...`` on one line (newlines in a probe's text folded)."""
        text = f"{self.severity.name:<4} {self.name}: {_one_line(self.detail)}"
        if self.fix and self.severity is not Severity.OK:
            text += f" -- fix: {_one_line(self.fix)}"
        return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def exit_code(checks: Iterable[Check]) -> int:
    """0 when every check is OK (or there are none), 1 when the worst is a WARN, 2 for a FAIL."""
    return int(max((check.severity for check in checks), default=Severity.OK))


def summary(checks: Sequence[Check]) -> str:
    counts = {severity: sum(1 for c in checks if c.severity is severity) for severity in Severity}
    return (f"doctor: {counts[Severity.OK]} ok, {counts[Severity.WARN]} warn, {counts[Severity.FAIL]} fail "
            f"(exit status {exit_code(checks)})")


def render(checks: Sequence[Check]) -> str:
    """One line per check, in the order given, then the summary line."""
    return "\n".join([*(check.line for check in checks), summary(checks)])
