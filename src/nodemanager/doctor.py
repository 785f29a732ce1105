"""``nodemanager doctor``: every precondition of the node, checked read-only (``docs/doctor.md``).

Each check reuses the daemon's own probe (``EnforcementSet.probe``, ``sshd_problems``,
``unprivileged_access_problems``, ``AuthorityClient``, ``load_ticket_certificate``,
``load_ticket_keyring``/``GpgvVerifier``) so the doctor and the daemon cannot disagree about
what works. The probes run over :class:`~nodemanager.hostreadonly.ReadOnlyHost`: what the daemon
would prepare at its first start (parent cgroups, the images directory) is reported as "would
create", never done; no account, cgroup, qdisc or file is made. No daemon needs to run.

Time bound: the authority fetch (one attempt, a short per-request timeout) runs in a thread
started first, while the other checks run; it is given at most :data:`AUTHORITY_DEADLINE`
seconds in all, so an unreachable authority (or a DNS lookup that hangs) is a FAIL line, not a
hang. Each command is capped at :data:`COMMAND_TIMEOUT` seconds.

The verdicts (``Check``, exit status, rendering) are :mod:`nodemanager.core.doctor`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .config import Config
from .core.doctor import Check
from .core.errors import BackendError, NodeManagerError
from .doctormechanisms import keys_dir_check, mechanism_checks, sshd_check
from .host import Host
from .hostreadonly import ReadOnlyHost

__all__ = ["AUTHORITY_DEADLINE", "COMMAND_TIMEOUT", "DoctorProbes", "read_kernel_clock", "run_checks"]

log = logging.getLogger(__name__)

#: Seconds the authority check may take in all (connect, DNS, TLS, answer).
AUTHORITY_DEADLINE = 8.0
#: Per-request timeout of the authority fetch (at most ``authority.timeout``).
AUTHORITY_TIMEOUT = 5.0
#: Seconds any one command may take.
COMMAND_TIMEOUT = 5.0
#: Free space under which the data directory is a WARN: bytes, and fraction of the file system.
MIN_FREE_BYTES = 1 << 30
MIN_FREE_FRACTION = 0.10
GIB = float(1 << 30)
#: adjtimex(2): return value of an unsynchronised clock, and the status flag.
TIME_ERROR = 5
STA_UNSYNC = 0x0040


@dataclass
class DoctorProbes:
    """What the checks read the machine through; tests replace parts (FakeHost, a fake fetch).

    ``fetch``: the authority fetch (None: ``AuthorityClient`` from the configuration, one attempt
    with a short timeout); ``kernel_clock``: ``(adjtimex state, status flags)`` or None."""

    host: Any = field(default_factory=Host)
    statvfs: Callable[[str], os.statvfs_result] = os.statvfs
    kernel_clock: Callable[[], tuple[int, int] | None] = field(default_factory=lambda: read_kernel_clock)
    fetch: Callable[[], Any] | None = None
    euid: int = field(default_factory=os.geteuid)
    now: Callable[[], float] = time.time
    authority_deadline: float = AUTHORITY_DEADLINE


def run_checks(config: Config, probes: DoctorProbes | None = None) -> list[Check]:
    """Every check, in a fixed order; a check that crashes is a FAIL of its own line."""
    probes = probes or DoctorProbes()
    host = ReadOnlyHost(probes.host, max_timeout=COMMAND_TIMEOUT)
    authority = _AuthorityProbe(config, probes)
    authority.start()
    checks: list[Check] = []

    def guarded(name: str, probe: Callable[[], list[Check] | Check]) -> None:
        try:
            found = probe()
        except Exception as exc:  # noqa: BLE001 - one broken probe must not hide the others
            log.debug("doctor check %s crashed", name, exc_info=True)
            found = Check.fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                               "report this as a bug, with the line above")
        checks.extend(found if isinstance(found, list) else [found])

    hollow = config.slivers.backend == "hollow"
    guarded("privileges", lambda: _privileges(probes.euid))
    guarded("data_dir", lambda: _data_dir(config, host, probes.statvfs))
    guarded("enforcement", lambda: mechanism_checks(config, host, hollow=hollow))
    guarded("sshd", lambda: sshd_check(config, host, hollow=hollow))
    guarded("delegate_shell", lambda: _delegate_shell(config, hollow=hollow))
    guarded("slivers.group", lambda: _sliver_group(config, host, hollow=hollow))
    guarded("slivers.keys_dir", lambda: keys_dir_check(config, host, hollow=hollow))
    guarded("clock", lambda: _clock(config, host, probes.kernel_clock))
    guarded("tickets.cert", lambda: _ticket_cert(config, probes.now()))
    guarded("tickets.keyring", lambda: _ticket_keyring(config, host))
    guarded("authority", authority.result)
    return checks


# --- the node itself ------------------------------------------------------------------------
def _privileges(euid: int) -> Check:
    if euid == 0:
        return Check.ok("privileges", "running as root")
    return Check.warn("privileges", f"running as uid {euid}: some probes (sshd -T, cgroups, nft) "
                      "cannot see everything and may report problems root would not have",
                      "run `nodemanager doctor` as root, like the daemon")


def _data_dir(config: Config, host: ReadOnlyHost, statvfs: Callable[[str], os.statvfs_result]) -> Check:
    path = config.data_dir
    where, note = path, ""
    while host.stat_file(where) is None and where != where.parent:
        where, note = where.parent, " (not created yet: the first start makes it)"
    try:
        stats = statvfs(str(where))
    except OSError as exc:
        return Check.fail("data_dir", f"{where}: {exc.strerror or exc}",
                          f"make node.data_dir {path} reachable, or point node.data_dir elsewhere")
    mounts = [(Path(point), kind) for point, kind in host.mounts()]
    fs = max((m for m in mounts if where == m[0] or m[0] in where.parents), key=lambda m: len(m[0].parts),
             default=(Path("?"), "unknown"))
    total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    fraction = free / total if total else 0.0
    detail = (f"{path}{note} on {fs[1]} at {fs[0]}, {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB "
              f"({fraction:.0%})")
    if stats.f_flag & os.ST_RDONLY:
        return Check.fail("data_dir", f"{detail}: the file system is read-only",
                          "remount it read-write or point node.data_dir at a writable file system")
    if free == 0:
        return Check.fail("data_dir", f"{detail}: no space left", "free space on that file system")
    if free < MIN_FREE_BYTES or fraction < MIN_FREE_FRACTION:
        return Check.warn("data_dir", f"{detail}: under {MIN_FREE_BYTES / GIB:.0f} GiB or "
                          f"{MIN_FREE_FRACTION:.0%} free (the store and disk images live here)",
                          "free space on that file system")
    return Check.ok("data_dir", detail)


def _delegate_shell(config: Config, *, hollow: bool) -> Check:
    from .backends.delegate import default_forward_command, unprivileged_access_problems

    if hollow:
        return Check.ok("delegate_shell", "not used by the hollow backend")
    if not config.api.unix_socket:
        return Check.ok("delegate_shell", "not used (api.unix_socket is empty: no delegate shell)")
    command = default_forward_command(config.slivers.delegate_shell)
    problems = unprivileged_access_problems(command)
    if problems:
        return Check.fail("delegate_shell", "delegate accounts could not run their shell: " + "; ".join(problems),
                          "install the node manager where every user can read it (a system package, "
                          "/opt, /usr/local; not under /root or a private venv), or set "
                          "slivers.delegate_shell to such a program")
    return Check.ok("delegate_shell", f"{' '.join(command)}: readable and executable by every user")


def _sliver_group(config: Config, host: ReadOnlyHost, *, hollow: bool) -> Check:
    if hollow:
        return Check.ok("slivers.group", "not used by the hollow backend")
    name = config.slivers.group
    group = host.getgrnam(name)
    if group is None:
        return Check.ok("slivers.group", f"group {name} does not exist yet (made with the first sliver)")
    from .backends.account import MANAGED_GECOS

    prefix = config.slivers.name_prefix
    strangers = sorted(m for m in group.members if not m.startswith(prefix)
                       or (entry := host.getpwnam(m)) is None or entry.gecos != MANAGED_GECOS)
    if strangers:
        return Check.warn("slivers.group", f"group {name} (gid {group.gid}) also lists {', '.join(strangers)}: "
                          "not sliver accounts, sshd gives them the slivers' key rules",
                          f"remove them from {name} (gpasswd -d USER {name}) or choose another slivers.group")
    user = host.getpwnam(name)
    if user is not None and user.gid != group.gid:
        return Check.warn("slivers.group", f"an account {name} exists whose group is not {name}",
                          "choose a slivers.group that names no account")
    return Check.ok("slivers.group", f"group {name} (gid {group.gid}), {len(group.members)} members")


# --- time -------------------------------------------------------------------------------------
class _Timex(ctypes.Structure):
    """``struct timex`` of Linux (glibc's layout; the trailing padding included)."""

    _fields_ = [
        ("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long), ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    ]


def read_kernel_clock() -> tuple[int, int] | None:
    """``(clock state, status flags)`` from ``adjtimex(2)`` with no modes set (a pure read), or
    None when libc or the call is unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        adjtimex = ctypes.CDLL(name, use_errno=True).adjtimex
    except (OSError, AttributeError):
        return None
    timex = _Timex()
    state = adjtimex(ctypes.byref(timex))
    return None if state < 0 else (state, timex.status)


def _clock(config: Config, host: ReadOnlyHost, kernel_clock: Callable[[], tuple[int, int] | None]) -> Check:
    fix = ("run an NTP client (chrony, ntpsec or systemd-timesyncd); tickets tolerate "
           f"tickets.max_clock_skew = {config.tickets.max_clock_skew} s of difference with the authority")
    try:
        result = host.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], check=False)
        answer = result.stdout.decode("utf-8", "replace").strip() if result.returncode == 0 else ""
    except BackendError:
        answer = ""
    if answer == "yes":
        return Check.ok("clock", "synchronised (timedatectl: NTPSynchronized=yes)")
    if answer == "no":
        return Check.warn("clock", "not synchronised (timedatectl: NTPSynchronized=no)", fix)
    found = kernel_clock()
    if found is None:
        return Check.warn("clock", "cannot tell whether the clock is synchronised (no timedatectl answer, "
                          "adjtimex unavailable)", fix)
    state, status = found
    if state == TIME_ERROR or status & STA_UNSYNC:
        return Check.warn("clock", "the kernel reports the clock unsynchronised (adjtimex: STA_UNSYNC)", fix)
    return Check.ok("clock", "synchronised (adjtimex)")


# --- tickets ----------------------------------------------------------------------------------
def _ticket_cert(config: Config, now: float) -> Check:
    from .tickets import load_ticket_certificate

    path = config.authority.ticket_cert
    fix = ("copy the authority's ticket-signing certificate (PEM) there; the bundled authority "
           "writes it with `nodemanager authority serve --export-cert PATH`")
    if not path or not Path(path).exists():
        return Check.warn("tickets.cert", f"no certificate at authority.ticket_cert {path!r}: "
                          "XML-DSig tickets are refused", fix)
    try:
        certificate = load_ticket_certificate(Path(path))
    except NodeManagerError as exc:
        return Check.fail("tickets.cert", f"{exc} (the daemon refuses to start)", fix)
    until = certificate.not_valid_after_utc
    subject = certificate.subject.rfc4514_string() or "(no subject)"
    if until.timestamp() < now:
        return Check.fail("tickets.cert", f"{path}: {subject} expired on {until:%Y-%m-%d}", fix)
    return Check.ok("tickets.cert", f"{path}: {subject}, valid until {until:%Y-%m-%d}")


def _ticket_keyring(config: Config, host: ReadOnlyHost) -> list[Check]:
    from .pgptickets import GpgvVerifier, load_ticket_keyring

    path = config.authority.ticket_keyring
    if not path:
        return [Check.ok("tickets.keyring", "not set: OpenPGP (PLCAPI) tickets are refused")]
    fix = "export the authority's public key there (gpg --export KEYID > PATH) or clear authority.ticket_keyring"
    try:
        keyring = load_ticket_keyring(Path(path))
    except NodeManagerError as exc:
        return [Check.fail("tickets.keyring", f"{exc} (the daemon refuses to start)", fix)]
    checks = [Check.ok("tickets.keyring", f"{path}: {len(keyring)} bytes of OpenPGP keys")]
    try:
        verifier = GpgvVerifier(keyring, host=host.inner)
        version = host.run([verifier.gpgv, "--version"]).stdout.decode("utf-8", "replace").splitlines()[:1]
    except NodeManagerError as exc:
        return [*checks, Check.fail("gpgv", str(exc), "apt install gpgv util-linux")]
    return [*checks, Check.ok("gpgv", f"{verifier.gpgv}: {version[0] if version else 'present'}")]


# --- the authority ----------------------------------------------------------------------------
class _AuthorityProbe:
    """One fetch with the node's credentials, in a daemon thread, within a deadline."""

    def __init__(self, config: Config, probes: DoctorProbes) -> None:
        self.config = config
        self.fetch = probes.fetch
        self.deadline = probes.authority_deadline
        self.url = config.authority.url
        self._outcome: Check | None = None
        self._done = threading.Event()
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        threading.Thread(target=self._run, name="doctor-authority", daemon=True).start()

    def _run(self) -> None:
        try:
            self._outcome = self._fetch_once()
        except Exception as exc:  # noqa: BLE001 - reported as this check's line
            self._outcome = Check.fail("authority", f"{self.url}: {type(exc).__name__}: {exc}",
                                       "report this as a bug")
        finally:
            self._done.set()

    def _fetch_once(self) -> Check:
        from .authority.client import AuthorityClient

        fix = ("check authority.url, the network path to it, authority.ca_file, and the node's "
               "credentials (authority.node_id_file, node_key_file or session_file)")
        fetch = self.fetch
        try:
            if fetch is None:
                section = self.config.authority
                short = msgspec.structs.replace(section, timeout=int(min(section.timeout, AUTHORITY_TIMEOUT)))
                client = AuthorityClient.from_config(msgspec.structs.replace(self.config, authority=short))
                client.retries = 0
                fetch = client.fetch
            document, _ = fetch()
        except NodeManagerError as exc:
            text = str(exc)
            return Check.fail("authority", text if self.url in text else f"{self.url}: {text}", fix)
        took = time.monotonic() - self._started
        return Check.ok("authority", f"{self.url}: accepted in {took:.1f} s: {len(document.slivers)} slivers, "
                        f"{len(document.rejected)} rejected, timestamp {document.timestamp}")

    def result(self) -> Check:
        left = self.deadline - (time.monotonic() - self._started)
        if not self._done.wait(max(0.0, left)):
            return Check.fail("authority", f"{self.url}: no answer within {self.deadline:g} s",
                              "check authority.url and the network path to it (DNS, routes, firewall)")
        assert self._outcome is not None
        return self._outcome
