"""FakeHosts for the enforcers: one whose commands answer with canned output (tc, nft, findmnt,
losetup...), and the shipped cgroupfs model (``nodemanager.testing.kernel.CgroupHost``:
memberships, cgroup.kill, the freezer) in each layout."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from nodemanager.core.errors import BackendError
from nodemanager.host import CommandResult
from nodemanager.testing.fakehost import FakeHost
from nodemanager.testing.kernel.cgroupfs import LAYOUTS, CgroupHost


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


@pytest.fixture(params=["v1", "hybrid", "v2"])
def cgroup_host(request: pytest.FixtureRequest) -> CgroupHost:
    """A cgroupfs-like FakeHost for each layout: pure v1 (freezer, no cgroup.kill), this
    machine's hybrid, pure v2."""
    return CgroupHost(LAYOUTS[request.param])


@pytest.fixture
def make_cgroup_host():  # type: ignore[no-untyped-def]
    """``make_cgroup_host("v1"|"hybrid"|"v2", cgroup_kill=...)``."""
    return lambda layout, **kw: CgroupHost(LAYOUTS[layout], **kw)
