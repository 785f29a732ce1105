"""``make demo``: the bundled authority and the daemon against it, on this machine.

Starts the bundled authority on a loopback port with a copy of ``examples/demo-slices.toml`` in
``.demo/slices.toml`` (and its ticket-signing key), writes a node identity and configuration
there and runs the daemon until Ctrl-C (or ``--seconds``): the status table once, after the first
sync, then after each sync only what changed (slivers added, removed, started, stopped,
reconfigured, RSpec or keys changed: one line each with the time; a ``.`` when nothing did).
As root it creates real accounts named ``demo<slice>`` and removes them on exit; otherwise it uses
the hollow backend and says so. As root with sshd installed it also generates a key pair in
``.demo/``, gives its public key to one demo slice, runs a private sshd on a loopback port and
prints the ``ssh`` line that logs into that sliver (:mod:`nodemanager.demologin`); otherwise it
says why there is no login line. Edit ``.demo/slices.toml`` while it runs: the next poll (every
~15 s, or at once on ``kill -USR1``) shows the change.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from .plc.server import AuthorityServer
from .plc.signing import export_certificate
from .config import Config, parse_config
from .core.errors import AuthorityUnavailable
from .core.records import AuthorityDocument
from .daemon import build_node
from .logsetup import configure_logging
from .demologin import DemoLogin, add_key, login_slice, login_unavailable
from .status import collect_status, render_status
from .statuschanges import SliverSnapshot, describe_changes, snapshot

DEMO_PREFIX = "demo"
#: The demo slivers' group (a real node's is ``slivers``); removed with the demo's accounts.
DEMO_GROUP = "demoslivers"
BANNER = "=" * 78


def demo_config(work: Path, authority_url: str, *, real: bool, keys_dir: Path | None = None) -> Config:
    return parse_config({
        "node": {"data_dir": str(work / "data"), "log_file": str(work / "nodemanager.log")},
        "authority": {
            "url": authority_url,
            "node_id_file": str(work / "node_id"),
            "node_key_file": str(work / "node_key"),
            "ticket_cert": str(work / "authority.pem"),
            "poll_interval": 15,
            "poll_jitter": 5,
            "timeout": 10,
        },
        "api": {"tcp": "", "unix_socket": str(work / "api.sock")},
        "metrics": {"listen": ""},
        "slivers": {
            "backend": "account" if real else "hollow",
            "name_prefix": DEMO_PREFIX,
            "stop_grace": 2,
            # the demo's own keys directory and sliver group: nothing of a real node's is touched
            "keys_dir": str(keys_dir or work / "authorized_keys"),
            "group": DEMO_GROUP,
        },
        # CPU and memory cgroups are harmless on a workstation; shaping its uplink or mounting
        # disk images is not what a demo should do (a real node enables them, the default).
        "enforce": {"bandwidth": False, "disk": False},
    }, "demo")


def _no_polling() -> tuple[AuthorityDocument, frozenset[str]]:
    raise AuthorityUnavailable("the demo's clean-up does not poll the authority")


def remove_demo_accounts(config: Config) -> list[str]:
    """Destroy every account the demo created (recorded as owned in its store), with everything
    enforcement made for it (cgroups), through the same wiring as the daemon."""
    node = build_node(config, fetch=_no_polling, tickets=None)
    node.start(serve=False)
    try:
        removed = []
        for name, state in node.store.accounts().items():
            if state.owned:
                node.operations.destroy(name)
                removed.append(name)
        if node.host.getgrnam(DEMO_GROUP) is not None:
            node.host.run(["groupdel", DEMO_GROUP], check=False)
        return removed
    finally:
        node.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodemanager.demo", description=__doc__)
    parser.add_argument("--slices", type=Path, default=Path("examples/demo-slices.toml"))
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", "0")),
                        help="stop by itself after this many seconds (0: run until Ctrl-C)")
    parser.add_argument("--hollow", action="store_true", help="use the hollow backend even as root")
    args = parser.parse_args(argv)
    if not args.slices.is_file():
        print(f"demo: slices file {args.slices} not found (run from the repository root)", file=sys.stderr)
        return 1
    real = os.geteuid() == 0 and not args.hollow
    work = args.workdir.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "node_id").write_text("1\n")
    (work / "node_key").write_text("demo-node-key\n")
    os.chmod(work / "node_key", 0o600)

    configure_logging(str(work / "nodemanager.log"), foreground=False)
    # The authority serves a copy, so its signing key is generated in .demo/, not in examples/.
    slices = work / "slices.toml"
    shutil.copyfile(args.slices, slices)
    login, login_line = None, login_unavailable(real)
    if login_line is None:
        try:
            login = DemoLogin(work, DEMO_GROUP)
            atexit.register(login.close)  # sshd and its keys go even if the demo fails to start
            target = login_slice(slices)
            add_key(slices, target, login.make_key())
            login.start()
            login_line = "login: " + login.command(DEMO_PREFIX + target, Path.cwd())
        except (OSError, RuntimeError, ValueError) as exc:
            if login is not None:
                login.close()
            login, login_line = None, f"no login line: {exc}"
    else:
        login_line = f"no login line: {login_line}"
    export_certificate(slices, work / "authority.pem")
    authority = AuthorityServer(slices, "127.0.0.1", 0)
    port = authority.start()
    url = f"http://127.0.0.1:{port}/PLCAPI/"
    config = demo_config(work, url, real=real, keys_dir=login.keys_dir if login else None)
    print(BANNER)
    print(f"bundled authority: {url}  (data: {slices}: edit it, the next poll shows the change)")
    if real:
        print(f"backend: account — REAL Linux accounts named {DEMO_PREFIX}<slice>, removed on exit")
        print("enforcement: cpu and memory cgroups (bandwidth and disk are off in the demo)")
    else:
        print("backend: HOLLOW — records only, no accounts are created (run as root for real accounts)")
    print(f"log: {work / 'nodemanager.log'}   Ctrl-C to stop")
    print(f"API: .venv/bin/nodemanager call --socket {work / 'api.sock'} GetXIDs")
    print(f"tickets: .venv/bin/nodemanager authority ticket demo_deleg --data {slices}")
    print(login_line + ("   (once the first sync has created the account)" if login else ""))
    print(BANNER, flush=True)

    node = build_node(config)

    seen: dict[str, dict[str, SliverSnapshot]] = {}  # "last": the slivers at the previous sync

    def show(outcome) -> None:  # noqa: ANN001 - SyncOutcome
        node.pool.wait_idle(60)
        current = snapshot(collect_status(node.store).slivers)
        if "last" not in seen:
            print(f"\n--- sync at {time.strftime('%H:%M:%S')}: {outcome.summary()}")
            print(render_status(node.store))
            print("--- from now on: only what changes, one line each ('.' = a sync that changed nothing)",
                  flush=True)
        else:
            changes = describe_changes(seen["last"], current)
            if changes:
                stamp = time.strftime("%H:%M:%S")
                print("\n" + "\n".join(f"{stamp} {line}" for line in changes), flush=True)
            else:
                print(".", end="", flush=True)
        seen["last"] = current

    node.on_sync.append(show)
    signal.signal(signal.SIGUSR1, lambda *_: node.poll_now())
    signal.signal(signal.SIGINT, lambda *_: node.stop())
    signal.signal(signal.SIGTERM, lambda *_: node.stop())
    if args.seconds:  # a daemon thread: a Ctrl-C or SIGTERM before then must not wait for it
        timer = threading.Timer(args.seconds, node.stop)
        timer.daemon = True
        timer.start()
    try:
        node.run()
    finally:
        authority.stop()
        if login is not None:
            login.close()  # ends the demo's ssh sessions before their accounts go
        if real:
            removed = remove_demo_accounts(config)
            print(f"\nremoved demo accounts: {', '.join(DEMO_PREFIX + n for n in removed) or 'none'}")
        logging.shutdown()
    print("demo stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
