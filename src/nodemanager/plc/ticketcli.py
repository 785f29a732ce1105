"""``nodemanager authority ticket SLICE --data FILE [--node N ...] [--ttl DURATION] [--output FILE]
[--format xml|pgp]`` and ``authority serve --export-cert PATH``.

``--format pgp`` prints PLCAPI's OpenPGP ticket instead (signed by ``gpg`` with the authority's
GnuPG key, generated on first use, see :mod:`.pgpsigning`) and says on standard error where the
public keyring for nodes' ``authority.ticket_keyring`` is.

The ticket command signs a ticket for a delegated slice of the data file with the authority's key
(generated on first use, see :mod:`.signing`) and prints the ticket XML, or writes it to
``--output`` (mode 0600: whoever holds the ticket can have it redeemed by the named controller).
It is the operator's path; the controller's is ``GetSliceTicket`` over XML-RPC.

``cli.py`` hooks these in: ``add_ticket_parser(authority_subparsers)`` registers the subcommand
(``args.authority_command == "ticket"``, ``args.handler is cmd_authority_ticket``), and
``add_export_cert_option(serve_parser)`` adds ``--export-cert`` to ``serve``, to be handled with
:func:`export_certificate` before serving.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from ..core.errors import ConfigError
from .issue import FORMAT_PGP, FORMAT_XML, FORMATS, TicketIssuer
from .model import load_authority_text, parse_duration
from .signing import export_certificate, publish_file

__all__ = ["add_export_cert_option", "add_ticket_parser", "cmd_authority_ticket", "export_certificate"]


def add_ticket_parser(
    authority_subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register ``authority ticket`` on the ``authority`` command's subparsers."""
    parser = authority_subparsers.add_parser(
        "ticket", help="print a signed ticket for a delegated slice",
        description="Sign a ticket for a delegated slice of the data file (tickets.md).",
    )
    parser.add_argument("slice", help="the delegated slice's name")
    parser.add_argument("--data", type=Path, required=True, help="the authority's TOML data file")
    parser.add_argument("--node", type=int, action="append", dest="nodes", metavar="N",
                        help="node id the ticket is valid on (repeatable; default: all the slice's nodes)")
    parser.add_argument("--ttl", default=None, metavar="DURATION",
                        help="validity, e.g. 3600, 12h, 1d (default: the data file's ticket_lifetime)")
    parser.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="write the ticket here (mode 0600) instead of standard output")
    parser.add_argument("--format", choices=FORMATS, default=FORMAT_XML,
                        help="xml: the XML-DSig ticket (default); pgp: PLCAPI's OpenPGP signed message")
    parser.set_defaults(handler=cmd_authority_ticket)
    return parser


def add_export_cert_option(serve_parser: argparse.ArgumentParser) -> None:
    """Add ``--export-cert PATH`` to ``authority serve``."""
    serve_parser.add_argument(
        "--export-cert", type=Path, default=None, metavar="PATH",
        help="write the ticket-signing certificate (nodes' authority.ticket_cert) to PATH before serving",
    )


def cmd_authority_ticket(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    """Run ``authority ticket``; ``ConfigError`` / ``NodeManagerError`` propagate to ``cli.main``."""
    data_path = Path(args.data)
    try:
        text = data_path.read_text(encoding="utf-8")
        mtime = int(data_path.stat().st_mtime)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read authority data {data_path}: {exc}") from exc
    # The same timestamp the server gives this file's documents (its mtime, for "mtime").
    data = load_authority_text(text, timestamp=mtime, base_time=mtime, origin=str(data_path))
    ttl = None
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl)
        except ValueError as exc:
            raise ConfigError(f"--ttl: {exc}") from exc
    issuer = TicketIssuer(data_path)
    fmt = getattr(args, "format", FORMAT_XML)
    ticket = issuer.issue(data, args.slice, now=int(time.time()), ttl=ttl, nodes=args.nodes, format=fmt)
    if fmt == FORMAT_PGP:
        _, identity = issuer.pgp_identity(data)
        print(f"OpenPGP public key for nodes' authority.ticket_keyring: {identity.public_path} "
              f"(fingerprint {identity.fingerprint})", file=sys.stderr)
    if args.output is not None:
        try:
            publish_file(Path(args.output), ticket, 0o600, exclusive=False)
        except OSError as exc:
            raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    else:
        (stdout or sys.stdout).write(ticket.decode("utf-8") + "\n")
    return 0
