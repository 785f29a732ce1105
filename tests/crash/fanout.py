"""Crash points explored in parallel: each is independent of the others (a fresh world per
point), so the points of a scenario are dealt round-robin to forked processes, one per CPU, and
their results merged. The parent works on its own share meanwhile.

Forked, not spawned: a child inherits the scenario (closures, which do not pickle) and needs no
imports; only results (counts, failure texts, phase pairs) travel back through a pipe. The
parent forks between node lives, when no node thread runs.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TypeVar

T = TypeVar("T")


def processes() -> int:
    """One per CPU (``NM_CRASH_PROCESSES`` overrides; 1 runs everything in this process)."""
    wanted = os.environ.get("NM_CRASH_PROCESSES", "")
    return max(1, int(wanted)) if wanted.isdigit() else max(1, min(8, os.cpu_count() or 1))


def fan_out(work: Callable[[Sequence[int]], T], items: Sequence[int], count: int | None = None) -> list[T]:
    """``work`` on ``count`` round-robin shares of ``items``, in parallel; the results in share
    order. A child that dies or raises fails the whole call (its error is raised here)."""
    count = min(processes() if count is None else count, len(items)) or 1
    if count == 1:
        return [work(items)]
    context = multiprocessing.get_context("fork")
    shares = [items[i::count] for i in range(count)]
    children = []
    for share in shares[1:]:
        reader, writer = context.Pipe(duplex=False)
        child = context.Process(target=_child, args=(work, share, writer), daemon=True)
        child.start()
        writer.close()
        children.append((child, reader))
    results = [work(shares[0])]
    for child, reader in children:
        try:
            ok, value = reader.recv()
        except EOFError:
            ok, value = False, f"a crash-point process died (exit status {child.exitcode})"
        child.join()
        if not ok:
            raise AssertionError(value)
        results.append(value)
    return results


def _child(work: Callable[[Sequence[int]], object], share: Sequence[int], writer: Connection) -> None:
    try:
        writer.send((True, work(share)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
        writer.send((False, f"{type(exc).__name__}: {exc}"))
    finally:
        writer.close()
