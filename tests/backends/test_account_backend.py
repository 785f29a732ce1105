"""AccountBackend logic against FakeHost: argv shapes, ownership rules, undo on failure, stop loop."""

from __future__ import annotations

import logging
import signal
import zlib
from pathlib import Path

import pytest

from nodemanager.backends import delegate as delegate_module
from nodemanager.backends.account import (
    KILL_ROUNDS,
    LOCK_RETRIES,
    MANAGED_GECOS,
    AccountBackend,
)
from nodemanager.config import parse_config
from nodemanager.core.errors import AccountConflict, BackendError, InvalidName
from nodemanager.core.records import NM_CONTROLLER, PLC_INSTANTIATED, Sliver
from nodemanager.host import PasswdEntry
from nodemanager.testing.fakehost import FakeFile, FakeHost, ShellAwareFakeHost

HOME_ROOT = Path("/srv/homes")
KEYS_DIR = Path("/etc/nm-keys")
KEYS = ("ssh-ed25519 AAAA one@x", "ssh-rsa BBBB two@x")


def make_sliver(name: str = "pl_test", **changes: object) -> Sliver:
    slice_id = 7 if name == "pl_test" else 1000 + zlib.crc32(name.encode()) % 100000  # one slice per name
    fields: dict[str, object] = dict(name=name, slice_id=slice_id, instantiation=PLC_INSTANTIATED, expires=2**31 - 1,
                                     timestamp=1, keys=KEYS)
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def backend(host: FakeHost) -> AccountBackend:
    return AccountBackend(host, home_root=HOME_ROOT, shell="/bin/bash", name_prefix="nm", stop_grace=5.0,
                          keys_dir=KEYS_DIR)


@pytest.fixture
def created(backend: AccountBackend, host: FakeHost) -> int:
    uid = backend.create(make_sliver())
    host.calls.clear()
    host.commands.clear()
    return uid


def test_from_config_takes_the_slivers_section(host: FakeHost) -> None:
    config = parse_config({"slivers": {"home_root": "/h", "shell": "/bin/sh", "name_prefix": "ab", "stop_grace": 3}})
    backend = AccountBackend.from_config(config, host)
    assert (backend.home_root, backend.shell, backend.name_prefix, backend.stop_grace) == (Path("/h"), "/bin/sh", "ab", 3.0)
    assert backend.kind == "account"


def test_create_runs_useradd_with_marker_shell_home_and_star_password(backend: AccountBackend, host: FakeHost) -> None:
    uid = backend.create(make_sliver())
    [argv] = host.commands_named("useradd")
    assert argv[-1] == "nmpl_test"
    assert argv[argv.index("--comment") + 1] == MANAGED_GECOS
    assert argv[argv.index("--shell") + 1] == "/bin/bash"
    assert argv[argv.index("--home-dir") + 1] == str(HOME_ROOT / "nmpl_test")
    assert argv[argv.index("--password") + 1] == "*"
    assert "--user-group" in argv and "--no-create-home" in argv
    entry = host.users["nmpl_test"]
    assert uid == entry.uid
    assert host.dirs[HOME_ROOT / "nmpl_test"] == (entry.uid, entry.gid, 0o700)


def test_create_refuses_an_existing_user_and_leaves_it_alone(backend: AccountBackend, host: FakeHost) -> None:
    before = host.add_user("nmpl_test", gecos="Alice")
    with pytest.raises(AccountConflict, match=r"nmpl_test.*not created by the node manager"):
        backend.create(make_sliver())
    assert host.commands == []
    assert host.users["nmpl_test"] == before


def test_create_refuses_an_existing_group(backend: AccountBackend, host: FakeHost) -> None:
    host.groups["nmpl_test"] = host.groups["root"].__class__("nmpl_test", 4242)
    with pytest.raises(AccountConflict, match="group 'nmpl_test'"):
        backend.create(make_sliver())
    assert host.commands_named("useradd") == []


