"""Deterministic crash simulation: run a scenario, crash the node at every effect, check recovery.

A **world** is what survives a ``kill -9`` of the daemon: the machine (:class:`SimHost`, with its
accounts, files, processes and kernel objects), the data directory (the SQLite store file), the
authority (what it serves) and the clock. A **node** is what dies: built by
``daemon.build_node`` over the world (account backend and enforcement on the fake host), started
without its serving threads so that everything runs in a fixed order (one worker; API calls are
dispatched directly; enforcement passes are steps), which makes effect ``k`` the same effect in
every run of a scenario.

:func:`explore` runs a scenario once to count its effects N, then for every ``k`` in ``0..N-1``:
builds a fresh world, runs the scenario with the node dying at effect ``k``, starts a new node on
the surviving world, lets it converge on the scenario's final authority document, and checks
:func:`check_invariants`. Every phase transition any node made is recorded (``transitions``), so
the lifecycle table can be compared with what is reachable.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nodemanager.operations as operations_module
from nodemanager.api.identity import TRANSPORT_UNIX, PeerIdentity
from nodemanager.config import Config, parse_config
from nodemanager.core.lifecycle import transition as real_transition
from nodemanager.core.records import Phase, Sliver
from nodemanager.daemon import Node, build_node
from nodemanager.testing.clock import ManualClock
from nodemanager.testing.fakeauthority import FakeAuthority
from nodemanager.testing.kernel import LAYOUTS

from .fanout import fan_out
from .simhost import SimHost, SimStore, SimulatedCrash

PREFIX = "sim"
HOME_ROOT = Path("/simhome")
UID_BASE = 200000
#: Thousands of worlds are made and thrown away: in memory when the machine has a tmpfs.
_SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
#: Syncs a restarted node gets to converge (each followed by an enforcement pass).
RECOVERY_CYCLES = 4

Step = Callable[["Run"], None]


@dataclass
class Scenario:
    """Steps from an empty node; ``final`` is the document the authority serves at the end."""

    name: str
    steps: list[Step]
    #: Seeds the world before the first node (foreign accounts, strays of slivers...).
    setup: Callable[[World], None] = lambda world: None
    enforce: bool = True
    #: The machine's cgroup layout (``nodemanager.testing.kernel.LAYOUTS``).
    layout: str = "hybrid"


@dataclass
class World:
    """What survives a crash (module docstring)."""

    base: Path
    host: SimHost
    authority: FakeAuthority
    clock: ManualClock
    config: Config
    #: Effects of the machine that must never be touched (foreign accounts and their files).
    foreign: dict[str, Any] = field(default_factory=dict)
    #: Files slivers wrote (path -> (sliver, content)): no crash may lose those of a live one.
    expect: dict[Path, tuple[str, bytes]] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir


@dataclass
class Run:
    """One node's life inside a world (what a step gets)."""

    world: World
    node: Node

    def sync(self, **kwargs: Any) -> None:
        self.node.sync_once(wait=True, **kwargs)

    def publish(self, slivers: list[Sliver]) -> None:
        self.world.authority.publish(slivers)

    def enforce(self) -> None:
        loop = self.node.enforcement_loop
        if loop is not None:
            loop.apply_now()

    def call(self, method: str, *params: Any, uid: int = 0) -> Any:
        """An API call as ``uid`` (root by default), answered as the transport would."""
        result = self.node.api.dispatch(method, params, PeerIdentity(TRANSPORT_UNIX, uid))
        wait = getattr(result, "wait", None)
        return wait() if callable(wait) and not isinstance(result, (dict, list, str, int)) else result


def make_world(scenario: Scenario) -> World:
    base = Path(tempfile.mkdtemp(prefix="nm-crash-", dir=_SCRATCH))
    (base / "node_id").write_text("1\n")
    config = parse_config({
        "node": {"data_dir": str(base / "data"), "log_file": ""},
        "authority": {"url": "file:///unused/slivers.json", "node_id_file": str(base / "node_id"),
                      "ticket_cert": str(base / "none.pem")},
        "api": {"tcp": "", "unix_socket": ""},
        "metrics": {"listen": ""},
        "slivers": {"home_root": str(HOME_ROOT), "name_prefix": PREFIX, "workers": 1, "stop_grace": 1,
                    "uid_base": UID_BASE, "keys_dir": "/simkeys"},
        "enforce": {"cpu": scenario.enforce, "memory": scenario.enforce, "bandwidth": scenario.enforce,
                    "disk": scenario.enforce, "uplink": "eth0"},
    })
    world = World(base=base, host=SimHost(LAYOUTS[scenario.layout]), authority=FakeAuthority(), clock=ManualClock(),
                  config=config)
    world.host.dirs[HOME_ROOT] = (0, 0, 0o755)
    scenario.setup(world)
    world.host.effects.clear()  # what the world starts with is no effect of the node
    return world


