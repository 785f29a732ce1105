"""``nodemanager fleet simulate``: the command line of the fleet simulator (``fleet``).

    nodemanager fleet simulate --authority URL --nodes N [--first-node-id ID] [--keys FILE]
        [--data-dir DIR] [--wait S] [--poll S] [--duration S] [--ramp S] [--report FILE]
        [--processes P] [--appliers T] [--timeout S]

It builds the settings, raises the open-files limit, chooses the data directory (a temporary
one, removed at exit, unless ``--data-dir`` is given), runs the fleet in this process or in
``--processes`` children of this same command (each a contiguous share of the node ids, all
appending to the one report), and prints a summary when it ends: after ``--duration`` or at
SIGINT/SIGTERM, whose handlers only set a flag. Kept apart from ``fleet`` so that ``nodemanager
--help`` does not import the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError

#: Node ids fit PLCAPI's int (XML-RPC i4).
MAX_NODE_ID = 2**31 - 1


def add_fleet_parser(subparsers: Any) -> None:
    """Register ``fleet simulate`` on an argparse sub-parsers object."""
    fleet = subparsers.add_parser("fleet", help="simulate a fleet of hollow node managers against an authority")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND", required=True)
    sim = fleet_sub.add_parser(
        "simulate", help="run N hollow node managers (records only) against one authority",
        description="Run N hollow node managers against one authority, each with its own node id, key and "
                    "SQLite store, applying every document through the node's real code path (kubemark-style).")
    sim.add_argument("--authority", required=True, metavar="URL",
                     help="the authority: http(s)://HOST:PORT/PLCAPI/ (XML-RPC, needs --keys) or .../slices.xml")
    sim.add_argument("--nodes", type=int, required=True, metavar="N", help="number of hollow nodes")
    sim.add_argument("--first-node-id", type=int, default=1, metavar="ID",
                     help="node id of the first node; the others follow (default 1)")
    sim.add_argument("--keys", type=Path, metavar="FILE",
                     help="node keys: one 'NODE_ID KEY' line per node ('#' comments allowed)")
    sim.add_argument("--data-dir", type=Path, metavar="DIR",
                     help="where the nodes' stores live, one node-<id>.db each (default: a temporary "
                          "directory removed at exit; a tmpfs path such as /dev/shm/... keeps fsyncs free)")
    sim.add_argument("--wait", type=int, default=300, metavar="S",
                     help="blocking wait asked of the authority, 1..600 s; 0 = always poll (default 300)")
    sim.add_argument("--poll", type=float, default=600.0, metavar="S",
                     help="poll period against an authority without blocking queries, plus 0..S/2 jitter "
                          "(default 600, the daemon's)")
    sim.add_argument("--duration", type=float, default=0.0, metavar="S",
                     help="seconds to run; 0 = until SIGINT/SIGTERM (default 0)")
    sim.add_argument("--ramp", type=float, default=None, metavar="S",
                     help="spread the nodes' start over S seconds (default: N/1000)")
    sim.add_argument("--report", type=Path, metavar="FILE",
                     help="append JSON lines, one per node per document applied (and per error)")
    sim.add_argument("--processes", type=int, default=1, metavar="P",
                     help="simulate the nodes in P processes, each a contiguous share (default 1)")
    sim.add_argument("--appliers", type=int, default=2, metavar="T",
                     help="threads per process applying documents (default 2)")
    sim.add_argument("--timeout", type=float, default=30.0, metavar="S",
                     help="request timeout beyond the wait: a dead connection is noticed within wait + S")
    sim.add_argument("--summary-json", action="store_true", help=argparse.SUPPRESS)


def _settings(args: argparse.Namespace) -> Any:
    from .simulator import FleetSettings

    if not 1 <= args.nodes <= 1_000_000:
        raise ConfigError("--nodes must be 1..1000000")
    if not 1 <= args.first_node_id or args.first_node_id + args.nodes - 1 > MAX_NODE_ID:
        raise ConfigError(f"--first-node-id: node ids must be 1..{MAX_NODE_ID}")
    if not 0 <= args.wait <= 600:
        raise ConfigError("--wait must be 0..600 seconds")
    if not args.poll > 0 or not args.timeout > 0 or args.duration < 0 or (args.ramp is not None and args.ramp < 0):
        raise ConfigError("--poll and --timeout must be positive, --duration and --ramp not negative")
    if not 1 <= args.processes <= 256 or not 1 <= args.appliers <= 64:
        raise ConfigError("--processes must be 1..256 and --appliers 1..64")
    return FleetSettings(authority=args.authority, nodes=args.nodes, first_node_id=args.first_node_id,
                         wait=args.wait, poll=args.poll, duration=args.duration, ramp=args.ramp,
                         timeout=args.timeout, appliers=args.appliers)


def cmd_fleet(args: argparse.Namespace) -> int:
    import logging

    from .simulator import check_settings, load_keys, raise_nofile_limit
    from ..logsetup import configure_logging

    settings = _settings(args)
    configure_logging(None, foreground=True, level=logging.WARNING)
    # one line per hollow backend built would be 10,000 lines: say it once instead
    logging.getLogger("nodemanager.backends.hollow").setLevel(logging.ERROR)
    keys = load_keys(args.keys) if args.keys is not None else {}
    check_settings(settings, keys)  # before any process starts or directory is made
    limit = raise_nofile_limit()
    if limit < settings.nodes // max(1, args.processes) + 64:
        print(f"fleet: warning: the open-files limit is {limit}, below one socket per node", file=sys.stderr)
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="nodemanager-fleet-")) if temporary else args.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if args.processes > 1:
            summary, failed = _run_children(args, data_dir)
        else:
            summary, failed = _run_here(settings, keys, data_dir, args.report), False
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    if args.summary_json:
        print(summary.to_json(), flush=True)
    else:
        print(summary.render(), flush=True)
    return 1 if failed else 0


def _run_here(settings: Any, keys: dict[int, str], data_dir: Path, report_path: Path | None) -> Any:
    from .simulator import Fleet, ReportWriter

    report = ReportWriter(report_path) if report_path is not None else None
    fleet = Fleet(settings, keys=keys, data_dir=data_dir, report=report)
    print(f"fleet: {len(fleet.nodes)} hollow nodes (records only) against {settings.authority}; "
          f"stores in {data_dir}", file=sys.stderr, flush=True)

    async def main() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await fleet.run(stop)

    try:
        return asyncio.run(main())
    finally:
        if report is not None:
            report.close()


def _run_children(args: argparse.Namespace, data_dir: Path) -> tuple[Any, bool]:
    """Run ``--processes`` children of this command, each on a contiguous share of the nodes;
    SIGINT/SIGTERM are passed on; their summaries are added up. True with the summary when a
    child failed (its status and missing summary are among the summary's errors)."""
    from .simulator import FleetSummary, shares

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    common = ["--authority", args.authority, "--wait", str(args.wait), "--poll", str(args.poll),
              "--duration", str(args.duration), "--timeout", str(args.timeout), "--appliers", str(args.appliers),
              "--data-dir", str(data_dir), "--summary-json"]
    if args.keys is not None:
        common += ["--keys", str(args.keys)]
    if args.report is not None:
        common += ["--report", str(args.report)]
    if args.ramp is not None:
        common += ["--ramp", str(args.ramp)]
    children = []
    for first, count in shares(args.nodes, args.first_node_id, args.processes):
        argv = [sys.executable, "-m", "nodemanager", "fleet", "simulate", *common,
                "--nodes", str(count), "--first-node-id", str(first)]
        children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, start_new_session=True))
    while not stop.is_set() and any(child.poll() is None for child in children):
        stop.wait(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    total, failed = FleetSummary(), False
    for child in children:
        out, _ = child.communicate()
        last = (out or "").strip().splitlines()[-1:] or [""]
        try:
            total.merge(FleetSummary.from_json(last[0]))
        except (ValueError, TypeError):
            total.sample_errors.append(f"a simulator process (pid {child.pid}) ended with status "
                                       f"{child.returncode} and no summary")
        failed = failed or child.returncode != 0
    return total, failed


__all__ = ["add_fleet_parser", "cmd_fleet"]
