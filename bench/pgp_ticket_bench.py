"""Benchmark: CPU time per PLCAPI OpenPGP ticket verification on the node.

One verification is what ``TicketVerifier`` does before the rules: the strict dearmor, ``gpgv``
(under ``prlimit``, in a private temporary directory) and the hardened decode + GetSlivers
validation of the signed content, for a one-sliver ticket. Measured for a stock-MyPLC ticket
(``gpg1``, DSA-1024, SHA-1) when ``gpg1`` is installed and for a GnuPG 2 ed25519 one. CPU time is
this process's plus its children's (``prlimit`` + ``gpgv``). Prints
``METRIC pgp_ticket_cpu_ms_<kind> <x> ms``.

    python bench/pgp_ticket_bench.py [--repeat N]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

from nodemanager.pgptickets import GpgvVerifier, dearmor, plc_ticket
from nodemanager.testing.openpgp import export_public, gpg1_dsa_key, gpg2_key, plc_content, sign

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMjWLHebuAEps9lj+CyuRVy+mJfSXdcmDLlw97+0NnDm alice@example.org"


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="nm-pgp-bench-"))
    try:
        sliver = {"name": "plc_deleg", "slice_id": 42, "instantiation": "delegated", "expires": 2**31 - 1,
                  "keys": [{"key_type": "ssh", "key": KEY}],
                  "attributes": [{"tagname": "delegations", "value": "plc_ctrl"}]}
        body = plc_content({"timestamp": int(time.time()), "initscripts": [], "slivers": [sliver]})
        cases = {}
        if shutil.which("gpg1"):
            fpr = gpg1_dsa_key(base / "g1")
            cases["gpg1_dsa1024"] = (export_public("gpg1", base / "g1", fpr), sign(base / "g1", body, gpg="gpg1"))
        fpr = gpg2_key(base / "g2", "Bench", "bench@example.org")
        cases["gpg2_ed25519"] = (export_public("gpg", base / "g2", fpr), sign(base / "g2", body, users=(fpr,)))
        for kind, (keyring, ticket) in cases.items():
            verifier = GpgvVerifier(keyring)
            cpu, wall = _cpu(), time.perf_counter()
            for _ in range(args.repeat):
                signer, content = verifier.verify(dearmor(ticket))
                plc_ticket(content, signer)
            cpu_ms = (_cpu() - cpu) / args.repeat * 1000
            wall_ms = (time.perf_counter() - wall) / args.repeat * 1000
            print(f"{kind}: {cpu_ms:.2f} ms CPU, {wall_ms:.2f} ms wall per ticket ({args.repeat} tickets)")
            print(f"METRIC pgp_ticket_cpu_ms_{kind} {cpu_ms:.3f} ms")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
