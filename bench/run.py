"""`make bench`: every benchmark, each size in its own process (so peak RSS is per size).

Prints one line per figure: ``METRIC <name> <value> <unit>``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    failed = 0
    runs = [[str(HERE / "sync_bench.py"), "--sizes", str(n)] for n in (100, 1000, 10000)]
    runs.append([str(HERE / "restart_bench.py"), "--sizes", "10000"])
    runs.append([str(HERE / "parse_bench.py")])
    runs.append([str(HERE / "api_bench.py")])
    runs += [[str(HERE / "fleet_bench.py"), "--nodes", str(n)] for n in (1000, 10000)]
    runs.append([str(HERE / "authority_wait_bench.py"), "--nodes", "10000"])
    if shutil.which("gpgv") and shutil.which("gpg"):
        runs.append([str(HERE / "pgp_ticket_bench.py")])
    else:
        print("# OpenPGP ticket benchmark skipped: needs gpg and gpgv (apt-get install gpgv gnupg)", flush=True)
    if os.geteuid() == 0:
        runs.append([str(HERE / "accounts_bench.py")])
        runs.append([str(HERE / "placement_bench.py")])
        runs.append([str(HERE / "change_bench.py")])
    else:
        print("# accounts, placement and change-to-login benchmarks skipped: need root (real accounts, cgroups, "
              "sshd)", flush=True)
    for argv in runs:
        failed |= subprocess.run([sys.executable, *argv], env=env, check=False).returncode
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