def boot(world: World) -> Node:
    """A node on ``world``, started without serving threads (module docstring)."""
    store = SimStore(world.config.data_dir / "nodemanager.sqlite", world.host)
    node = build_node(world.config, host=world.host, fetch=world.authority.fetch, clock=world.clock,
                      tickets=None, store=store)
    node.start(serve=False)
    return node


def kill(node: Node) -> None:
    """What ``kill -9`` leaves: the node's threads stop at their next contact with the world
    (its host and store refuse every call), its lock and connection are dropped."""
    try:
        node.close()
    except SimulatedCrash:
        pass


@contextmanager
def recording_transitions(into: set[tuple[Phase, Phase]]) -> Iterator[None]:
    """Record every phase transition the operations make (they call ``transition``)."""

    def recording(current: Phase, new: Phase) -> Phase:
        result = real_transition(current, new)
        if Phase(current) is not Phase(new):
            into.add((Phase(current), Phase(new)))
        return result

    saved = operations_module.transition
    operations_module.transition = recording  # type: ignore[assignment]
    try:
        yield
    finally:
        operations_module.transition = saved  # type: ignore[assignment]


def run_steps(world: World, scenario: Scenario) -> bool:
    """Run the scenario on a fresh node of ``world``; True when the node crashed."""
    node = None
    try:
        node = boot(world)
        run = Run(world, node)
        for step in scenario.steps:
            step(run)
    except SimulatedCrash:
        return True
    finally:
        if node is not None:
            kill(node)
    return False


def recover(world: World, final: list[Sliver]) -> Node:
    """A new node on the surviving world converges on ``final``; returned started (the caller
    checks and closes it)."""
    world.authority.publish(final)
    world.host.revive()
    node = boot(world)
    run = Run(world, node)
    for _ in range(RECOVERY_CYCLES):
        outcome = node.sync_once(wait=True, retry_now=True)
        run.enforce()
        if outcome.ok and not outcome.actions:
            break
    return node


@dataclass
class Exploration:
    scenario: str
    effects: int
    crash_points: int = 0
    failures: list[str] = field(default_factory=list)
    transitions: set[tuple[Phase, Phase]] = field(default_factory=set)


def explore(scenario: Scenario, check: Callable[[World, Node, list[Sliver]], list[str]],
            *, stride: int = 1, processes: int | None = None) -> Exploration:
    """Crash ``scenario`` at every ``stride``-th effect index (module docstring), the points
    shared among ``processes`` (default: one per CPU; see ``fanout``)."""
    transitions: set[tuple[Phase, Phase]] = set()
    with recording_transitions(transitions):
        world = make_world(scenario)
        try:
            assert not run_steps(world, scenario), "the crash-free run crashed"
            total = len(world.host.effects)
            final = list(world.authority.slivers.values())
            node = recover(world, final)
            try:
                problems = check(world, node, final)
            finally:
                kill(node)
        finally:
            shutil.rmtree(world.base, ignore_errors=True)
    result = Exploration(scenario.name, total, transitions=transitions)
    result.failures += [f"{scenario.name} without a crash: {p}" for p in problems]
    shares = fan_out(lambda ks: crash_at(scenario, check, final, ks), range(0, total, stride), processes)
    for share in shares:
        result.crash_points += share.crash_points
        result.failures += share.failures
        result.transitions |= share.transitions
    result.failures.sort(key=_crash_point)
    return result


def _crash_point(failure: str) -> int:
    """The effect index a failure text names (``NAME k=12 ...``); -1 for the crash-free run."""
    _, found, rest = failure.partition(" k=")
    return int(rest.split(maxsplit=1)[0].rstrip(":")) if found else -1


def crash_at(scenario: Scenario, check: Callable[[World, Node, list[Sliver]], list[str]], final: list[Sliver],
             points: Sequence[int]) -> Exploration:
    """Crash ``scenario`` at each effect index of ``points`` in turn, recover on ``final``, check."""
    result = Exploration(scenario.name, 0)
    with recording_transitions(result.transitions):
        for k in points:
            world = make_world(scenario)
            try:
                world.host.arm(k)
                crashed = run_steps(world, scenario)
                if not crashed:
                    result.failures.append(f"{scenario.name} k={k}: effect {k} never happened")
                    continue
                dead_at = world.host.effects[-1] if world.host.effects else None
                node = recover(world, final)
                try:
                    problems = check(world, node, final)
                finally:
                    kill(node)
                result.crash_points += 1
                result.failures += [f"{scenario.name} k={k} (after {dead_at!r}): {p}" for p in problems]
            finally:
                shutil.rmtree(world.base, ignore_errors=True)
    return result