def test_create_undoes_the_account_when_the_home_cannot_be_made(backend: AccountBackend, host: FakeHost) -> None:
    host.fail_next("makedirs_owned")
    with pytest.raises(BackendError, match="sliver pl_test: create failed"):
        backend.create(make_sliver())
    assert host.commands_named("userdel") == [["userdel", "nmpl_test"]]
    assert "nmpl_test" not in host.users and "nmpl_test" not in host.groups
    assert HOME_ROOT / "nmpl_test" not in host.dirs


def test_create_failure_of_useradd_names_the_sliver(backend: AccountBackend, host: FakeHost) -> None:
    host.fail_next("useradd", returncode=3, stderr="useradd: invalid user name")
    with pytest.raises(BackendError, match=r"sliver pl_test: .*invalid user name") as info:
        backend.create(make_sliver())
    assert not isinstance(info.value, AccountConflict)
    assert host.commands_named("userdel") == []


def test_create_refuses_a_home_of_another_account(backend: AccountBackend, host: FakeHost) -> None:
    other = host.add_user("bob")
    host.dirs[HOME_ROOT / "nmpl_test"] = (other.uid, other.gid, 0o755)
    with pytest.raises(BackendError, match="belongs to account 'bob'"):
        backend.create(make_sliver())
    assert host.commands_named("useradd") == []


def test_create_reuses_a_leftover_home_of_this_slices_own_uid(backend: AccountBackend, host: FakeHost) -> None:
    host.dirs[HOME_ROOT / "nmpl_test"] = (100007, 100007, 0o755)
    uid = backend.create(make_sliver())
    assert uid == 100007 and host.dirs[HOME_ROOT / "nmpl_test"] == (uid, uid, 0o700)


@pytest.mark.parametrize("owner", [0, 31337], ids=["root", "vanished-other-uid"])
def test_a_home_made_before_its_account_is_never_adopted(backend: AccountBackend, host: FakeHost, owner: int) -> None:
    host.dirs[HOME_ROOT / "nmpl_test"] = (owner, owner, 0o755)
    host.add_file(HOME_ROOT / "nmpl_test" / "inside", b"x", uid=owner, gid=owner)
    with pytest.raises(AccountConflict,
                       match=r"sliver pl_test: home .* belongs to (account 'root'|uid 31337).*never adopted"):
        backend.create(make_sliver())
    assert host.commands_named("useradd") == []
    assert host.dirs[HOME_ROOT / "nmpl_test"] == (owner, owner, 0o755)
    assert host.files[HOME_ROOT / "nmpl_test" / "inside"].uid == owner


def test_invalid_names_never_reach_a_command(backend: AccountBackend, host: FakeHost) -> None:
    with pytest.raises(InvalidName):
        backend.create(make_sliver("-rf"))
    with pytest.raises(InvalidName):
        backend.destroy("../etc")
    assert host.commands == []


def test_observe_lists_prefixed_valid_names_with_marker(backend: AccountBackend, host: FakeHost, created: int) -> None:
    host.add_user("nmpl_foreign", gecos="someone")
    host.add_user("pl_unprefixed")
    host.add_user("nmroot")  # "root" is not a valid sliver name
    observed = backend.observe()
    assert set(observed) == {"pl_test", "pl_foreign"}
    assert observed["pl_test"].managed_marker and observed["pl_test"].uid == created
    assert not observed["pl_foreign"].managed_marker
    assert sorted(call[0] for call in host.calls) == ["all_users", "file_stamps", "shadow_entries"]
    assert backend.lookup("pl_test") == observed["pl_test"]
    assert backend.lookup("pl_none") is None


def test_configure_writes_keys_initscript_and_dirs(backend: AccountBackend, host: FakeHost, created: int) -> None:
    backend.configure(make_sliver(initscript="#!/bin/sh\necho hi\n"), {"nm_enabled": 1})
    home = HOME_ROOT / "nmpl_test"
    keys = host.files[KEYS_DIR / "nmpl_test"]
    assert keys.data == b"ssh-ed25519 AAAA one@x\nssh-rsa BBBB two@x\n"
    assert (keys.uid, keys.gid, keys.mode) == (0, 0, 0o644)
    assert host.dirs[KEYS_DIR] == (0, 0, 0o755)
    assert home / ".ssh" not in host.dirs and not [p for p in host.files if home / ".ssh" in p.parents]
    assert host.dirs[home / ".nodemanager" / "start.d"] == (created, created, 0o700)
    script = host.files[home / ".nodemanager" / "initscript"]
    assert (script.data, script.mode, script.uid) == (b"#!/bin/sh\necho hi\n", 0o700, created)
    assert host.commands == []  # already unlocked with '*': no usermod


