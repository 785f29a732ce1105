"""The sshd settings a node needs, and the check that sshd really applies them.

Sliver accounts are members of one group (``slivers.group``); for members of that group sshd must
read the node manager's root-owned keys file and nothing a sliver can write. :func:`match_block`
is that ``Match`` block (``packaging/sshd_config.d/nodemanager.conf`` is its text for the default
configuration, and the private test sshd carries it too); :func:`sshd_problems` asks the installed
sshd what it would do for one sliver account (``sshd -T -C user=...``, the effective settings
after every ``Match``) and says what differs. The daemon runs it at start-up and ``status``
shows it: a node whose sshd still reads ``~/.ssh/authorized_keys`` for slivers cannot take a key
away from a sliver.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import BackendError
from ..host import Host

SSHD = "/usr/sbin/sshd"
#: Every problem :func:`sshd_problems` reports starts with this.
PROBLEM_PREFIX = "sshd is not set up to read the node's keys"

#: Settings of the block, as ``sshd -T`` prints them (keyword lower-case) -> value.
_EXPECTED = {
    "authorizedkeyscommand": "none",
    "pubkeyauthentication": "yes",
    "hostbasedauthentication": "no",
    "ignorerhosts": "yes",
}


def match_block(keys_dir: Path, group: str) -> str:
    """The ``Match Group`` block for ``group``'s members: keys from ``keys_dir/<account>`` only.

    ``AuthorizedKeysFile`` names one file, so sshd's default second file
    (``~/.ssh/authorized_keys2``) is never read; no keys command, no host-based or rhosts logins
    (``~/.shosts``), no passwords. sshd keeps the first value it reads for each keyword: the block
    must come before any global ``AuthorizedKeysFile`` (Debian's ``sshd_config`` includes
    ``sshd_config.d/*.conf`` first)."""
    return (
        "# Written for the PlanetLab node manager. Sliver accounts log in with the keys the node\n"
        "# manager keeps (root-owned) and with nothing the sliver can write itself.\n"
        f"Match Group {group}\n"
        f"    AuthorizedKeysFile {Path(keys_dir)}/%u\n"
        "    AuthorizedKeysCommand none\n"
        "    PubkeyAuthentication yes\n"
        "    HostbasedAuthentication no\n"
        "    IgnoreRhosts yes\n"
        "    PasswordAuthentication no\n"
        "    KbdInteractiveAuthentication no\n"
    )


def sshd_problems(host: Host, account: str, keys_dir: Path, *, config: Path | None = None,
                  sshd: str = SSHD) -> list[str]:
    """Why sshd would not use ``keys_dir/<account>`` as the only keys of ``account`` (a sliver
    account, so a member of the sliver group); empty when it would.

    ``config``: another sshd configuration file (tests); None: the installed one. Each problem
    starts with :data:`PROBLEM_PREFIX`. Read-only; callable from any thread."""
    argv = [sshd, "-T", "-C", f"user={account},host=localhost,addr=127.0.0.1"]
    if config is not None:
        argv[1:1] = ["-f", str(config)]
    try:
        result = host.run(argv, check=False, timeout=30)
    except BackendError as exc:
        return [f"{PROBLEM_PREFIX}: sshd cannot be run ({exc}); install openssh-server"]
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        return [f"{PROBLEM_PREFIX}: `sshd -T` failed with status {result.returncode}: {tail[0]}"]
    settings: dict[str, str] = {}
    for line in result.stdout.decode("utf-8", "replace").splitlines():
        keyword, _, value = line.strip().partition(" ")
        settings.setdefault(keyword.lower(), value.strip())
    problems = []
    wanted = f"{Path(keys_dir)}/%u"
    found = settings.get("authorizedkeysfile", "(unset)")
    if found != wanted:
        problems.append(f"{PROBLEM_PREFIX}: for sliver account {account} sshd reads AuthorizedKeysFile {found}, "
                        f"not only {wanted} (install packaging/sshd_config.d/nodemanager.conf in "
                        "/etc/ssh/sshd_config.d/ and reload sshd)")
    for keyword, value in _EXPECTED.items():
        if settings.get(keyword, value) != value:
            problems.append(f"{PROBLEM_PREFIX}: for sliver account {account} sshd has {keyword} "
                            f"{settings[keyword]}, not {value}")
    return problems
