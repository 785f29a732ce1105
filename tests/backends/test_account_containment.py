"""AccountBackend containment rules against FakeHost: derived uids, access first, the access
signature, explicit groups, leftovers on destroy, the sshd check, hooks.

Each test states the promise it holds; the same promises are tried against real accounts in
``tests/integration/test_hostile_sliver.py``.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest

from nodemanager.backends import leftovers
from nodemanager.backends.account import AccountBackend
from nodemanager.backends.sshdconfig import PROBLEM_PREFIX, match_block, sshd_problems
from nodemanager.config import parse_config
from nodemanager.core.errors import AccountConflict, BackendError
from nodemanager.core.records import PLC_INSTANTIATED, Sliver
from nodemanager.host import CommandResult, GroupEntry
from nodemanager.testing.fakehost import FakeHost

HOME_ROOT = Path("/srv/homes")
KEYS_DIR = Path("/etc/nm-keys")
BASE = 100000
KEYS = ("ssh-ed25519 AAAA one@x",)


def make_sliver(name: str = "pl_test", slice_id: int = 7, **changes: object) -> Sliver:
    fields: dict[str, object] = dict(name=name, slice_id=slice_id, instantiation=PLC_INSTANTIATED,
                                     expires=2**31 - 1, timestamp=1, keys=KEYS)
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


class RecordingHooks:
    """AccountHooks that record their calls; ``cgroups`` decides what stop_processes answers."""

    def __init__(self, host: FakeHost, *, cgroups: bool = True) -> None:
        self.host = host
        self.cgroups = cgroups
        self.calls: list[tuple[object, ...]] = []

    def _mark(self, *call: object) -> None:
        self.calls.append(call)
        self.host.calls.append(("hook", *call))

    def account_created(self, sliver: Sliver, uid: int) -> None:
        self._mark("account_created", sliver.name, uid)

    def home_created(self, sliver: Sliver, uid: int, gid: int, home: Path) -> None:
        self._mark("home_created", sliver.name, uid)

    def stop_processes(self, name: str, uid: int, grace: float) -> bool:
        self._mark("stop_processes", name, uid)
        if self.cgroups:
            for pid in [p for p, owner in self.host.processes.items() if owner == uid]:
                del self.host.processes[pid]
        return self.cgroups

    def start_cgroups(self, name: str) -> list[Path]:
        return []

    def before_removal(self, name: str, uid: int) -> None:
        self._mark("before_removal", name, uid)


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def backend(host: FakeHost) -> AccountBackend:
    return AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", name_prefix="nm", stop_grace=5.0,
                          uid_base=BASE, keys_dir=KEYS_DIR)


def order(host: FakeHost, *predicates: object) -> list[int]:
    """Index in ``host.calls`` of the first call matching each predicate (a callable on the call)."""
    found = []
    for predicate in predicates:
        assert callable(predicate)
        found.append(next(i for i, call in enumerate(host.calls) if predicate(call)))
    return found


def usermod(call: tuple[object, ...]) -> bool:
    return call[0] == "run" and isinstance(call[1], tuple) and call[1][0] == "usermod"


# --- uids ---------------------------------------------------------------------------------------

def test_uid_is_uid_base_plus_slice_id_with_the_same_gid(backend: AccountBackend, host: FakeHost) -> None:
    assert backend.create(make_sliver()) == BASE + 7
    [argv] = host.commands_named("useradd")
    assert argv[argv.index("--uid") + 1] == str(BASE + 7)
    assert host.users["nmpl_test"].gid == BASE + 7


def test_from_config_takes_uid_base_keys_dir_and_group(host: FakeHost) -> None:
    config = parse_config({"slivers": {"uid_base": 5000, "keys_dir": "/k", "group": "slv"}})
    backend = AccountBackend.from_config(config, host)
    assert (backend.uid_base, backend.keys_dir, backend.group) == (5000, Path("/k"), "slv")


@pytest.mark.parametrize("taken_by", ["account", "group"])
def test_a_number_held_by_another_account_or_group_is_refused(backend: AccountBackend, host: FakeHost,
                                                              taken_by: str) -> None:
    if taken_by == "account":
        host.add_user("someone", uid=BASE + 7)
        del host.groups["someone"]
    else:
        host.groups["somegroup"] = GroupEntry("somegroup", BASE + 7)
    with pytest.raises(AccountConflict,
                       match=rf"sliver pl_test: its uid {BASE + 7} .*(account 'someone'|group 'somegroup')"):
        backend.create(make_sliver())
    assert host.commands_named("useradd") == []


@pytest.mark.parametrize(("base", "slice_id", "why"), [
    (BASE, -1, "negative"), (500, 7, "outside"), (2**31 - 5, 9, "outside"), (65000, 534, "reserved"),
    (65000, 535, "reserved"),
])
def test_uids_outside_the_sliver_range_are_refused(host: FakeHost, base: int, slice_id: int, why: str) -> None:
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", uid_base=base, keys_dir=KEYS_DIR)
    with pytest.raises(BackendError, match=rf"sliver pl_test: .*{why}"):
        backend.create(make_sliver(slice_id=slice_id))
    assert host.commands_named("useradd") == []


# --- groups -------------------------------------------------------------------------------------

def test_the_sliver_group_is_made_once_and_is_the_only_supplementary_group(backend: AccountBackend,
                                                                            host: FakeHost) -> None:
    backend.create(make_sliver())
    backend.create(make_sliver("pl_two", slice_id=8))
    assert host.commands_named("groupadd") == [["groupadd", "--system", "slivers"]]
    [first, _] = host.commands_named("useradd")
    assert first[first.index("--groups") + 1] == "slivers"
    assert set(host.groups["slivers"].members) == {"nmpl_test", "nmpl_two"}


def test_a_stale_group_membership_is_never_granted(backend: AccountBackend, host: FakeHost,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    host.groups["disk"] = GroupEntry("disk", 6, ("alice", "nmpl_test"))  # listed before the account exists
    backend.create(make_sliver())
    assert "nmpl_test" not in host.groups["disk"].members and "alice" in host.groups["disk"].members
    assert host.commands_named("usermod")[-1] == ["usermod", "--groups", "slivers", "nmpl_test"]
    assert "event=stale-groups-removed" in caplog.text and "groups=disk" in caplog.text
    host.groups["disk"] = GroupEntry("disk", 6, ("nmpl_test",))  # added again later: configure removes it
    backend.configure(make_sliver(), {})
    assert host.groups["disk"].members == ()


def test_programs_start_with_exactly_the_own_and_sliver_groups(backend: AccountBackend, host: FakeHost) -> None:
    backend.create(make_sliver())
    host.groups["disk"] = GroupEntry("disk", 6, ("nmpl_test",))
    backend.start(make_sliver(initscript="sleep 1"))
    [spawned] = host.spawned
    assert spawned.groups == (BASE + 7, host.groups["slivers"].gid)


# --- access first --------------------------------------------------------------------------------

def test_disabling_locks_then_stops_then_empties_keys_before_the_home(backend: AccountBackend,
                                                                      host: FakeHost) -> None:
    uid = backend.create(make_sliver())
    backend.configure(make_sliver(), {})
    pid = host.add_process(uid)
    host.calls.clear()
    backend.configure(make_sliver(initscript="echo x"), {"nm_enabled": 0})
    lock, stop, keys, home = order(
        host, usermod,
        lambda c: c[0] == "kill" and c[1] == pid,
        lambda c: c[0] == "atomic_write" and c[1] == KEYS_DIR / "nmpl_test",
        lambda c: c[0] == "makedirs_owned" and c[1] == HOME_ROOT / "nmpl_test",
    )
    assert lock < stop < keys < home
    assert host.files[KEYS_DIR / "nmpl_test"].data == b"" and pid not in host.processes
    assert (host.shadow["nmpl_test"].password, host.shadow["nmpl_test"].expire) == ("!*", "1")


class SabotagedHome(FakeHost):
    """A home the sliver made unusable for root: every directory operation in it fails."""

    sabotaged = False

    def makedirs_owned(self, path: Path, uid: int, gid: int, mode: int) -> None:
        if self.sabotaged and HOME_ROOT in Path(path).parents:
            raise BackendError(f"cannot make directory {path}: Not a directory")
        super().makedirs_owned(path, uid, gid, mode)


@pytest.mark.parametrize("broken", ["home", "usermod", "atomic_write"])
def test_a_failing_step_never_prevents_the_others(broken: str) -> None:
    """A sabotaged home (or a failing lock or key write) fails the operation, so it is retried,
    but every other step that decides access still happens."""
    host = SabotagedHome()
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", uid_base=BASE, keys_dir=KEYS_DIR)
    uid = backend.create(make_sliver())
    backend.configure(make_sliver(), {})
    pid = host.add_process(uid)
    if broken == "home":
        host.sabotaged = True
    else:
        host.fail_next(broken, times=20 if broken == "usermod" else 1)
    with pytest.raises(BackendError, match="sliver pl_test: configure failed"):
        backend.configure(make_sliver(), {"nm_enabled": 0})
    assert pid not in host.processes
    if broken != "atomic_write":
        assert host.files[KEYS_DIR / "pl_test"].data == b""
    if broken != "usermod":
        assert host.shadow["pl_test"].password == "!*"


def test_the_stop_hook_is_used_and_the_pid_loop_is_the_fallback(host: FakeHost) -> None:
    for cgroups in (True, False):
        fake = FakeHost()
        hooks = RecordingHooks(fake, cgroups=cgroups)
        backend = AccountBackend(fake, home_root=HOME_ROOT, shell="/bin/sh", uid_base=BASE, keys_dir=KEYS_DIR,
                                 hooks=hooks)
        uid = backend.create(make_sliver())
        pid = fake.add_process(uid)
        backend.stop("pl_test")
        assert ("stop_processes", "pl_test", uid) in hooks.calls
        assert pid not in fake.processes
        assert bool(fake.method_calls("kill")) is (not cgroups)


def test_account_created_comes_right_after_useradd(host: FakeHost) -> None:
    hooks = RecordingHooks(host)
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", uid_base=BASE, keys_dir=KEYS_DIR,
                             hooks=hooks)
    backend.create(make_sliver())
    useradd, created, home, home_hook = order(
        host, lambda c: c[0] == "run" and c[1][0] == "useradd", lambda c: c[:2] == ("hook", "account_created"),
        lambda c: c[0] == "makedirs_owned", lambda c: c[:2] == ("hook", "home_created"))
    assert useradd < created < home < home_hook
    assert [c for c in host.calls[useradd + 1:created] if c[0] in ("makedirs_owned", "atomic_write")] == []


# --- the access signature ------------------------------------------------------------------------

def test_the_signature_follows_lock_state_and_keys_file_and_nothing_else(backend: AccountBackend,
                                                                          host: FakeHost) -> None:
    backend.create(make_sliver())
    first = backend.configure(make_sliver(), {})
    assert first and backend.configure(make_sliver(initscript="echo other"), {}) == first
    assert backend.observe()["pl_test"].access == first
    host.add_file(KEYS_DIR / "nmpl_test", KEYS[0].encode() + b"\n")  # the same content, rewritten behind our back
    behind = backend.observe()["pl_test"].access
    assert behind != first
    repaired = backend.configure(make_sliver(), {})
    assert repaired == behind  # identical content: left alone, the new stamp is the applied one
    host.shadow["nmpl_test"] = host.shadow["nmpl_test"].__class__("nmpl_test", "$6$hash", "")
    assert backend.observe()["pl_test"].access != repaired
    locked = backend.configure(make_sliver(), {"nm_enabled": 0})
    assert locked not in (first, repaired) and backend.observe()["pl_test"].access == locked


def test_observe_is_one_pass_over_each_database(backend: AccountBackend, host: FakeHost) -> None:
    for i in range(5):
        backend.create(make_sliver(f"pl_s{i}", slice_id=10 + i))
        backend.configure(make_sliver(f"pl_s{i}", slice_id=10 + i), {})
    host.calls.clear()
    observed = backend.observe()
    assert len(observed) == 5 and all(o.access for o in observed.values())
    assert sorted(c[0] for c in host.calls) == ["all_users", "file_stamps", "shadow_entries"]


# --- destroy ---------------------------------------------------------------------------------------

def test_destroy_locks_drops_keys_stops_and_removes_leftovers_before_userdel(host: FakeHost) -> None:
    hooks = RecordingHooks(host, cgroups=False)
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", name_prefix="nm", uid_base=BASE,
                             keys_dir=KEYS_DIR, hooks=hooks)
    uid = backend.create(make_sliver())
    backend.configure(make_sliver(), {})
    pid = host.add_process(uid)
    host.add_file(Path("/tmp/sliver-file"), b"x", uid=uid, gid=uid)
    host.add_file(Path("/tmp/other-file"), b"x", uid=4242, gid=4242)
    host.add_file(Path("/var/spool/cron/crontabs/nmpl_test"), b"* * * * * true\n", uid=uid, gid=uid)
    host.add_file(leftovers.SYSVIPC / "shm", b"key shmid perms size cpid lpid nattch uid gid cuid cgid\n"
                  b"0 17 600 4096 1 1 0 4242 4242 " + str(uid).encode() + b" 1\n0 18 600 1 1 1 0 4242 4242 4242 1\n")
    host.dirs[Path("/tmp")] = (0, 0, 0o1777)
    host.calls.clear()
    backend.destroy("pl_test")
    lock, keys, kill, tmp, ipc, removal, userdel = order(
        host, usermod, lambda c: c == ("remove_file", KEYS_DIR / "nmpl_test"), lambda c: c[:2] == ("kill", pid),
        lambda c: c[:2] == ("remove_owned", Path("/tmp")), lambda c: c[0] == "run" and c[1][0] == "ipcrm",
        lambda c: c[:2] == ("hook", "before_removal"), lambda c: c[0] == "run" and c[1][0] == "userdel")
    assert lock < keys < kill < tmp < ipc < removal < userdel
    assert host.commands_named("ipcrm") == [["ipcrm", "-m", "17"]]
    assert Path("/tmp/sliver-file") not in host.files and Path("/tmp/other-file") in host.files
    assert Path("/var/spool/cron/crontabs/nmpl_test") not in host.files
    assert KEYS_DIR / "nmpl_test" not in host.files


def test_an_orphan_home_owned_by_root_is_kept(backend: AccountBackend, host: FakeHost) -> None:
    host.dirs[HOME_ROOT / "nmpl_gone"] = (0, 0, 0o755)
    backend.destroy("pl_gone")
    assert HOME_ROOT / "nmpl_gone" in host.dirs


def test_shared_directories_are_the_world_writable_local_ones(host: FakeHost) -> None:
    host.mount_table = [("/", "ext4"), ("/dev/shm", "tmpfs"), ("/dev/mqueue", "mqueue"), ("/srv/scratch", "nfs4"),
                        ("/data", "xfs")]
    for path, mode in [("/tmp", 0o1777), ("/var/tmp", 0o1777), ("/dev/shm", 0o1777), ("/dev/mqueue", 0o1777),
                       ("/srv/scratch", 0o1777), ("/data", 0o1777), ("/var/crash", 0o1777), ("/var/log", 0o755),
                       ("/run/lock", 0o1777), ("/srv", 0o755)]:
        host.dirs[Path(path)] = (0, 0, mode)
    found = leftovers.shared_directories(host)
    assert set(found) == {Path(p) for p in ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/data", "/var/crash",
                                            "/run/lock")}
    assert Path("/srv/scratch") not in found  # network filesystem: not this node's to clean


# --- the sshd check ---------------------------------------------------------------------------------

class SshdHost(FakeHost):
    """FakeHost whose ``sshd -T`` prints ``settings`` (or is missing)."""

    def __init__(self, settings: dict[str, str] | None) -> None:
        super().__init__()
        self.settings = settings

    def run(self, argv: Collection[str], **kwargs: object) -> CommandResult[bytes]:  # type: ignore[override]
        args = [str(a) for a in argv]
        if args[0].endswith("sshd"):
            self.commands.append(args)
            if self.settings is None:
                raise BackendError(f"cannot run {args[0]}: No such file or directory")
            out = "".join(f"{k} {v}\n" for k, v in self.settings.items()).encode()
            return CommandResult(args, 0, out, b"")
        return super().run(argv, **kwargs)  # type: ignore[arg-type]


GOOD = {"pubkeyauthentication": "yes", "authorizedkeysfile": f"{KEYS_DIR}/%u", "authorizedkeyscommand": "none",
        "hostbasedauthentication": "no", "ignorerhosts": "yes"}


def test_sshd_problems_compare_the_effective_settings() -> None:
    assert sshd_problems(SshdHost(GOOD), "nmpl_test", KEYS_DIR) == []
    stock = dict(GOOD, authorizedkeysfile=".ssh/authorized_keys .ssh/authorized_keys2")
    [problem] = sshd_problems(SshdHost(stock), "nmpl_test", KEYS_DIR)
    assert problem.startswith(PROBLEM_PREFIX) and ".ssh/authorized_keys2" in problem
    command = dict(GOOD, authorizedkeyscommand="/usr/bin/keys %u")
    assert "authorizedkeyscommand" in sshd_problems(SshdHost(command), "nmpl_test", KEYS_DIR)[0]
    [missing] = sshd_problems(SshdHost(None), "nmpl_test", KEYS_DIR)
    assert missing.startswith(PROBLEM_PREFIX) and "install openssh-server" in missing
    host = SshdHost(GOOD)
    sshd_problems(host, "nmpl_test", KEYS_DIR, config=Path("/x/sshd_config"))
    assert host.commands[-1] == ["/usr/sbin/sshd", "-f", "/x/sshd_config", "-T", "-C",
                                 "user=nmpl_test,host=localhost,addr=127.0.0.1"]


def test_the_backend_asks_sshd_about_one_of_its_sliver_accounts() -> None:
    host = SshdHost(GOOD)
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", name_prefix="nm", uid_base=BASE,
                             keys_dir=KEYS_DIR)
    assert backend.sshd_problems() == [] and host.commands == []  # no sliver account yet: nothing to ask
    backend.create(make_sliver())
    assert backend.sshd_problems() == []
    assert host.commands[-1][-1] == "user=nmpl_test,host=localhost,addr=127.0.0.1"


def test_the_packaged_sshd_settings_are_the_match_block_of_the_defaults() -> None:
    packaged = Path(__file__).parents[2] / "packaging" / "sshd_config.d" / "nodemanager.conf"
    assert packaged.read_text() == match_block(Path("/etc/nodemanager/authorized_keys"), "slivers")

