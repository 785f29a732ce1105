"""``nodemanager call METHOD [ARGS...]``: call the API from a shell.

Transports: the node's Unix socket (default: ``api.unix_socket`` of the node's configuration, or
``--socket PATH``), ``--tcp HOST:PORT``, or ``--ssh USER@HOST`` (XML-RPC over SSH through the system
ssh; needs no node configuration, since it runs on the controller's own machine).

Arguments are JSON when they parse as JSON (numbers, lists, objects, quoted strings), otherwise
literal strings, so ``nodemanager call GetRSpec site_alpha`` and ``nodemanager call SetLoans
site_a '[["site_b","nm_cpu_share",1]]'`` both do what they look like. ``null`` is not an XML-RPC
value, so a bare ``null`` is the string ``"null"``.

Exit status: 0 success; 1 the node answered with a Fault (``Fault N: message`` on stderr);
2 the call could not be made (transport or configuration error, unusable argument).
"""

from __future__ import annotations

import argparse
import json
import sys
import xmlrpc.client
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..config import load_config
from ..core.errors import ConfigError
from .client import DEFAULT_TIMEOUT, SshTransportError, XmlRpcOverSsh, local_proxy, tcp_proxy

EXIT_OK, EXIT_FAULT, EXIT_TRANSPORT = 0, 1, 2


class CallError(Exception):
    """The call could not be set up or delivered (exit status 2)."""


def add_call_parser(subparsers: Any) -> None:
    """Register the ``call`` sub-command on an argparse sub-parsers object (``set_defaults(func=cmd_call)``)."""
    parser = subparsers.add_parser(
        "call", help="call a node manager API method",
        description="Call a node manager API method and print the result. ARGS are JSON when they parse "
                    "as JSON, else literal strings.",
        epilog="Options for ssh that start with '-' need the '=' form: --ssh-option=-p --ssh-option=2222.",
    )
    parser.add_argument("method", metavar="METHOD", help="API method, e.g. GetXIDs, GetRSpec, SetLoans")
    parser.add_argument("args", metavar="ARGS", nargs="*", help="method arguments (JSON or literal strings)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="the node's API Unix socket (default: api.unix_socket)")
    where.add_argument("--tcp", metavar="HOST:PORT", help="the node's API TCP address, e.g. 127.0.0.1:812")
    where.add_argument("--ssh", metavar="USER@HOST", help="XML-RPC over SSH to a delegate (nm-controller) account")
    parser.add_argument("--ssh-option", metavar="OPT", action="append", default=[], dest="ssh_options",
                        help="an argument for ssh (repeatable), e.g. --ssh-option=-p --ssh-option=2222")
    parser.add_argument("--ssh-command", metavar="PROGRAM", default="ssh", help="the ssh client (default: ssh)")
    parser.add_argument("--timeout", metavar="SECONDS", type=float, default=DEFAULT_TIMEOUT,
                        help=f"give up after this many seconds (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=cmd_call)


def parse_argument(text: str) -> Any:
    """JSON when ``text`` parses as JSON (``null`` excepted), else ``text`` itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return text if value is None else value


def _proxy(args: argparse.Namespace) -> xmlrpc.client.ServerProxy:
    timeout = float(args.timeout)
    if args.ssh:
        return XmlRpcOverSsh(args.ssh, ssh_options=list(args.ssh_options or ()), ssh_command=args.ssh_command,
                             timeout=timeout)
    if args.tcp:
        try:
            return tcp_proxy(args.tcp, timeout=timeout)
        except ValueError as exc:
            raise CallError(str(exc)) from exc
    socket_path = args.socket
    if not socket_path:
        config_path = getattr(args, "config", None)
        try:
            config = load_config(Path(config_path) if config_path else None)
        except ConfigError as exc:
            raise CallError(str(exc)) from exc
        socket_path = config.api.unix_socket
        if not socket_path:
            raise CallError("api.unix_socket is disabled in the configuration: use --socket, --tcp or --ssh")
    return local_proxy(socket_path, timeout=timeout)


def cmd_call(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``nodemanager call``; returns the exit status (0 ok, 1 Fault, 2 cannot call)."""
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    params = tuple(parse_argument(text) for text in args.args)
    try:
        with _proxy(args) as proxy:
            result = getattr(proxy, args.method)(*params)
    except xmlrpc.client.Fault as fault:
        err.write(f"Fault {fault.faultCode}: {fault.faultString}\n")
        return EXIT_FAULT
    except SshTransportError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_TRANSPORT
    except CallError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_TRANSPORT
    except (TypeError, OverflowError) as exc:  # a value XML-RPC cannot carry (e.g. int > 2**31-1)
        err.write(f"error: cannot send these arguments: {exc}\n")
        return EXIT_TRANSPORT
    except xmlrpc.client.ProtocolError as exc:
        err.write(f"error: the node manager answered HTTP {exc.errcode} {exc.errmsg}\n")
        return EXIT_TRANSPORT
    except (xmlrpc.client.Error, OSError) as exc:
        err.write(f"error: cannot call {args.method}: {_describe(exc)}\n")
        return EXIT_TRANSPORT
    out.write(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n" if args.json else render(result))
    return EXIT_OK


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def render(value: Any) -> str:
    """A readable form: structs as aligned ``key  value`` rows (multi-line values indented below
    their key), arrays of arrays as aligned columns, other arrays one item per line."""
    if isinstance(value, dict):
        if not value:
            return "(empty)\n"
        width = max(len(str(key)) for key in value)
        lines = []
        for key in sorted(value, key=str):
            item = value[key]
            text = item.rstrip("\n") if isinstance(item, str) else _scalar(item)
            if "\n" in text:
                lines.append(f"{key}:")
                lines.extend(f"    {line}" for line in text.split("\n"))
            else:
                lines.append(f"{str(key).ljust(width)}  {text}")
        return "".join(line + "\n" for line in lines)
    if isinstance(value, list):
        if not value:
            return "(empty)\n"
        if all(isinstance(row, list) for row in value):
            rows = [[_scalar(cell) for cell in row] for row in value]
            widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
            return "".join("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n"
                           for row in rows)
        return "".join(_scalar(item) + "\n" for item in value)
    text = _scalar(value)
    return text if text.endswith("\n") else text + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nodemanager.api.callcli METHOD ...``: the ``call`` command on its own."""
    parser = argparse.ArgumentParser(prog="nodemanager")
    parser.add_argument("-c", "--config", default=None, help="node configuration file")
    add_call_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))