def test_configure_twice_writes_nothing_the_second_time(backend: AccountBackend, host: FakeHost, created: int) -> None:
    sliver = make_sliver(initscript="echo hi")
    backend.configure(sliver, {})
    writes = len(host.method_calls("atomic_write"))
    backend.configure(sliver, {})
    assert writes == 2
    assert len(host.method_calls("atomic_write")) == writes
    assert host.commands == []


def test_configure_rewrites_keys_with_wrong_mode(backend: AccountBackend, host: FakeHost, created: int) -> None:
    sliver = make_sliver()
    backend.configure(sliver, {})
    path = KEYS_DIR / "nmpl_test"
    host.files[path] = host.files[path].__class__(host.files[path].data, created, created, 0o666)
    backend.configure(sliver, {})
    assert (host.files[path].mode, host.files[path].uid) == (0o644, 0)


def test_configure_removes_the_initscript_when_empty(backend: AccountBackend, host: FakeHost, created: int) -> None:
    backend.configure(make_sliver(initscript="echo hi"), {})
    backend.configure(make_sliver(initscript=""), {})
    assert HOME_ROOT / "nmpl_test" / ".nodemanager" / "initscript" not in host.files


def test_keys_with_line_breaks_are_dropped(backend: AccountBackend, host: FakeHost, created: int,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        backend.configure(make_sliver(keys=("ssh-rsa GOOD a@b", "ssh-rsa X\ncommand=\"sh\" ssh-rsa Y", "  ")), {})
    data = host.files[KEYS_DIR / "nmpl_test"].data
    assert data == b"ssh-rsa GOOD a@b\n"
    assert "sliver=pl_test event=key-dropped" in caplog.text


def test_disable_empties_keys_locks_and_stops(backend: AccountBackend, host: FakeHost, created: int) -> None:
    pid = host.add_process(created)
    backend.configure(make_sliver(), {"nm_enabled": 0})
    assert host.files[KEYS_DIR / "nmpl_test"].data == b""
    assert host.commands_named("usermod") == [["usermod", "--password", "!*", "--expiredate", "1", "nmpl_test"]]
    assert pid not in host.processes
    backend.configure(make_sliver(), {"nm_enabled": 0})
    assert len(host.commands_named("usermod")) == 1
    backend.configure(make_sliver(), {"nm_enabled": 1})
    assert host.commands_named("usermod")[-1] == ["usermod", "--password", "*", "--expiredate", "", "nmpl_test"]
    assert host.shadow["nmpl_test"].password == "*"


def test_configure_of_missing_account_fails_naming_the_sliver(backend: AccountBackend) -> None:
    with pytest.raises(BackendError, match=r"sliver pl_gone: .*'nmpl_gone' does not exist"):
        backend.configure(make_sliver("pl_gone"), {})


def test_start_spawns_initscript_then_start_d_in_order(backend: AccountBackend, host: FakeHost, created: int) -> None:
    home = HOME_ROOT / "nmpl_test"
    start_d = home / ".nodemanager" / "start.d"
    host.atomic_write(start_d / "20-b", b"#!/bin/sh\n", uid=created, gid=created, mode=0o755)
    host.atomic_write(start_d / "10-a", b"#!/bin/sh\n", uid=created, gid=created, mode=0o755)
    host.atomic_write(start_d / "05-notes", b"text", uid=created, gid=created, mode=0o644)
    backend.start(make_sliver(initscript="echo no shebang"))
    argvs = [s.argv for s in host.spawned]
    assert argvs == [
        ("/bin/sh", str(home / ".nodemanager" / "initscript")),
        (str(start_d / "10-a"),),
        (str(start_d / "20-b"),),
    ]
    first = host.spawned[0]
    assert (first.uid, first.gid, first.home) == (created, created, home)
    assert first.log_path == home / ".nodemanager" / "start.log"
    assert first.env == {"HOME": str(home), "USER": "nmpl_test", "LOGNAME": "nmpl_test",
                         "PATH": "/usr/local/bin:/usr/bin:/bin", "SHELL": "/bin/bash"}


def test_start_runs_a_shebang_initscript_directly(backend: AccountBackend, host: FakeHost, created: int) -> None:
    backend.start(make_sliver(initscript="#!/bin/sh\nsleep 1\n"))
    assert [s.argv for s in host.spawned] == [(str(HOME_ROOT / "nmpl_test" / ".nodemanager" / "initscript"),)]


def test_start_of_a_disabled_sliver_spawns_nothing(backend: AccountBackend, host: FakeHost, created: int) -> None:
    backend.configure(make_sliver(initscript="sleep 100"), {"nm_enabled": 0})
    backend.start(make_sliver(initscript="sleep 100"))
    assert host.spawned == []


def test_stop_terms_then_kills_stubborn_processes(backend: AccountBackend, host: FakeHost, created: int) -> None:
    polite = host.add_process(created)
    stubborn = host.add_process(created)
    host.ignore_term.add(stubborn)
    bystander = host.add_process(4242)
    start = host.monotonic()
    backend.stop("pl_test")
    assert host.processes == {bystander: 4242}
    assert ("kill", polite, signal.SIGTERM) in host.calls
    assert ("kill", stubborn, signal.SIGKILL) in host.calls
    assert ("kill", polite, signal.SIGKILL) not in host.calls
    assert host.monotonic() - start >= 5.0  # waited the grace period before SIGKILL


def test_stop_without_processes_waits_for_nothing(backend: AccountBackend, host: FakeHost, created: int) -> None:
    backend.stop("pl_test")
    assert host.method_calls("kill") == [] and host.method_calls("sleep") == []


def test_stop_gives_up_after_bounded_kill_rounds(backend: AccountBackend, host: FakeHost, created: int) -> None:
    host.immortal.add(host.add_process(created))
    with pytest.raises(BackendError, match=rf"sliver pl_test: stop failed: .*survived {KILL_ROUNDS} rounds"):
        backend.stop("pl_test")
    assert len([c for c in host.method_calls("kill") if c[2] == signal.SIGKILL]) == KILL_ROUNDS


def test_uid_zero_is_never_signalled_or_removed(backend: AccountBackend, host: FakeHost) -> None:
    host.add_user("nmpl_evil", uid=0)
    host.add_process(0)
    for operation in (backend.stop, backend.destroy, backend.is_running):
        with pytest.raises(BackendError, match="uid 0"):
            operation("pl_evil")
    assert host.method_calls("kill") == [] and host.commands == []


def test_destroy_stops_then_userdel_remove(backend: AccountBackend, host: FakeHost, created: int) -> None:
    host.add_process(created)
    backend.configure(make_sliver(), {})
    backend.destroy("pl_test")
    assert host.commands_named("userdel") == [["userdel", "--remove", "nmpl_test"]]
    kills = [i for i, c in enumerate(host.calls) if c[0] == "kill"]
    userdel = host.calls.index(("run", ("userdel", "--remove", "nmpl_test")))
    assert kills and max(kills) < userdel
    assert "nmpl_test" not in host.users and "nmpl_test" not in host.groups
    assert not [p for p in host.files if HOME_ROOT / "nmpl_test" in p.parents]
    assert host.processes == {}


def test_destroy_of_absent_account_succeeds(backend: AccountBackend, host: FakeHost) -> None:
    backend.destroy("pl_never")
    assert host.commands == []


class LeakyUserdelHost(FakeHost):
    """userdel that removes the user only, leaving its group and home, with status 12."""

    def _effect(self, args: list[str]) -> tuple[int, str]:
        if args[0] == "userdel":
            self.users.pop(args[-1])
            return 12, "userdel: home directory not removed"
        return super()._effect(args)


def test_destroy_removes_leftover_group_and_home() -> None:
    host = LeakyUserdelHost()
    backend = AccountBackend(host, home_root=HOME_ROOT, shell="/bin/sh", name_prefix="nm", keys_dir=KEYS_DIR)
    backend.create(make_sliver())
    backend.configure(make_sliver(), {})
    backend.destroy("pl_test")
    assert ["groupdel", "nmpl_test"] in host.commands
    assert "nmpl_test" not in host.groups
    assert ("remove_tree", HOME_ROOT / "nmpl_test") in host.calls
    assert not [p for p in [*host.dirs, *host.files] if p == HOME_ROOT / "nmpl_test" or HOME_ROOT / "nmpl_test" in p.parents]


def test_destroy_does_not_use_remove_for_a_home_elsewhere(backend: AccountBackend, host: FakeHost, created: int) -> None:
    entry = host.users["nmpl_test"]
    host.users["nmpl_test"] = entry.__class__(entry.name, entry.uid, entry.gid, entry.gecos, "/etc", entry.shell)
    backend.destroy("pl_test")
    assert host.commands_named("userdel") == [["userdel", "nmpl_test"]]


def test_destroy_failure_names_the_sliver(backend: AccountBackend, host: FakeHost, created: int) -> None:
    host.fail_next("userdel", returncode=10, stderr="cannot lock /etc/passwd", times=LOCK_RETRIES)
    with pytest.raises(BackendError, match=r"sliver pl_test: destroy failed: userdel exited with status 10"):
        backend.destroy("pl_test")


def test_a_briefly_locked_password_database_is_retried(
    backend: AccountBackend, host: FakeHost, created: int
) -> None:
    host.fail_next("userdel", returncode=10, stderr="userdel: cannot lock /etc/passwd; try again later.", times=2)
    backend.destroy("pl_test")
    assert host.getpwnam("pl_test") is None
    assert len(host.commands_named("userdel")) == 3


def test_is_running_follows_processes(backend: AccountBackend, host: FakeHost, created: int) -> None:
    assert backend.is_running("pl_test") is False
    host.add_process(created)
    assert backend.is_running("pl_test") is True
    assert backend.is_running("pl_other") is False


def test_events_are_logged_with_the_sliver_field(backend: AccountBackend, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nodemanager.backends.account"):
        backend.create(make_sliver())
        backend.destroy("pl_test")
    assert [r.getMessage().split()[:2] for r in caplog.records] == [
        ["sliver=pl_test", "event=created"], ["sliver=pl_test", "event=destroyed"]]


# --- delegate (nm-controller) accounts ---------------------------------------------------------

SHELLS = Path("/etc/shells-test")
WRAPPER = Path("/run/nm-test/delegate-shell")
FORWARD = ["/opt/nm venv/bin/forward_api_calls"]


@pytest.fixture
def dhost() -> ShellAwareFakeHost:
    host = ShellAwareFakeHost()
    host.files[SHELLS] = FakeFile(b"# /etc/shells: valid login shells\n/bin/sh\n/bin/bash\n", 0, 0, 0o644)
    return host


@pytest.fixture
def dbackend(dhost: ShellAwareFakeHost) -> AccountBackend:
    return AccountBackend(dhost, home_root=HOME_ROOT, shell="/bin/bash", name_prefix="nm", delegate_shell=WRAPPER,
                          delegate_socket="/run/nm-test/api.sock", forward_command=FORWARD, shells_file=SHELLS,
                          keys_dir=KEYS_DIR)


def controller(name: str = "pl_ctl", **changes: object) -> Sliver:
    return make_sliver(name, instantiation=NM_CONTROLLER, **changes)


def shells_of(host: FakeHost) -> list[str]:
    return host.files[SHELLS].data.decode().splitlines()


def test_from_config_puts_the_wrapper_next_to_the_socket(host: FakeHost) -> None:
    config = parse_config({"api": {"unix_socket": "/srv/nm/api.sock"},
                           "slivers": {"delegate_shell": "/usr/local/bin/forward_api_calls"}})
    backend = AccountBackend.from_config(config, host)
    assert backend.delegate_shell == Path("/srv/nm/delegate-shell")
    assert backend.delegate is not None and backend.delegate.socket_path == "/srv/nm/api.sock"
    assert backend.delegate.forward_command == ["/usr/local/bin/forward_api_calls"]
    assert AccountBackend.from_config(parse_config({"api": {"unix_socket": ""}}), host).delegate_shell is None


def test_wrapper_text_quotes_and_passes_arguments_through() -> None:
    text = delegate_module.wrapper_text(FORWARD, "/run/a b/api.sock").decode()
    assert text.startswith("#!/bin/sh\n")
    assert text.splitlines()[-1] == "exec '/opt/nm venv/bin/forward_api_calls' --socket '/run/a b/api.sock' \"$@\""


def test_default_forward_command_prefers_the_configured_program() -> None:
    assert delegate_module.default_forward_command("/usr/local/bin/fwd") == ["/usr/local/bin/fwd"]
    default = delegate_module.default_forward_command()
    assert default[0].endswith("forward_api_calls") or default[1:] == ["-m", "nodemanager.api.forward"]


def test_register_and_unregister_keep_other_lines_owner_and_mode(dhost: ShellAwareFakeHost) -> None:
    dhost.files[SHELLS] = FakeFile(b"/bin/sh\n/bin/bash", 0, 5, 0o640)
    assert delegate_module.register_shell(WRAPPER, host=dhost, shells_file=SHELLS) is True
    assert delegate_module.register_shell(WRAPPER, host=dhost, shells_file=SHELLS) is False
    assert shells_of(dhost) == ["/bin/sh", "/bin/bash", str(WRAPPER)]
    assert (dhost.files[SHELLS].gid, dhost.files[SHELLS].mode) == (5, 0o640)
    assert delegate_module.unregister_shell(WRAPPER, host=dhost, shells_file=SHELLS) is True
    assert delegate_module.unregister_shell(WRAPPER, host=dhost, shells_file=SHELLS) is False
    assert shells_of(dhost) == ["/bin/sh", "/bin/bash"]


def test_controller_gets_wrapper_shell_hushlogin_and_restricted_keys(dbackend: AccountBackend,
                                                                      dhost: ShellAwareFakeHost) -> None:
    uid = dbackend.create(controller())
    [argv] = dhost.commands_named("useradd")
    assert argv[argv.index("--shell") + 1] == str(WRAPPER)
    wrapper = dhost.files[WRAPPER]
    assert (wrapper.uid, wrapper.gid, wrapper.mode) == (0, 0, 0o755)
    assert b"--socket /run/nm-test/api.sock \"$@\"" in wrapper.data
    assert shells_of(dhost)[-1] == str(WRAPPER)
    dbackend.configure(controller(), {})
    home = HOME_ROOT / "nmpl_ctl"
    hush = dhost.files[home / ".hushlogin"]
    assert (hush.data, hush.uid, hush.gid, hush.mode) == (b"", 0, 0, 0o644)
    keys = dhost.files[KEYS_DIR / "nmpl_ctl"]
    assert keys.data == b"restrict ssh-ed25519 AAAA one@x\nrestrict ssh-rsa BBBB two@x\n" and keys.uid == 0
    assert uid == 100000 + 1000 + zlib.crc32(b"pl_ctl") % 100000
    assert dhost.commands_named("usermod") == []  # the shell was right from the start


def test_key_options_are_kept_after_restrict(dbackend: AccountBackend, dhost: ShellAwareFakeHost) -> None:
    sliver = controller(keys=('from="10.0.0.0/8" ssh-ed25519 AAAA opt@x',))
    dbackend.create(sliver)
    dbackend.configure(sliver, {})
    data = dhost.files[KEYS_DIR / "nmpl_ctl"].data
    assert data == b'restrict,from="10.0.0.0/8" ssh-ed25519 AAAA opt@x\n'


def test_configure_corrects_a_drifted_shell_and_is_then_idempotent(dbackend: AccountBackend,
                                                                    dhost: ShellAwareFakeHost) -> None:
    dbackend.create(controller())
    entry = dhost.users["nmpl_ctl"]
    dhost.users["nmpl_ctl"] = PasswdEntry(entry.name, entry.uid, entry.gid, entry.gecos, entry.home, "/bin/bash")
    dbackend.configure(controller(), {})
    assert dhost.commands_named("usermod") == [["usermod", "--shell", str(WRAPPER), "nmpl_ctl"]]
    assert dhost.users["nmpl_ctl"].shell == str(WRAPPER)
    dhost.calls.clear()
    dhost.commands.clear()
    dbackend.configure(controller(), {})
    assert dhost.commands == [] and dhost.method_calls("atomic_write") == []


def test_a_controller_that_stops_being_one_gets_the_ordinary_shell_back(dbackend: AccountBackend,
                                                                        dhost: ShellAwareFakeHost) -> None:
    dbackend.create(controller())
    dbackend.configure(controller(), {})
    dbackend.configure(make_sliver("pl_ctl"), {})
    assert dhost.users["nmpl_ctl"].shell == "/bin/bash"
    assert HOME_ROOT / "nmpl_ctl" / ".hushlogin" not in dhost.files
    assert str(WRAPPER) not in shells_of(dhost)
    assert dhost.files[KEYS_DIR / "nmpl_ctl"].data.startswith(b"ssh-ed25519")


def test_the_shell_is_unregistered_when_the_last_controller_goes(dbackend: AccountBackend,
                                                                 dhost: ShellAwareFakeHost) -> None:
    for name in ("pl_ctl", "pl_ctl2"):
        dbackend.create(controller(name))
        dbackend.configure(controller(name), {})
    assert shells_of(dhost).count(str(WRAPPER)) == 1
    dbackend.destroy("pl_ctl")
    assert str(WRAPPER) in shells_of(dhost)
    dbackend.destroy("pl_ctl2")
    assert str(WRAPPER) not in shells_of(dhost)
    assert shells_of(dhost) == ["# /etc/shells: valid login shells", "/bin/sh", "/bin/bash"]


def test_unusable_forward_program_is_logged_once(dbackend: AccountBackend, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        dbackend.create(controller("pl_ctl"))
        dbackend.create(controller("pl_ctl2"))
    problems = [r for r in caplog.records if "delegate-shell-unusable" in r.getMessage()]
    assert problems and all("forward_api_calls" in r.getMessage() or "delegate-shell" in r.getMessage()
                            for r in problems)
    assert len({r.getMessage() for r in problems}) == len(problems)  # each problem once, not per account


def test_without_a_delegate_shell_controllers_are_ordinary_accounts(backend: AccountBackend, host: FakeHost,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        backend.create(controller("pl_ctl"))
        backend.configure(controller("pl_ctl"), {})
        backend.create(controller("pl_ctl2"))
    [argv, _] = host.commands_named("useradd")
    assert argv[argv.index("--shell") + 1] == "/bin/bash"
    assert HOME_ROOT / "nmpl_ctl" / ".hushlogin" not in host.files
    assert len([r for r in caplog.records if "no-delegate-shell" in r.getMessage()]) == 1


def test_unprivileged_access_problems_find_private_directories(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    program = private / "forward_api_calls"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    problems = delegate_module.unprivileged_access_problems([str(program)])
    assert any(str(private) in problem and "not searchable" in problem for problem in problems)
    assert delegate_module.unprivileged_access_problems(["/bin/sh"]) == []


def test_a_lease_frozen_sliver_is_locked_but_keeps_its_keys_and_processes(
        backend: AccountBackend, host: FakeHost, created: int) -> None:
    """docs/leases.md: while a lease keeps a sliver frozen its logins are refused (the account is
    locked as a disabled one) but nothing is stopped or removed; the lease's end unlocks it."""
    from nodemanager.leasing import AccountLoginLock
    from nodemanager.operations import LEASE_FROZEN

    pid = host.add_process(created)
    backend.configure(make_sliver(), {"nm_enabled": 1, LEASE_FROZEN: 1})
    assert host.shadow["nmpl_test"].password == "!*" and pid in host.processes
    assert host.files[KEYS_DIR / "nmpl_test"].data == b"".join(k.encode() + b"\n" for k in KEYS)
    AccountLoginLock(backend).set_open("pl_test", True)
    assert host.shadow["nmpl_test"].password == "*"
    AccountLoginLock(backend).set_open("pl_test", False)
    assert host.shadow["nmpl_test"].password == "!*" and pid in host.processes
    AccountLoginLock(backend).set_open("pl_gone", False)  # no account: nothing to lock
