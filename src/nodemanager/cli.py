"""Command-line entry points; the only module that exits the process.

    nodemanager [-c CONFIG] run                      the daemon (foreground; systemd runs it so)
    nodemanager [-c CONFIG] sync [--once] [--allow-mass-delete]
    nodemanager [-c CONFIG] plan [--json]            what a sync would do, without doing it
    nodemanager [-c CONFIG] status [--resources] [--json]   slivers table and last sync outcome
    nodemanager [-c CONFIG] config show              the effective configuration (TOML)
    nodemanager [-c CONFIG] call METHOD [ARGS...]    call the API (local socket, --tcp, --ssh)
    nodemanager authority serve --data FILE [--listen HOST:PORT] [--export-cert PATH] [--max-connections N]
    nodemanager authority ticket SLICE --data FILE [--node N]... [--ttl DURATION]
    nodemanager fleet simulate --authority URL --nodes N [...]   hollow nodes against an authority
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import Config, load_config, to_toml
from .core.errors import ConfigError, NodeManagerError

logger = logging.getLogger("nodemanager")



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodemanager", description="PlanetLab-style node manager")
    parser.add_argument("--version", action="version", version=f"nodemanager {__version__}")
    parser.add_argument("-c", "--config", type=Path, help="TOML configuration file "
                        "(default /etc/nodemanager/nodemanager.toml if it exists, else built-in defaults)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--quiet", action="store_true", help="log to the log file only, not stderr")

    sync = sub.add_parser("sync", help="ask the running daemon to poll now, or run one cycle (--once)")
    sync.add_argument("--once", action="store_true", help="run one full cycle in this process and wait for it")
    sync.add_argument("--allow-mass-delete", action="store_true",
                      help="apply removals held by the safety valve at the next sync")

    plan = sub.add_parser("plan", help="print what a sync would do now, without doing it")
    plan.add_argument("--json", action="store_true", help="print a JSON document instead (docs/json.md)")
    sub.add_parser("health", help="one line and exit 0 (ok) or 1 (unhealthy): daemon, store, last sync, API")
    sub.add_parser("doctor", help="check every precondition of the node, read-only: exit 0 (all OK), 1 (WARN), 2 (FAIL)")
    status = sub.add_parser("status", help="print the slivers and the last sync's outcome")
    status.add_argument("--resources", action="store_true", help="also show effective resources")
    status.add_argument("--json", action="store_true", help="print a JSON document instead (docs/json.md)")

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    config_sub.add_parser("show", help="print the effective configuration as TOML")

    from .api.callcli import add_call_parser

    add_call_parser(sub)

    authority = sub.add_parser("authority", help="the bundled authority server")
    authority_sub = authority.add_subparsers(dest="authority_command", metavar="SUBCOMMAND", required=True)
    serve = authority_sub.add_parser("serve", help="serve GetSlivers and slices.xml from a TOML file")
    serve.add_argument("--data", type=Path, required=True, help="TOML file of nodes and slices")
    serve.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    serve.add_argument("--max-connections", type=int, default=20_000, metavar="N",
                       help="open connections served at once, held blocking queries included (default 20000)")
    from .plc.ticketcli import add_export_cert_option, add_ticket_parser

    add_export_cert_option(serve)
    add_ticket_parser(authority_sub)
    from .fleet.cli import add_fleet_parser

    add_fleet_parser(sub)
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import build_node
    from .logsetup import configure_logging, log_destination, reopen

    config = _config(args)
    log_file = log_destination(config.node.log_file, explicit="node.log_file" in config.explicit)
    for problem in configure_logging(log_file, foreground=not args.quiet):
        logger.error("event=logging-problem detail=%s", problem)
    node = build_node(config)
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    signal.signal(signal.SIGUSR1, lambda *_: node.poll_now())
    signal.signal(signal.SIGHUP, lambda *_: reopen())
    node.run()
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from .daemon import AlreadyRunning, build_node
    from .datadir import DataDir, Meta
    from .logsetup import configure_logging

    config = _config(args)
    datadir = DataDir(config.data_dir)
    if not args.once:
        try:
            pid = datadir.daemon_pid()
        except OSError as exc:
            raise NodeManagerError(f"cannot check the daemon's lock in {config.node.data_dir}: "
                                   f"{exc.strerror or exc}") from exc
        if pid is None:
            print("no node manager daemon is running on "
                  f"{config.node.data_dir}; use `nodemanager sync --once` to run one cycle here",
                  file=sys.stderr)
            return 1
        if pid < 1:  # held, but no pid written (yet): kill(-1) would signal every process
            print(f"a node manager holds the lock on {config.node.data_dir} but its pid file "
                  f"{datadir.pid_path} names no process; try again in a moment", file=sys.stderr)
            return 1
        if args.allow_mass_delete:
            _store_meta(config, {Meta.ALLOW_MASS_DELETE: "1"})
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the node manager (pid {pid}) to poll now")
        return 0
    configure_logging(config.node.log_file, foreground=True)
    node = build_node(config)
    try:
        node.start(serve=False)
    except AlreadyRunning as exc:
        print(f"{exc}; use `nodemanager sync` (without --once) to ask it to poll now", file=sys.stderr)
        return 1
    try:
        outcome = node.sync_once(allow_mass_delete=args.allow_mass_delete, wait=True, retry_now=True)
        if node.enforcement_loop is not None:
            node.enforcement_loop.apply_now()  # one cycle includes making the limits real
    finally:
        node.close()
    print(outcome.summary())
    return 0 if outcome.ok else 1


def _open_store(config: Config):  # noqa: ANN202 - a Store; imported lazily to keep --help fast
    from .datadir import DataDir
    from .store import Store

    path = DataDir(config.data_dir).store_path
    if not path.exists():
        raise NodeManagerError(f"no store at {path}: the node manager has not run with this configuration yet")
    return Store(path)


def _store_meta(config: Config, values: dict[str, str]) -> None:
    store = _open_store(config)
    try:
        store.set_meta(values)
    finally:
        store.close()


def cmd_plan(args: argparse.Namespace) -> int:
    from .daemon import build_node
    from .logsetup import configure_logging
    from .sync import SyncResult

    config = _config(args)
    configure_logging(None, foreground=True, level=logging.WARNING)
    node = build_node(config, tickets=None, enforcement=None)
    node.attach()
    try:
        outcome, actions = node.plan()
    finally:
        node.close()
    if args.json:
        from .statusjson import dumps, plan_document

        print(dumps(plan_document(outcome, actions)))
        return 0
    print(f"authority document: timestamp {outcome.document_timestamp}, {outcome.slivers} slivers, "
          f"{outcome.rejected} rejected")
    for rejection in outcome.rejections:
        print(f"  rejected {rejection.label}: {rejection.reason}")
    if outcome.result is SyncResult.STALE:
        print("the document is older than the data already held: a sync would ignore it")
    elif outcome.held:
        print(f"SAFETY VALVE: {len(outcome.held)} removals would be held: {', '.join(sorted(outcome.held))}")
    if not actions:
        print("nothing to do")
    for action in actions:
        extra = " (then start)" if action.start else ""
        print(f"{action.kind.value:<9} {action.name}  {action.reason}{extra}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .daemon import build_node
    from .datadir import Meta
    from .logsetup import configure_logging
    from .status import collect_resources, collect_status, render_resources, render_status

    config = _config(args)
    configure_logging(None, foreground=True, level=logging.ERROR)
    node = build_node(config, fetch=_no_fetch, tickets=None,
                      **({} if args.resources else {"enforcement": None}))
    node.attach()
    try:
        if not args.json:
            print(render_status(node.store))
        if args.resources:
            enforcement = node.enforcement
            if enforcement is not None and node.store.get_meta(Meta.BACKEND) != "hollow":
                enforcement.probe()
            else:
                enforcement = None
            if not args.json:
                print(render_resources(node.store, enforcement, config.slivers.name_prefix))
        if args.json:
            from .statusjson import dumps, status_document

            resources = collect_resources(node.store, enforcement, config.slivers.name_prefix) \
                if args.resources else None
            print(dumps(status_document(collect_status(node.store), resources)))
    finally:
        node.close()
    return 0


def _no_fetch():  # noqa: ANN202 - status never polls the authority
    raise NodeManagerError("status does not poll the authority")


def cmd_health(args: argparse.Namespace) -> int:
    from .health import check_health

    report = check_health(_config(args))
    print(report.line)
    return report.exit_code


def cmd_doctor(args: argparse.Namespace) -> int:
    from .core.doctor import exit_code, render
    from .doctor import run_checks
    from .logsetup import configure_logging

    configure_logging(None, foreground=True, level=logging.CRITICAL)  # the lines say it all
    checks = run_checks(_config(args))
    print(render(checks))
    return exit_code(checks)


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(_config(args)), end="")
    return 0


def cmd_authority(args: argparse.Namespace) -> int:
    if args.authority_command == "ticket":
        from .plc.ticketcli import cmd_authority_ticket

        return cmd_authority_ticket(args)
    from .plc.server import serve
    from .plc.signing import export_certificate
    from .logsetup import configure_logging

    configure_logging(None, foreground=True)
    if args.export_cert is not None:
        export_certificate(args.data, args.export_cert)
        print(f"ticket-signing certificate written to {args.export_cert}", file=sys.stderr)
    from .core.addresses import parse_host_port

    address = parse_host_port(args.listen, what="--listen")
    if address is None:
        raise ConfigError("--listen must be HOST:PORT")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.max_connections < 1:
        raise ConfigError("--max-connections must be at least 1")
    serve(args.data, address.host, address.port, stop=stop, max_connections=args.max_connections)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from .fleet.cli import cmd_fleet as fleet

    return fleet(args)


def cmd_call(args: argparse.Namespace) -> int:
    from .api.callcli import cmd_call as call

    return call(args)


COMMANDS = {
    "call": cmd_call,
    "run": cmd_run,
    "sync": cmd_sync,
    "plan": cmd_plan,
    "status": cmd_status,
    "health": cmd_health,
    "doctor": cmd_doctor,
    "config": cmd_config,
    "authority": cmd_authority,
    "fleet": cmd_fleet,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"nodemanager: configuration error: {exc}", file=sys.stderr)
        return 2
    except NodeManagerError as exc:
        print(f"nodemanager: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
