"""The account backend (the default): one Linux account per sliver.

A sliver ``NAME`` of slice ``slice_id`` becomes the account ``name_prefix + NAME`` with uid
``slivers.uid_base + slice_id`` (:mod:`.uids`: the same on every node, never another slice's),
its own group with the same number, membership in the sliver group and in no other group
(:mod:`.shadow`), the GECOS marker ``nodemanager sliver``, the configured shell and the home
``home_root/ACCOUNT`` (mode 0700, owned by the account). Accounts are made with shadow's
``useradd``/``userdel``/``usermod``; every other effect goes through the
:class:`~nodemanager.host.Host` seam, whose file operations refuse links planted by the sliver.

**Disabling and keys always win** (:mod:`.access`). ``configure`` first makes the lock state right
(``*`` when enabled; ``!*`` and an expiry in 1970 when ``nm_enabled = 0``), then stops every process
of a disabled sliver, then writes the authoritative keys (``keys_dir/ACCOUNT``, root-owned, empty
when disabled), and only then touches the home (``.nodemanager/``, the initscript, a delegate's
``.hushlogin``). Each of the first steps runs even when an earlier one failed, and a failure in the
home still fails the operation (so it is retried) but cannot undo or prevent the others. The home's
``~/.ssh`` is the sliver's own: sshd does not read it for sliver accounts (:mod:`.sshdconfig`).

**Destroy** locks the account and removes its keys first (no new login while it goes), stops
every process, removes what the uid owns outside its home (:mod:`.leftovers`: shared
directories, SysV IPC, cron and at jobs), lets enforcement tear down its state, then runs
``userdel --remove``. An account already gone (an administrator's ``userdel``) still has its
enforcement state torn down, under the uid owning its home: its disk image would pin the home.

**Homes are never adopted**: a ``home_root/ACCOUNT`` that exists before ``create`` is refused
(``AccountConflict``), unless it is owned by this very slice's uid -- the leftover of the slice's own
earlier account (an account removed behind the node manager's back, or a crash between
``userdel`` and the removal of the home), which holds nothing that was not the slice's already.

Delegate accounts: with a delegate shell configured (:mod:`.delegate`), an ``nm-controller``
sliver's login shell is the generated wrapper running ``forward_api_calls`` (set by ``create``,
corrected by ``configure``; a sliver that stops being a controller gets ``shell`` back), its keys
get the ``restrict`` option, and ``~/.hushlogin`` exists, owned by root, so PAM prints no message
of the day into the XML-RPC answer. Without a delegate shell, controllers are ordinary accounts.

Ownership: the backend never decides whether an account is the node manager's; the store does.
``create`` refuses any existing account or group of that name, and any other account or group
holding the derived number (``AccountConflict``); ``destroy`` is only called for accounts the store
records as created by us. uid 0 is refused everywhere, whatever the store says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import BackendError
from ..core.records import ObservedAccount, Sliver, is_valid_name, validate_name
from ..host import Host, PasswdEntry, ensure_file
from .access import DEFAULT_KEYS_DIR, OPEN_PASSWORD, KeyFiles, access_signature, keys_content
from .delegate import SHELLS_FILE, DelegateAccounts, DelegateShell, default_forward_command, wrapper_path_for
from .hooks import AccountHooks as AccountHooks  # re-exported
from .leftovers import remove_leftovers
from .ownership import check_home_free, orphan_owner, refuse_taken, remove_orphan_home
from .processes import GRACE_POLL as GRACE_POLL  # re-exported: the stop timing lives in .processes
from .processes import KILL_PAUSE as KILL_PAUSE
from .processes import KILL_ROUNDS as KILL_ROUNDS
from .processes import stop_processes
from .shadow import DEFAULT_GROUP, AccountDatabase
from .shadow import LOCK_RETRIES as LOCK_RETRIES  # re-exported
from .sshdconfig import sshd_problems
from .uids import DEFAULT_UID_BASE, sliver_uid

if TYPE_CHECKING:
    from ..config import Config

logger = logging.getLogger(__name__)


#: GECOS of every account this backend creates; ``observe`` reports it as ``managed_marker``.
MANAGED_GECOS = "nodemanager sliver"
#: PATH given to programs started for a sliver.
SLIVER_PATH = "/usr/local/bin:/usr/bin:/bin"
#: userdel exit statuses that still mean "the account is gone".
_USERDEL_GONE = {0: "removed", 6: "already absent", 12: "removed, home left behind"}
_USERDEL_BUSY = 8
HUSHLOGIN = ".hushlogin"


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
        uid_base: int = DEFAULT_UID_BASE,
        keys_dir: Path = DEFAULT_KEYS_DIR,
        group: str = DEFAULT_GROUP,
        delegate_shell: Path | None = None,
        delegate_socket: str | None = None,
        forward_command: Sequence[str] | None = None,
        shells_file: Path = SHELLS_FILE,
        hooks: AccountHooks | None = None,
    ) -> None:
        """``uid_base``: a sliver's uid is ``uid_base + slice_id``. ``keys_dir``: the root-owned
        directory of the authoritative keys files; ``group``: the sliver group (both must match
        sshd's ``Match Group`` block). ``delegate_shell`` is where the wrapper for
        ``nm-controller`` accounts goes (None: no delegate accounts); ``delegate_socket`` the API
        socket it forwards to (default: ``api.sock`` beside the wrapper); ``forward_command`` the
        forward_api_calls argv (default: :func:`~.delegate.default_forward_command`)."""
        self.host = host
        self.home_root = Path(home_root)
        self.shell = shell
        self.name_prefix = name_prefix
        self.stop_grace = float(stop_grace)
        self.uid_base = uid_base
        self.keys = KeyFiles(host, Path(keys_dir))
        self.db = AccountDatabase(host, group)
        self.delegate_shell = Path(delegate_shell) if delegate_shell is not None else None
        self.delegate: DelegateShell | None = None
        if self.delegate_shell is not None:
            self.delegate = DelegateShell(
                self.delegate_shell,
                socket_path=delegate_socket or str(self.delegate_shell.parent / "api.sock"),
                forward_command=list(forward_command) if forward_command else default_forward_command(),
                shells_file=shells_file,
            )
        self.delegates = DelegateAccounts(self.delegate, shell)
        #: Resource enforcement's part in an account's life (cgroups at creation, disk image
        #: before anything is written in the home, stopping through cgroups, teardown before
        #: userdel); None: no enforcement.
        self.hooks = hooks

    @classmethod
    def from_config(cls, config: Config, host: Host, *, hooks: AccountHooks | None = None) -> AccountBackend:
        """Delegate accounts need the Unix socket: without ``api.unix_socket`` there are none."""
        s = config.slivers
        socket = config.api.unix_socket
        return cls(host, home_root=Path(s.home_root), shell=s.shell, name_prefix=s.name_prefix,
                   stop_grace=float(s.stop_grace), uid_base=s.uid_base, keys_dir=Path(s.keys_dir), group=s.group,
                   delegate_shell=wrapper_path_for(socket), delegate_socket=socket or None,
                   forward_command=default_forward_command(s.delegate_shell), hooks=hooks)

    # --- naming ---------------------------------------------------------------------------
    def account_name(self, name: str) -> str:
        """The Unix account of sliver ``name``; refuses names that are not valid sliver names."""
        return self.name_prefix + validate_name(name)

    def home_of(self, name: str) -> Path:
        return self.home_root / self.account_name(name)

    @property
    def keys_dir(self) -> Path:
        return self.keys.directory

    @property
    def group(self) -> str:
        return self.db.group

    def sshd_problems(self, config: Path | None = None) -> list[str]:
        """Why sshd would not read the authoritative keys of this node's sliver accounts (see
        :func:`.sshdconfig.sshd_problems`), asked for one existing member of the sliver group;
        empty when sshd is set up, or when no sliver account exists yet to ask about."""
        group = self.host.getgrnam(self.group)
        members = sorted(m for m in (group.members if group is not None else ()) if m.startswith(self.name_prefix))
        if not members:
            return []
        return sshd_problems(self.host, members[0], self.keys_dir, config=config)

    # --- Backend protocol -----------------------------------------------------------------
    def observe(self) -> dict[str, ObservedAccount]:
        """Accounts named prefix + a valid sliver name with their access signatures, from one
        pass over the password database, one read of the shadow file and one listing of the
        keys directory."""
        shadow = self.host.shadow_entries()
        stamps = self.keys.stamps()
        found: dict[str, ObservedAccount] = {}
        cut = len(self.name_prefix)
        for entry in self.host.all_users():
            if entry.name.startswith(self.name_prefix) and is_valid_name(entry.name[cut:]):
                name = entry.name[cut:]
                access = access_signature(shadow.get(entry.name), stamps.get(entry.name))
                found[name] = ObservedAccount(name, entry.uid, entry.gecos == MANAGED_GECOS, access)
        return found

    def lookup(self, name: str) -> ObservedAccount | None:
        if not is_valid_name(name):
            return None
        entry = self.host.getpwnam(self.name_prefix + name)
        if entry is None:
            return None
        return ObservedAccount(name, entry.uid, entry.gecos == MANAGED_GECOS, self._access(entry.name))

    def create(self, sliver: Sliver) -> int:
        name = sliver.name
        account = self.account_name(name)
        home = self.home_of(name)
        with _failures(name, "create"):
            uid = sliver_uid(name, sliver.slice_id, self.uid_base)
            refuse_taken(self.host, name, account, uid, sliver.slice_id)
            home_existed = check_home_free(self.host, name, home, uid)
            self.db.sliver_group()
            shell = self.delegates.login_shell(sliver)
            if self.delegate is not None and shell == str(self.delegate.path):
                self.delegate.install(self.host)
            try:
                self.db.command([
                    "useradd", "--uid", str(uid), "--user-group", "--groups", self.group, "--no-create-home",
                    "--no-log-init",
                    "--home-dir", str(home), "--comment", MANAGED_GECOS, "--shell", shell,
                    "--password", OPEN_PASSWORD, "--key", "SUB_UID_COUNT=0", "--key", "SUB_GID_COUNT=0",
                    # the user group gets the uid's number: useradd picks it from [GID_MIN, GID_MAX],
                    # which login.defs caps far below uid_base + slice_id
                    "--key", f"GID_MIN={uid}", "--key", f"GID_MAX={uid}",
                    account,
                ])
                entry = self.host.getpwnam(account)
                if entry is None:
                    raise BackendError(f"useradd succeeded but account {account!r} does not exist")
                self._refuse_root(name, entry)
                if entry.uid != uid or entry.gid != uid:
                    raise BackendError(f"useradd gave account {account!r} uid {entry.uid} gid {entry.gid}, not {uid}")
                if self.hooks is not None:
                    self.hooks.account_created(sliver, uid)
                self.db.ensure_memberships(name, account)
                self.host.makedirs_owned(home, entry.uid, entry.gid, 0o700)
                if self.hooks is not None:
                    self.hooks.home_created(sliver, entry.uid, entry.gid, home)
            except BackendError:
                self._undo_create(name, account, uid, home, home_existed)
                raise
        logger.info("sliver=%s event=created account=%s uid=%d gid=%d", name, account, entry.uid, entry.gid)
        return entry.uid

    def configure(self, sliver: Sliver, rspec: Mapping[str, int]) -> str:
        """Lock state, stop (when disabled), keys, login shell -- each attempted whatever the
        others did -- then the home. Returns the access signature."""
        name = sliver.name
        enabled = rspec.get("nm_enabled", 1) != 0
        # a lease-frozen sliver (operations.LEASE_FROZEN) is locked but neither stopped nor keyless
        open_ = enabled and not rspec.get("lease_frozen", 0)
        with _failures(name, "configure"):
            entry = self._entry(name)
            delegated = self.delegates.is_delegate(sliver)
            keys = keys_content(name, sliver.keys, restrict=delegated) if enabled else b""
            steps: list[Callable[[], object]] = [
                lambda: self.db.ensure_lock_state(name, entry.name, open_),
                lambda: self.db.ensure_memberships(name, entry.name),
            ]
            if not enabled:
                steps.append(lambda: self._stop(name, entry.uid))
            steps += [lambda: self.keys.write(entry.name, keys),
                      lambda: self.delegates.ensure_login_shell(self.host, self.db.command, sliver, entry, delegated)]
            failures: list[BackendError] = []
            for step in steps:
                try:
                    step()
                except BackendError as exc:
                    failures.append(exc)
            if failures:
                raise type(failures[0])("; ".join(str(f) for f in failures)) from failures[0]
            self._configure_home(sliver, entry, delegated)
            access = self._access(entry.name)
        logger.info("sliver=%s event=configured enabled=%d keys=%d", name, enabled, len(sliver.keys) if enabled else 0)
        return access

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
                ensure_file(self.host, script, sliver.initscript.encode(), uid=entry.uid, gid=entry.gid, mode=0o700)
                programs.append([str(script)] if sliver.initscript.startswith("#!") else ["/bin/sh", str(script)])
            start_d = nm_dir / "start.d"
            programs.extend([str(start_d / program)] for program in self.host.list_executables(start_d))
            env = {"HOME": str(home), "USER": entry.name, "LOGNAME": entry.name, "PATH": SLIVER_PATH,
                   "SHELL": self.shell}
            cgroups = self.hooks.start_cgroups(name) if self.hooks is not None and programs else []
            groups = self.db.process_groups(entry) if programs else []
            for argv in programs:
                self.host.spawn_detached(argv, uid=entry.uid, gid=entry.gid, home=home, env=env,
                                         cgroups=cgroups, groups=groups, log_path=nm_dir / "start.log")
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
            if entry is None:  # removed behind our back: what enforcement holds (the image
                self.keys.remove(account)  # mounted on the home, cgroups) goes under the home's uid
                if self.hooks is not None and (orphan := orphan_owner(self.host, home)) is not None:
                    self.hooks.before_removal(name, orphan)
                remove_orphan_home(self.host, name, home)
                logger.info("sliver=%s event=destroyed account=%s note=already-absent", name, account)
                return
            self._refuse_root(name, entry)
            self.db.ensure_lock_state(name, account, False)
            self.keys.remove(account)
            self._stop(name, entry.uid)
            remove_leftovers(self.host, name, entry.uid)
            if self.hooks is not None:  # cgroups, classes, rules, the home's disk image
                self.hooks.before_removal(name, entry.uid)
            # --remove only when the home is ours: an edited passwd entry must not aim it elsewhere.
            argv = ["userdel", "--remove", account] if entry.home == str(home) else ["userdel", account]
            result = self.db.command(argv, check=False)
            if result.returncode == _USERDEL_BUSY:
                self._stop(name, entry.uid)
                result = self.db.command(argv, check=False)
            if result.returncode not in _USERDEL_GONE:
                tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
                raise BackendError(f"userdel exited with status {result.returncode}: {tail or '(no stderr)'}")
            remove_orphan_home(self.host, name, home)
            group = self.host.getgrnam(account)
            if group is not None and group.gid == entry.gid:
                self.db.command(["groupdel", account])
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

    # --- parts ----------------------------------------------------------------------------
    def _configure_home(self, sliver: Sliver, entry: PasswdEntry, delegated: bool) -> None:
        """The part of ``configure`` inside the sliver's own tree: last, so that nothing the
        sliver did there can keep the steps that decide access from running."""
        home = self.home_of(sliver.name)
        uid, gid = entry.uid, entry.gid
        self.host.makedirs_owned(home, uid, gid, 0o700)
        nm_dir = home / ".nodemanager"
        self.host.makedirs_owned(nm_dir / "start.d", uid, gid, 0o700)
        self.host.makedirs_owned(nm_dir, uid, gid, 0o700)
        if sliver.initscript:
            ensure_file(self.host, nm_dir / "initscript", sliver.initscript.encode(), uid=uid, gid=gid, mode=0o700)
        else:
            self.host.remove_file(nm_dir / "initscript")
        if delegated:
            ensure_file(self.host, home / HUSHLOGIN, b"", uid=0, gid=0, mode=0o644)
        elif self.delegate is not None:
            info = self.host.stat_file(home / HUSHLOGIN)
            if info is not None and info.uid == 0:  # ours, from when it was a delegate account
                self.host.remove_file(home / HUSHLOGIN)

    def _access(self, account: str) -> str:
        return access_signature(self.host.shadow_entry(account), self.keys.stamp(account))

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

    def _undo_create(self, name: str, account: str, uid: int, home: Path, home_existed: bool) -> None:
        """Remove a half-made account after a failed create; errors here are logged, not raised,
        so the original failure is what the caller sees."""
        try:
            entry = self.host.getpwnam(account)
            if entry is not None and entry.uid != 0:
                if self.hooks is not None:
                    self.hooks.before_removal(name, entry.uid)
                self.keys.remove(account)
                self.db.command(["userdel", account], check=False)
            group = self.host.getgrnam(account)
            if group is not None and entry is not None and group.gid == entry.gid:
                self.db.command(["groupdel", account], check=False)
            if not home_existed:
                self.host.remove_tree(home)
        except BackendError as exc:
            logger.error("sliver=%s event=create-undo-failed error=%r", name, str(exc))
        else:
            logger.warning("sliver=%s event=create-undone account=%s uid=%d", name, account, uid)

    def _stop(self, name: str, uid: int) -> None:
        """Stop every process of the sliver: through enforcement's cgroups when it has them,
        else by pid (:func:`.processes.stop_processes`)."""
        if self.hooks is not None and self.hooks.stop_processes(name, uid, self.stop_grace):
            logger.info("sliver=%s event=stopped uid=%d how=cgroup", name, uid)
            return
        outcome = stop_processes(self.host, uid, self.stop_grace)
        if outcome is not None:
            logger.info("sliver=%s event=stopped uid=%d processes=%d kill_rounds=%d",
                        name, uid, outcome.termed, outcome.kill_rounds)


@contextmanager
def _failures(name: str, action: str) -> Iterator[None]:
    """Make every ``BackendError`` leaving a public method name the sliver (same class kept)."""
    try:
        yield
    except BackendError as exc:
        if str(exc).startswith(f"sliver {name}:"):
            raise
        raise type(exc)(f"sliver {name}: {action} failed: {exc}") from exc
