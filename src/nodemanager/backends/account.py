"""The account backend (the default): one Linux account per sliver.

A sliver ``NAME`` becomes the account ``name_prefix + NAME`` with its own group, the GECOS marker
``nodemanager sliver``, the configured shell and the home ``home_root/ACCOUNT`` (mode 0700, owned by
the account). Its uid is the sliver's XID. Accounts are made with shadow's ``useradd``/``userdel``/
``usermod`` (they lock passwd, shadow and group correctly); every other effect goes through the
:class:`~nodemanager.host.Host` seam, whose file operations refuse links planted by the sliver.

Password field: ``*`` (no password, but key logins allowed: sshd with ``UsePAM no`` refuses key
logins to ``!`` accounts, useradd's default). A disabled sliver (``nm_enabled = 0``) gets ``!*``
and an expiry in 1970, which stops key logins under both ``UsePAM no`` and ``UsePAM yes``, an empty
``authorized_keys``, and no processes.

Delegate accounts: with a delegate shell configured (:mod:`.delegate`), an ``nm-controller``
sliver's login shell is the generated wrapper running ``forward_api_calls`` (set by ``create``,
corrected by ``configure``; a sliver that stops being a controller gets ``shell`` back), its keys
get the ``restrict`` option (no port forwarding, agent, X11, pty or ``~/.ssh/rc``: the account
speaks XML-RPC and nothing else), and ``~/.hushlogin`` exists, owned by root, so PAM prints no
message of the day into the XML-RPC answer. The shell is unregistered from ``/etc/shells`` when no
passwd entry uses it any more. Without a delegate shell, controllers are ordinary accounts (a
warning says so once).

Ownership: the backend never decides whether an account is the node manager's; the store does.
``create`` refuses any existing account or group of that name (``AccountConflict``), so a
pre-existing user is never adopted, and ``destroy`` is only called for accounts the store records
as created by us. uid 0 is refused everywhere, whatever the store says.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..core.errors import AccountConflict, BackendError
from ..core.records import NM_CONTROLLER, ObservedAccount, Sliver, is_valid_name, validate_name
from ..host import CommandResult, Host, PasswdEntry
from .delegate import SHELLS_FILE, DelegateShell, default_forward_command, wrapper_path_for
from .processes import GRACE_POLL as GRACE_POLL  # re-exported: the stop timing lives in .processes
from .processes import KILL_PAUSE as KILL_PAUSE
from .processes import KILL_ROUNDS as KILL_ROUNDS
from .processes import stop_processes

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)


#: Retries of a shadow command that found the password database locked by another program.
LOCK_RETRIES = 8
LOCK_RETRY_DELAY_S = 0.25


class AccountHooks(Protocol):
    """What resource enforcement does at points of an account's life (see ``enforcing``).

    Called from worker threads (one call at a time per sliver)."""

    def account_created(self, sliver: Sliver, uid: int) -> None:
        """The account exists and nothing runs as ``uid`` yet: make the sliver's cgroups with its
        limits now, so that the very first process of the uid (a login a millisecond later) is
        placed into limits that already hold."""
        ...

    def home_created(self, sliver: Sliver, uid: int, gid: int, home: Path) -> None:
        """The empty home exists; nothing is written in it yet (a disk image mounts here)."""
        ...

    def stop_processes(self, name: str, uid: int, grace: float) -> bool:
        """End every process of the sliver: those in its cgroups and any process of ``uid``
        outside them. TERM, up to ``grace`` seconds, then kill through the cgroup (freeze and
        kill; ``cgroup.kill`` on v2), never by outrunning a fork loop. Returns False when cgroups
        are not in use here (the backend then stops the uid's processes by pid itself); raises
        ``BackendError`` when processes survive."""
        ...

    def start_cgroups(self, name: str) -> list[Path]:
        """The cgroups that programs started for the sliver join (created if missing)."""
        ...

    def before_removal(self, name: str, uid: int) -> None:
        """The sliver is stopped and its account about to go: remove its enforcement state."""
        ...

#: GECOS of every account this backend creates; ``observe`` reports it as ``managed_marker``.
MANAGED_GECOS = "nodemanager sliver"
OPEN_PASSWORD, OPEN_EXPIRE = "*", ""
LOCKED_PASSWORD, LOCKED_EXPIRE = "!*", "1"
#: PATH given to programs started for a sliver.
SLIVER_PATH = "/usr/local/bin:/usr/bin:/bin"
#: userdel exit statuses that still mean "the account is gone".
_USERDEL_GONE = {0: "removed", 6: "already absent", 12: "removed, home left behind"}
_USERDEL_BUSY = 8
HUSHLOGIN = ".hushlogin"
#: Key types an ``authorized_keys`` line may start with (otherwise it starts with options).
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")


class AccountBackend:
    kind = "account"

    def __init__(
        self,
        host: Host,
        *,
        home_root: Path,
        shell: str,
        name_prefix: str = "",
        stop_grace: float = 10.0,
        delegate_shell: Path | None = None,
        delegate_socket: str | None = None,
        forward_command: Sequence[str] | None = None,
        shells_file: Path = SHELLS_FILE,
        hooks: AccountHooks | None = None,
    ) -> None:
        """``delegate_shell`` is where the wrapper for ``nm-controller`` accounts goes (None: no
        delegate accounts); ``delegate_socket`` the API socket it forwards to (default: ``api.sock``
        beside the wrapper); ``forward_command`` the forward_api_calls argv (default:
        :func:`~.delegate.default_forward_command`)."""
        self.host = host
        self.home_root = Path(home_root)
        self.shell = shell
        self.name_prefix = name_prefix
        self.stop_grace = float(stop_grace)
        # The shadow tools serialise on the passwd lock with a timeout ("cannot lock /etc/passwd;
        # try again later"); queueing here keeps a burst of workers clear of that timeout.
        self._database_lock = threading.Lock()
        self.delegate_shell = Path(delegate_shell) if delegate_shell is not None else None
        self.delegate: DelegateShell | None = None
        if self.delegate_shell is not None:
            self.delegate = DelegateShell(
                self.delegate_shell,
                socket_path=delegate_socket or str(self.delegate_shell.parent / "api.sock"),
                forward_command=list(forward_command) if forward_command else default_forward_command(),
                shells_file=shells_file,
            )
        self._warned_no_delegate = False
        #: Resource enforcement's part in an account's life (disk image before the keys are
        #: written, cgroups to start in, teardown before userdel); None: no enforcement.
        self.hooks = hooks

    @classmethod
    def from_config(cls, config: Config, host: Host) -> AccountBackend:
        """Delegate accounts need the Unix socket: without ``api.unix_socket`` there are none."""
        s = config.slivers
        socket = config.api.unix_socket
        return cls(host, home_root=Path(s.home_root), shell=s.shell, name_prefix=s.name_prefix,
                   stop_grace=float(s.stop_grace), delegate_shell=wrapper_path_for(socket),
                   delegate_socket=socket or None, forward_command=default_forward_command(s.delegate_shell))

    # --- naming ---------------------------------------------------------------------------
    def account_name(self, name: str) -> str:
        """The Unix account of sliver ``name``; refuses names that are not valid sliver names."""
        return self.name_prefix + validate_name(name)

    def home_of(self, name: str) -> Path:
        return self.home_root / self.account_name(name)

    # --- Backend protocol -----------------------------------------------------------------
    def observe(self) -> dict[str, ObservedAccount]:
        """Accounts named prefix + a valid sliver name, from one pass over the password database."""
        found: dict[str, ObservedAccount] = {}
        cut = len(self.name_prefix)
        for entry in self.host.all_users():
            if entry.name.startswith(self.name_prefix) and is_valid_name(entry.name[cut:]):
                name = entry.name[cut:]
                found[name] = ObservedAccount(name, entry.uid, entry.gecos == MANAGED_GECOS)
        return found

    def lookup(self, name: str) -> ObservedAccount | None:
        if not is_valid_name(name):
            return None
        entry = self.host.getpwnam(self.name_prefix + name)
        if entry is None:
            return None
        return ObservedAccount(name, entry.uid, entry.gecos == MANAGED_GECOS)

    def create(self, sliver: Sliver) -> int:
        name = sliver.name
        account = self.account_name(name)
        home = self.home_of(name)
        with _failures(name, "create"):
            if self.host.getpwnam(account) is not None:
                raise AccountConflict(
                    f"sliver {name}: account {account!r} already exists and was not created by the "
                    "node manager; it is left untouched"
                )
            if self.host.getgrnam(account) is not None:
                raise AccountConflict(
                    f"sliver {name}: group {account!r} already exists and was not created by the "
                    "node manager; it is left untouched"
                )
            home_existed = self._check_home_free(name, home)
            shell = self._login_shell(sliver)
            if self.delegate is not None and shell == str(self.delegate.path):
                self.delegate.install(self.host)
            try:
                self._account_command([
                    "useradd", "--user-group", "--no-create-home", "--home-dir", str(home),
                    "--comment", MANAGED_GECOS, "--shell", shell, "--password", OPEN_PASSWORD,
                    "--key", "SUB_UID_COUNT=0", "--key", "SUB_GID_COUNT=0", account,
                ])
                entry = self.host.getpwnam(account)
                if entry is None:
                    raise BackendError(f"useradd succeeded but account {account!r} does not exist")
                self._refuse_root(name, entry)
                self.host.makedirs_owned(home, entry.uid, entry.gid, 0o700)
                if self.hooks is not None:
                    self.hooks.home_created(sliver, entry.uid, entry.gid, home)
            except BackendError:
                self._undo_create(name, account, home, home_existed)
                raise
        logger.info("sliver=%s event=created account=%s uid=%d", name, account, entry.uid)
        return entry.uid

    def configure(self, sliver: Sliver, rspec: Mapping[str, int]) -> None:
        name = sliver.name
        enabled = rspec.get("nm_enabled", 1) != 0
        with _failures(name, "configure"):
            entry = self._entry(name)
            home = self.home_of(name)
            uid, gid = entry.uid, entry.gid
            self.host.makedirs_owned(home, uid, gid, 0o700)
            self.host.makedirs_owned(home / ".ssh", uid, gid, 0o700)
            delegated = self._is_delegate(sliver)
            keys = _keys_content(name, sliver.keys, restrict=delegated) if enabled else b""
            wrote = self._ensure_file(home / ".ssh" / "authorized_keys", keys, uid, gid, 0o600)
            nm_dir = home / ".nodemanager"
            self.host.makedirs_owned(nm_dir / "start.d", uid, gid, 0o700)
            self.host.makedirs_owned(nm_dir, uid, gid, 0o700)
            if sliver.initscript:
                wrote |= self._ensure_file(nm_dir / "initscript", sliver.initscript.encode(), uid, gid, 0o700)
            else:
                self.host.remove_file(nm_dir / "initscript")
            self._ensure_enabled(name, entry.name, enabled)
            self._ensure_login_shell(sliver, entry, delegated)
            if not enabled:
                self._stop(name, uid)
        logger.info("sliver=%s event=configured enabled=%d keys=%d wrote=%d",
                    name, enabled, len(sliver.keys) if enabled else 0, wrote)

    def start(self, sliver: Sliver) -> None:
        """Run the initscript, then every executable in ``~/.nodemanager/start.d`` in name order.

        Each call starts them again (like a reboot of the sliver); a disabled (locked) sliver is
        not started."""
        name = sliver.name
        with _failures(name, "start"):
            entry = self._entry(name)
            shadow = self.host.shadow_entry(entry.name)
            if shadow is not None and shadow.password.startswith("!"):
                logger.info("sliver=%s event=start-skipped reason=disabled", name)
                return
            home = self.home_of(name)
            nm_dir = home / ".nodemanager"
            self.host.makedirs_owned(nm_dir, entry.uid, entry.gid, 0o700)
            programs: list[list[str]] = []
            if sliver.initscript:
                script = nm_dir / "initscript"
                self._ensure_file(script, sliver.initscript.encode(), entry.uid, entry.gid, 0o700)
                programs.append([str(script)] if sliver.initscript.startswith("#!") else ["/bin/sh", str(script)])
            start_d = nm_dir / "start.d"
            programs.extend([str(start_d / program)] for program in self.host.list_executables(start_d))
            env = {"HOME": str(home), "USER": entry.name, "LOGNAME": entry.name, "PATH": SLIVER_PATH,
                   "SHELL": self.shell}
            cgroups = self.hooks.start_cgroups(name) if self.hooks is not None and programs else []
            for argv in programs:
                self.host.spawn_detached(argv, uid=entry.uid, gid=entry.gid, home=home, env=env,
                                         cgroups=cgroups,
                                         log_path=nm_dir / "start.log")
        logger.info("sliver=%s event=started programs=%d", name, len(programs))

    def stop(self, name: str) -> None:
        with _failures(name, "stop"):
            entry = self.host.getpwnam(self.account_name(name))
            if entry is None:
                return
            self._refuse_root(name, entry)
            self._stop(name, entry.uid)

    def destroy(self, name: str) -> None:
        account = self.account_name(name)
        home = self.home_of(name)
        with _failures(name, "destroy"):
            entry = self.host.getpwnam(account)
            if entry is None:
                self._remove_orphan_home(name, home)
                logger.info("sliver=%s event=destroyed account=%s note=already-absent", name, account)
                return
            self._refuse_root(name, entry)
            self._stop(name, entry.uid)
            if self.hooks is not None:  # cgroups, classes, rules, the home's disk image
                self.hooks.before_removal(name, entry.uid)
            # --remove only when the home is ours: an edited passwd entry must not aim it elsewhere.
            argv = ["userdel", "--remove", account] if entry.home == str(home) else ["userdel", account]
            result = self._account_command(argv, check=False)
            if result.returncode == _USERDEL_BUSY:
                self._stop(name, entry.uid)
                result = self._account_command(argv, check=False)
            if result.returncode not in _USERDEL_GONE:
                tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
                raise BackendError(f"userdel exited with status {result.returncode}: {tail or '(no stderr)'}")
            self._remove_orphan_home(name, home)
            group = self.host.getgrnam(account)
            if group is not None and group.gid == entry.gid:
                self._account_command(["groupdel", account])
            if self.delegate is not None and entry.shell == str(self.delegate.path):
                self.delegate.release_if_unused(self.host)
        logger.info("sliver=%s event=destroyed account=%s uid=%d", name, account, entry.uid)

    def is_running(self, name: str) -> bool:
        with _failures(name, "is_running"):
            entry = self.host.getpwnam(self.account_name(name))
            if entry is None:
                return False
            self._refuse_root(name, entry)
            return bool(self.host.pids_of_uid(entry.uid))

    # --- delegate accounts -----------------------------------------------------------------
    def _is_delegate(self, sliver: Sliver) -> bool:
        """True when ``sliver``'s account is a delegate account (controller + a delegate shell)."""
        if sliver.instantiation != NM_CONTROLLER:
            return False
        if self.delegate is None:
            if not self._warned_no_delegate:
                self._warned_no_delegate = True
                logger.warning("sliver=%s event=no-delegate-shell reason=%r", sliver.name,
                               "api.unix_socket is disabled: nm-controller slivers get ordinary accounts")
            return False
        return True

    def _login_shell(self, sliver: Sliver) -> str:
        if self._is_delegate(sliver):
            assert self.delegate is not None
            return str(self.delegate.path)
        return self.shell

    def _ensure_login_shell(self, sliver: Sliver, entry: PasswdEntry, delegated: bool) -> None:
        """Delegate accounts: wrapper installed, login shell, root-owned ``~/.hushlogin``. An
        account that was a delegate account and no longer is gets the ordinary shell back."""
        name, home = sliver.name, self.home_of(sliver.name)
        if delegated:
            assert self.delegate is not None
            self.delegate.install(self.host)
            self._ensure_file(home / HUSHLOGIN, b"", 0, 0, 0o644)
            if entry.shell != str(self.delegate.path):
                self._account_command(["usermod", "--shell", str(self.delegate.path), entry.name])
                logger.info("sliver=%s event=login-shell shell=%s", name, self.delegate.path)
            return
        if self.delegate is not None and entry.shell == str(self.delegate.path):
            self._account_command(["usermod", "--shell", self.shell, entry.name])
            info = self.host.stat_file(home / HUSHLOGIN)
            if info is not None and info.uid == 0:
                self.host.remove_file(home / HUSHLOGIN)
            logger.info("sliver=%s event=login-shell shell=%s", name, self.shell)
            self.delegate.release_if_unused(self.host)

    # --- parts ----------------------------------------------------------------------------
    def _account_command(self, argv: list[str], *, check: bool = True) -> CommandResult[bytes]:
        """Run a shadow command, one at a time per backend.

        Another program holding the password database's lock (an administrator's ``vipw``,
        another tool's ``useradd``) makes the shadow tools fail at once with "cannot lock";
        that is retried for a few seconds instead of failing the sliver."""
        with self._database_lock:
            for attempt in range(LOCK_RETRIES):
                result = self.host.run(argv, check=False)
                if result.returncode == 0 or b"cannot lock" not in result.stderr or attempt == LOCK_RETRIES - 1:
                    break
                self.host.sleep(LOCK_RETRY_DELAY_S * (attempt + 1))
            if check and result.returncode != 0:
                tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
                raise BackendError(f"{argv[0]} exited with status {result.returncode}: {tail or '(no stderr)'}")
            return result

    def _entry(self, name: str) -> PasswdEntry:
        account = self.account_name(name)
        entry = self.host.getpwnam(account)
        if entry is None:
            raise BackendError(f"sliver {name}: account {account!r} does not exist")
        self._refuse_root(name, entry)
        return entry

    @staticmethod
    def _refuse_root(name: str, entry: PasswdEntry) -> None:
        if entry.uid == 0:
            raise BackendError(f"sliver {name}: account {entry.name!r} has uid 0; refusing to touch it")

    def _check_home_free(self, name: str, home: Path) -> bool:
        """True when ``home`` exists already and may be reused (a leftover of a vanished account,
        the drift case); raises when it belongs to another live account or is not a directory."""
        info = self.host.stat_file(home)
        if info is None:
            return False
        if info.kind != "dir":
            raise BackendError(f"home {home} exists and is not a directory")
        owner = self.host.getpwuid(info.uid)
        if owner is not None and info.uid != 0:
            raise BackendError(f"home {home} exists and belongs to account {owner.name!r}")
        logger.warning("sliver=%s event=home-reused home=%s old_uid=%d", name, home, info.uid)
        return True

    def _undo_create(self, name: str, account: str, home: Path, home_existed: bool) -> None:
        """Remove a half-made account after a failed create; errors here are logged, not raised,
        so the original failure is what the caller sees."""
        try:
            entry = self.host.getpwnam(account)
            if entry is not None and entry.uid != 0:
                self._account_command(["userdel", account], check=False)
            group = self.host.getgrnam(account)
            if group is not None and entry is not None and group.gid == entry.gid:
                self._account_command(["groupdel", account], check=False)
            if not home_existed:
                self.host.remove_tree(home)
        except BackendError as exc:
            logger.error("sliver=%s event=create-undo-failed error=%r", name, str(exc))
        else:
            logger.warning("sliver=%s event=create-undone account=%s", name, account)

    def _remove_orphan_home(self, name: str, home: Path) -> None:
        """Remove ``home`` unless another live account owns it."""
        info = self.host.stat_file(home)
        if info is None:
            return
        owner = self.host.getpwuid(info.uid)
        if owner is not None:
            logger.warning("sliver=%s event=home-kept home=%s owner=%s", name, home, owner.name)
            return
        self.host.remove_tree(home)

    def _ensure_file(self, path: Path, data: bytes, uid: int, gid: int, mode: int) -> bool:
        """Write ``path`` unless it already is a regular file with that content, owner and mode."""
        info = self.host.stat_file(path)
        if (info is not None and info.kind == "file" and (info.uid, info.gid, info.mode) == (uid, gid, mode)
                and info.size == len(data) and self.host.read_file(path) == data):
            return False
        self.host.atomic_write(path, data, uid=uid, gid=gid, mode=mode)
        return True

    def _ensure_enabled(self, name: str, account: str, enabled: bool) -> None:
        want = (OPEN_PASSWORD, OPEN_EXPIRE) if enabled else (LOCKED_PASSWORD, LOCKED_EXPIRE)
        shadow = self.host.shadow_entry(account)
        if shadow is not None and (shadow.password, shadow.expire) == want:
            return
        self._account_command(["usermod", "--password", want[0], "--expiredate", want[1], account])
        logger.info("sliver=%s event=%s", name, "unlocked" if enabled else "locked")

    def _stop(self, name: str, uid: int) -> None:
        """Stop every process of ``uid`` (see :func:`.processes.stop_processes`)."""
        outcome = stop_processes(self.host, uid, self.stop_grace)
        if outcome is not None:
            logger.info("sliver=%s event=stopped uid=%d processes=%d kill_rounds=%d",
                        name, uid, outcome.termed, outcome.kill_rounds)


def _keys_content(name: str, keys: Sequence[str], *, restrict: bool = False) -> bytes:
    """``authorized_keys`` content: one key per line. A key spanning lines would smuggle extra
    lines (options, other keys) into the file, so such keys are dropped and logged. With
    ``restrict`` every key gets the ``restrict`` option first (delegate accounts)."""
    lines = []
    for key in keys:
        key = key.strip()
        if not key:
            continue
        if any(c in key for c in "\r\n\0"):
            logger.warning("sliver=%s event=key-dropped reason=control-characters", name)
            continue
        if restrict:
            key = f"restrict {key}" if key.startswith(_KEY_TYPE_PREFIXES) else f"restrict,{key}"
        lines.append(key)
    return "".join(line + "\n" for line in lines).encode()


@contextmanager
def _failures(name: str, action: str) -> Iterator[None]:
    """Make every ``BackendError`` leaving a public method name the sliver (same class kept)."""
    try:
        yield
    except BackendError as exc:
        if str(exc).startswith(f"sliver {name}:"):
            raise
        raise type(exc)(f"sliver {name}: {action} failed: {exc}") from exc
