"""A FakeHost whose commands can answer with canned output (tc, nft, findmnt, losetup...)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from nodemanager.host import CommandResult
from nodemanager.testing.fakehost import FakeHost


class ScriptedHost(FakeHost):
    """``answers[tuple(argv prefix)] = (returncode, stdout)``; the longest matching prefix wins.
    Everything else behaves as FakeHost (exit 0, no output)."""

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[tuple[str, ...], tuple[int, bytes]] = {}
        self.inputs: list[tuple[list[str], bytes | None]] = []

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60,
            check: bool = True) -> CommandResult[bytes]:
        result = super().run(argv, input=input, timeout=timeout, check=check)
        args = [str(a) for a in argv]
        self.inputs.append((args, input))
        best = max((p for p in self.answers if tuple(args[: len(p)]) == p), key=len, default=None)
        if best is None:
            return result
        code, out = self.answers[best]
        if check and code != 0:
            from nodemanager.core.errors import BackendError
            raise BackendError(f"{args[0]} exited with status {code}")
        return CommandResult(args, code, out, b"")

    def batches(self, program: str) -> list[bytes]:
        return [data or b"" for args, data in self.inputs if args[0] == program and data is not None]


@pytest.fixture
def host() -> ScriptedHost:
    return ScriptedHost()
