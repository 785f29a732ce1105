"""Command-line entry points; the only module that exits the process.

    nodemanager [-c CONFIG] run                      the daemon (foreground; systemd runs it so)
    nodemanager [-c CONFIG] sync [--once] [--allow-mass-delete]
    nodemanager [-c CONFIG] plan                     what a sync would do, without doing it
    nodemanager [-c CONFIG] status                   slivers table and last sync outcome
    nodemanager [-c CONFIG] config show              the effective configuration (TOML)
    nodemanager [-c CONFIG] call METHOD [ARGS...]    call the API (local socket, --tcp, --ssh)
    nodemanager authority serve --data FILE [--listen HOST:PORT] [--export-cert PATH]
    nodemanager authority ticket SLICE --data FILE [--node N]... [--ttl DURATION]
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

    sub.add_parser("plan", help="print what a sync would do now, without doing it")
    sub.add_parser("health", help="one line and exit 0 (ok) or 1 (unhealthy): daemon, store, last sync, API")
    status = sub.add_parser("status", help="print the slivers and the last sync's outcome")
    status.add_argument("--resources", action="store_true", help="also show effective resources")

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
    from .authority.ticketcli import add_export_cert_option, add_ticket_parser

    add_export_cert_option(serve)
    add_ticket_parser(authority_sub)
    return parser


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import NodeManager
    from .logsetup import configure_logging, reopen

    config = _config(args)
    for problem in configure_logging(config.node.log_file, foreground=not args.quiet):
        logger.error("event=logging-problem detail=%s", problem)
    manager = NodeManager(config)
    signal.signal(signal.SIGTERM, lambda *_: manager.stop())
    signal.signal(signal.SIGINT, lambda *_: manager.stop())
    signal.signal(signal.SIGUSR1, lambda *_: manager.poll_now())
    signal.signal(signal.SIGHUP, lambda *_: reopen())
    manager.run()
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    from .daemon import AlreadyRunning, NodeManager
    from .sync import META_ALLOW_MASS_DELETE
    from .logsetup import configure_logging

    config = _config(args)
    if not args.once:
        pid = _running_daemon_pid(config)
        if pid is None:
            print("no node manager daemon is running on "
                  f"{config.node.data_dir}; use `nodemanager sync --once` to run one cycle here",
                  file=sys.stderr)
            return 1
        if args.allow_mass_delete:
            _store_meta(config, {META_ALLOW_MASS_DELETE: "1"})
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the node manager (pid {pid}) to poll now")
        return 0
    configure_logging(config.node.log_file, foreground=True)
    try:
        manager = NodeManager(config)
    except AlreadyRunning as exc:
        print(f"{exc}; use `nodemanager sync` (without --once) to ask it to poll now", file=sys.stderr)
        return 1
    try:
        outcome = manager.sync_once(allow_mass_delete=args.allow_mass_delete, wait=True, retry_now=True)
    finally:
        manager.close()
    print(outcome.summary())
    return 0 if outcome.ok else 1


def _running_daemon_pid(config: Config) -> int | None:
    """The pid of the daemon holding the data dir's lock, or None when none does."""
    import fcntl

    from .daemon import read_pid

    path = config.data_dir / "nodemanager.pid"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(path)
    finally:
        os.close(fd)
    return None


def _open_store(config: Config):  # noqa: ANN202 - a Store; imported lazily to keep --help fast
    from .store import Store

    path = config.data_dir / "nodemanager.sqlite"
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
    from .authority.client import AuthorityClient
    from .clock import SystemClock
    from .daemon import build_backend
    from .logsetup import configure_logging
    from .sync import Syncer

    config = _config(args)
    configure_logging(None, foreground=True, level=logging.WARNING)
    store = _open_store(config)
    try:
        syncer = Syncer(store=store, backend=build_backend(config), operations=None, pool=None,
                        fetch=None, clock=SystemClock(),
                        max_delete_fraction=config.sync.max_delete_fraction,
                        confirm_after=config.sync.confirm_after)
        doc, protected = AuthorityClient.from_config(config).fetch()
        merged = syncer.merge(doc, protected, allow_mass_delete=False)
        syncer.authority_seen = True
        records = merged.records if merged is not None else None
        actions = syncer.plan(records)
    finally:
        store.close()
    print(f"authority document: timestamp {doc.timestamp}, {len(doc.slivers)} slivers, {len(doc.rejected)} rejected")
    for rejection in doc.rejected:
        print(f"  rejected {rejection.label}: {rejection.reason}")
    if merged is None:
        print("the document is older than the data already held: a sync would ignore it")
    elif merged.held:
        print(f"SAFETY VALVE: {len(merged.held)} removals would be held: {', '.join(sorted(merged.held))}")
    if not actions:
        print("nothing to do")
    for action in actions:
        extra = " (then start)" if action.start else ""
        print(f"{action.kind.value:<9} {action.name}  {action.reason}{extra}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .status import render_resources, render_status

    config = _config(args)
    store = _open_store(config)
    try:
        print(render_status(store))
        if args.resources:
            enforcement = None
            if store.get_meta("backend") != "hollow" and config.slivers.backend != "hollow":
                from .enforce.set import EnforcementSet
                from .host import Host
                from .logsetup import configure_logging

                configure_logging(None, foreground=True, level=logging.ERROR)
                enforcement = EnforcementSet.from_config(config, Host())
            print(render_resources(store, enforcement, config.slivers.name_prefix))
    finally:
        store.close()
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from .health import check_health

    report = check_health(_config(args))
    print(report.line)
    return report.exit_code


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(_config(args)), end="")
    return 0


def cmd_authority(args: argparse.Namespace) -> int:
    if args.authority_command == "ticket":
        from .authority.ticketcli import cmd_authority_ticket

        return cmd_authority_ticket(args)
    from .authority.server import serve
    from .authority.signing import export_certificate
    from .logsetup import configure_logging

    configure_logging(None, foreground=True)
    if args.export_cert is not None:
        export_certificate(args.data, args.export_cert)
        print(f"ticket-signing certificate written to {args.export_cert}", file=sys.stderr)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--listen must be HOST:PORT, not {args.listen!r}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(args.data, host.strip("[]"), int(port), stop=stop)
    return 0


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
    "config": cmd_config,
    "authority": cmd_authority,
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
