"""The event loop's side of blocking queries (:class:`nodemanager.plc.holds.HeldQueries`), driven
directly in a real asyncio loop with real snapshots: snapshots arriving out of order, a stale
view, supersession and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from nodemanager.plc.documents import Snapshot
from nodemanager.plc.holds import RENDER_BATCH, HeldQueries, HoldRequest
from nodemanager.plc.model import load_authority_text

NODES = "".join(f'[[nodes]]\nid = {n}\nkey = "k{n}"\n' for n in range(1, 601))


def snapshot(share: int, generation: int, only: str = "") -> Snapshot:
    text = NODES + f'[[slices]]\nname = "site_a"\nid = 1\n{only}[slices.attributes]\nnm_cpu_share = {share}\n'
    return Snapshot.of(load_authority_text(text, timestamp=1, base_time=0, origin="t.toml"), generation)


def hub(first: Snapshot, rendered: list[tuple[int, list[int]]]) -> HeldQueries:
    async def offload(function: Callable[..., Any], *args: Any) -> Any:
        await asyncio.sleep(0)
        return function(*args)

    def render_many(snap: Snapshot, wanted: Sequence[tuple[str, int]]) -> list[Any]:
        rendered.append((snap.generation, [node for _, node in wanted]))
        return [("new", snap.generation, node, snap.indexes[node]) for _, node in wanted]

    return HeldQueries(first, offload=offload, render_many=render_many,
                       not_modified=lambda kind, index: ("not-modified", index), rng=lambda: 0.0)


def request(snap: Snapshot, node: int, wait: int = 600, index: str | None = None) -> HoldRequest:
    return HoldRequest("xmlrpc", node, index or snap.indexes[node], wait, snap)


def test_a_change_wakes_every_waiter_in_batches_with_the_new_snapshot() -> None:
    async def scenario() -> None:
        first, second = snapshot(2, 0), snapshot(3, 1)
        rendered: list[tuple[int, list[int]]] = []
        held = hub(first, rendered)
        tasks = [asyncio.ensure_future(held.hold(request(first, n))) for n in range(1, 601)]
        await asyncio.sleep(0.01)
        assert len(held.registry) == 600 and not any(t.done() for t in tasks)
        held.adopt(second)
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert answers == [("new", 1, n, second.indexes[n]) for n in range(1, 601)]
        assert [len(nodes) for _, nodes in rendered] == [RENDER_BATCH, RENDER_BATCH, 600 - 2 * RENDER_BATCH]

    asyncio.run(scenario())


def test_an_older_snapshot_never_replaces_a_newer_one() -> None:
    async def scenario() -> None:
        old, new = snapshot(2, 4), snapshot(3, 5)
        held = hub(new, [])
        held.adopt(old)
        assert held.current is new
        # A worker that saw the old snapshot asks to hold node 1 on its old index: the loop
        # knows better and answers at once, from the newest snapshot.
        answer = await asyncio.wait_for(held.hold(request(old, 1)), 5)
        assert answer == ("new", 5, 1, new.indexes[1]) and len(held.registry) == 0

    asyncio.run(scenario())


def test_a_newer_snapshot_brought_by_a_request_is_adopted_and_wakes_others() -> None:
    async def scenario() -> None:
        first = snapshot(2, 0, only="nodes = [1, 2]\n")
        second = snapshot(2, 1, only="nodes = [1]\n")  # node 2 loses the slice; node 1 unchanged
        held = hub(first, [])
        two = asyncio.ensure_future(held.hold(request(first, 2)))
        await asyncio.sleep(0.01)
        one = asyncio.ensure_future(held.hold(request(second, 1)))  # a worker already saw `second`
        assert await asyncio.wait_for(two, 5) == ("new", 1, 2, second.indexes[2])
        await asyncio.sleep(0.01)
        assert not one.done() and held.registry.waiter_of(1) is not None
        one.cancel()
        await asyncio.sleep(0)
        assert len(held.registry) == 0  # a cancelled (disconnected) wait is given up

    asyncio.run(scenario())


def test_waits_expire_and_a_newer_wait_supersedes() -> None:
    async def scenario() -> None:
        first = snapshot(2, 0)
        held = hub(first, [])
        index = first.indexes[1]
        older = asyncio.ensure_future(held.hold(request(first, 1, wait=600)))
        await asyncio.sleep(0.01)
        newer = asyncio.ensure_future(held.hold(request(first, 1, wait=1)))
        assert await asyncio.wait_for(older, 5) == ("not-modified", index)
        assert await asyncio.wait_for(newer, 5) == ("not-modified", index)  # after ~1 s
        last = asyncio.ensure_future(held.hold(request(first, 2)))
        await asyncio.sleep(0.01)
        held.release_all()
        assert await asyncio.wait_for(last, 5) == ("not-modified", first.indexes[2])

    asyncio.run(scenario())
