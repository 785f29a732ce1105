"""``nodemanager doctor``: verdicts and exit status (pure), the checks over FakeHost (FAIL/WARN
cases, nothing changed), one real run as root, and an unreachable authority within the bound."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.config import Config, parse_config
from nodemanager.core.doctor import Check, Severity, exit_code, render
from nodemanager.core.errors import AuthorityUnavailable
from nodemanager.doctor import DoctorProbes, run_checks
from nodemanager.hostreadonly import ReadOnlyHost, is_read_only_command
from nodemanager.testing.daemonproc import run_nodemanager, write_daemon_config, write_slivers_document
from nodemanager.testing.fakeauthority import FakeAuthority, make_sliver
from nodemanager.testing.fakehost import FakeHost

V1_MOUNTS = (b"cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
             b"cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n"
             b"cgroup /sys/fs/cgroup/cpuset cgroup rw,cpuset 0 0\n"
             b"cgroup /sys/fs/cgroup/freezer cgroup rw,freezer 0 0\n")


# --- the pure part ------------------------------------------------------------------------------
def test_exit_status_is_the_worst_severity() -> None:
    ok, warn, fail = Check.ok("a", "fine"), Check.warn("b", "meh", "do x"), Check.fail("c", "bad", "do y")
    assert exit_code([]) == 0
    assert exit_code([ok, ok]) == 0
    assert exit_code([ok, warn]) == 1
    assert exit_code([warn, fail, ok]) == 2


def test_render_one_line_per_check_with_the_fix_then_a_summary() -> None:
    checks = [Check.ok("clock", "synchronised"), Check.warn("sshd", "no block\nfound", "install it"),
              Check.fail("authority", "refused", "check the key")]
    lines = render(checks).splitlines()
    assert lines == ["OK   clock: synchronised",
                     "WARN sshd: no block found -- fix: install it",
                     "FAIL authority: refused -- fix: check the key",
                     "doctor: 1 ok, 1 warn, 1 fail (exit status 2)"]
    assert Check(name="x", severity=Severity.OK, detail="d", fix="ignored").line == "OK   x: d"


# --- the read-only host ----------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "allowed"), [
    (["tc", "-V"], True), (["tc", "-j", "qdisc", "show", "dev", "eth0"], True),
    (["tc", "qdisc", "del", "dev", "eth0", "root"], False), (["tc", "-batch", "-"], False),
    (["nft", "list", "tables"], True), (["nft", "-j", "list", "table", "inet", "x"], True),
    (["nft", "-f", "-"], False), (["nft", "delete", "table", "inet", "x"], False),
    (["ip", "-j", "route", "show", "default"], True), (["ip", "link", "set", "eth0", "down"], False),
    (["findmnt", "-n", "-T", "/home"], True), (["quotaon", "-p", "-u", "/"], True), (["quotaon", "/"], False),
    (["losetup", "-J", "-l"], True), (["losetup", "-d", "/dev/loop0"], False),
    (["/usr/sbin/sshd", "-T", "-C", "user=x"], True), (["/usr/sbin/sshd", "-D"], False),
    (["mkfs.ext4", "-V"], True), (["mkfs.ext4", "-q", "/tmp/img"], False), (["useradd", "x"], False),
    (["timedatectl", "show", "-p", "NTPSynchronized"], True), (["timedatectl", "set-ntp", "true"], False),
])
def test_only_read_only_commands_run(argv: list[str], allowed: bool) -> None:
    assert is_read_only_command(argv) is allowed


def test_read_only_host_records_what_it_would_create_and_refuses_other_effects() -> None:
    fake = FakeHost()
    host = ReadOnlyHost(fake)
    host.makedirs_owned(Path("/sys/fs/cgroup/cpu/nodemanager"), 0, 0, 0o755)
    host.write_text(Path("/sys/fs/cgroup/unified/cgroup.subtree_control"), "+cpu")
    assert host.would == ["would create /sys/fs/cgroup/cpu/nodemanager",
                          "would write '+cpu' to /sys/fs/cgroup/unified/cgroup.subtree_control"]
    for effect in ("remove_tree", "atomic_write", "spawn_detached", "kill", "run_as", "run_shell"):
        with pytest.raises(Exception, match="read-only check"):
            getattr(host, effect)(Path("/x"))
    with pytest.raises(Exception, match="read-only check"):
        host.run(["useradd", "x"])
    assert not fake.commands and not fake.method_calls("makedirs_owned") and not fake.method_calls("write_text")


# --- the checks over FakeHost ------------------------------------------------------------------------
class AnsweringHost(FakeHost):
    """A FakeHost whose commands answer from ``answers`` (program -> (returncode, stdout))."""

    def __init__(self, answers: dict[str, tuple[int, bytes]] | None = None) -> None:
        super().__init__()
        self.answers = answers or {}

    def _execute(self, args: list[str], input: bytes | None) -> tuple[int, bytes, str]:
        found = self.answers.get(os.path.basename(args[0]))
        if found is not None:
            return found[0], found[1], "" if found[0] == 0 else f"{args[0]} failed"
        return super()._execute(args, input)


def fake_machine(*, mounts: bytes = V1_MOUNTS + b"cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n",
                 answers: dict[str, tuple[int, bytes]] | None = None) -> AnsweringHost:
    host = AnsweringHost({"timedatectl": (0, b"yes\n"), **(answers or {})})
    host.add_file(Path("/proc/self/mounts"), b"/dev/vda / ext4 rw 0 0\n" + mounts)
    host.add_file(Path("/dev/loop-control"))
    host.dirs[Path("/sys/module/sch_htb")] = (0, 0, 0o755)
    return host


class StatVfs:
    def __init__(self, *, free_blocks: int, blocks: int = 1_000_000, flags: int = 0) -> None:
        self.f_frsize, self.f_blocks, self.f_bavail, self.f_flag = 4096, blocks, free_blocks, flags


def make_config(tmp_path: Path, **sections: dict[str, object]) -> Config:
    base: dict[str, dict[str, object]] = {
        "node": {"data_dir": str(tmp_path / "data"), "log_file": ""},
        "authority": {"ticket_cert": str(tmp_path / "none.pem")},
        "api": {"tcp": "", "unix_socket": ""},
        "enforce": {"uplink": "eth0"},
        "slivers": {"keys_dir": "/etc/nodemanager/keys"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return parse_config(base)


def probes(host: FakeHost, **overrides: object) -> DoctorProbes:
    authority = FakeAuthority()
    authority.publish([make_sliver("site_alpha")])
    settings: dict[str, object] = {"host": host, "statvfs": lambda path: StatVfs(free_blocks=500_000),
                                   "kernel_clock": lambda: (0, 0), "fetch": authority.fetch, "euid": 0}
    settings.update(overrides)
    return DoctorProbes(**settings)  # type: ignore[arg-type]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_sound_fake_machine_changes_nothing(tmp_path: Path) -> None:
    host = fake_machine()
    checks = run_checks(make_config(tmp_path), probes(host))
    found = by_name(checks)
    assert found["authority"].severity is Severity.OK and "1 slivers" in found["authority"].detail
    for name in ("cgroups", "enforce.cpu", "enforce.memory", "enforce.bandwidth", "enforce.disk", "tc",
                 "nftables", "clock", "data_dir", "slivers.keys_dir", "slivers.group"):
        assert found[name].severity is Severity.OK, found[name].line
    assert "would create /sys/fs/cgroup/cpu/nodemanager" in found["cgroups"].detail
    assert "would create" in found["enforce.disk"].detail  # the images directory
    # read-only: no directory made, no file written, only read-only commands run
    assert not host.method_calls("makedirs_owned") and not host.method_calls("write_text")
    assert not host.method_calls("atomic_write") and not host.spawned
    assert host.commands and all(is_read_only_command(argv) for argv in host.commands)


def test_missing_controller_and_tools_fail_their_lines(tmp_path: Path) -> None:
    host = fake_machine(mounts=V1_MOUNTS, answers={"tc": (1, b""), "nft": (1, b"")})
    found = by_name(run_checks(make_config(tmp_path), probes(host)))
    assert found["enforce.memory"].severity is Severity.FAIL
    assert "memory controller" in found["enforce.memory"].detail
    assert found["cgroups"].severity is Severity.WARN and "memory MISSING" in found["cgroups"].detail
    assert found["enforce.bandwidth"].severity is Severity.FAIL
    assert found["tc"].severity is Severity.FAIL and "iproute2" in found["tc"].fix
    assert found["nftables"].severity is Severity.FAIL
    assert exit_code(found.values()) == 2


def test_disabled_enforcement_warns_and_tools_are_not_needed(tmp_path: Path) -> None:
    host = fake_machine(answers={"tc": (1, b""), "nft": (1, b"")})
    config = make_config(tmp_path, enforce={"bandwidth": False, "disk": False})
    found = by_name(run_checks(config, probes(host)))
    assert found["enforce.bandwidth"].severity is Severity.WARN
    assert "[enforce] bandwidth = true" in found["enforce.bandwidth"].fix
    assert found["tc"].severity is Severity.OK and "not needed" in found["tc"].detail
    assert found["nftables"].severity is Severity.OK


def refused():  # noqa: ANN201
    raise AuthorityUnavailable("http://plc: HTTP 403 Forbidden")


def test_disk_space_clock_and_authority_problems(tmp_path: Path) -> None:
    host = fake_machine(answers={"timedatectl": (1, b"")})
    low = probes(host, statvfs=lambda path: StatVfs(free_blocks=1000), kernel_clock=lambda: (5, 0x40),
                 fetch=refused)
    found = by_name(run_checks(make_config(tmp_path), low))
    assert found["data_dir"].severity is Severity.WARN and "free" in found["data_dir"].detail
    assert found["clock"].severity is Severity.WARN and "STA_UNSYNC" in found["clock"].detail
    assert found["authority"].severity is Severity.FAIL and "403" in found["authority"].detail

    read_only = probes(host, statvfs=lambda path: StatVfs(free_blocks=500_000, flags=os.ST_RDONLY),
                       kernel_clock=lambda: None)
    found = by_name(run_checks(make_config(tmp_path), read_only))
    assert found["data_dir"].severity is Severity.FAIL and "read-only" in found["data_dir"].detail
    assert found["clock"].severity is Severity.WARN and "cannot tell" in found["clock"].detail


def test_an_authority_that_never_answers_fails_at_the_deadline(tmp_path: Path) -> None:
    release = threading.Event()

    def hanging_fetch():  # noqa: ANN202
        release.wait(10)
        raise AuthorityUnavailable("released")

    started = time.monotonic()
    found = by_name(run_checks(make_config(tmp_path), probes(fake_machine(), fetch=hanging_fetch,
                                                            authority_deadline=0.3)))
    release.set()
    assert found["authority"].severity is Severity.FAIL and "no answer within 0.3 s" in found["authority"].detail
    assert time.monotonic() - started < 5


def test_sshd_keys_dir_group_tickets_and_delegate_shell_problems(tmp_path: Path) -> None:
    host = fake_machine()
    host.add_user("alice")  # a stranger in the sliver group
    host.add_user("site_alpha", gecos="nodemanager sliver")
    from nodemanager.host import GroupEntry

    host.groups["slivers"] = GroupEntry("slivers", 900, ("alice", "site_alpha"))
    host.dirs[Path("/etc")] = (0, 0, 0o755)
    host.dirs[Path("/etc/nodemanager")] = (1000, 0, 0o775)
    (tmp_path / "bad.pem").write_text("not a certificate")
    (tmp_path / "bad.gpg").write_bytes(b"")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "shell").write_text("#!/bin/sh\n")
    (private / "shell").chmod(0o700)
    config = make_config(tmp_path, authority={"ticket_cert": str(tmp_path / "bad.pem"),
                                              "ticket_keyring": str(tmp_path / "bad.gpg")},
                         api={"unix_socket": str(tmp_path / "api.sock")},
                         slivers={"delegate_shell": str(private / "shell")})
    found = by_name(run_checks(config, probes(host)))
    assert found["sshd"].severity is Severity.FAIL  # sshd -T answers nothing: AuthorizedKeysFile unset
    assert "AuthorizedKeysFile" in found["sshd"].detail
    assert found["slivers.group"].severity is Severity.WARN and "alice" in found["slivers.group"].detail
    assert found["slivers.keys_dir"].severity is Severity.FAIL and "uid 1000" in found["slivers.keys_dir"].detail
    assert found["tickets.cert"].severity is Severity.FAIL
    assert found["tickets.keyring"].severity is Severity.FAIL
    assert found["delegate_shell"].severity is Severity.FAIL


def test_hollow_backend_needs_no_enforcement_or_sshd(tmp_path: Path) -> None:
    host = fake_machine(mounts=b"", answers={"tc": (1, b""), "nft": (1, b"")})
    found = by_name(run_checks(make_config(tmp_path, slivers={"backend": "hollow"}), probes(host)))
    for name in ("cgroups", "enforcement", "sshd", "delegate_shell", "slivers.group", "slivers.keys_dir"):
        assert found[name].severity is Severity.OK, found[name].line


# --- the real machine ------------------------------------------------------------------------------
def parse_output(stdout: str) -> tuple[dict[str, str], str]:
    *lines, summary = stdout.strip().splitlines()
    severities = {}
    for line in lines:
        severity, rest = line.split(None, 1)
        assert severity in ("OK", "WARN", "FAIL"), line
        severities[rest.split(":", 1)[0]] = severity
    return severities, summary


@pytest.mark.root
def test_real_run_as_root_has_a_line_per_check_and_changes_nothing(tmp_path: Path) -> None:
    document = tmp_path / "slivers.json"
    write_slivers_document(document, ["site_alpha"], 1)
    config = write_daemon_config(tmp_path, document, slivers={}, enforce=None)
    started = time.monotonic()
    result = run_nodemanager(config, "doctor", timeout=60)
    assert time.monotonic() - started < 15
    severities, summary = parse_output(result.stdout)
    for name in ("privileges", "data_dir", "cgroups", "enforce.cpu", "enforce.memory", "enforce.bandwidth",
                 "enforce.disk", "tc", "nftables", "sshd", "delegate_shell", "slivers.group",
                 "slivers.keys_dir", "clock", "tickets.cert", "tickets.keyring", "authority"):
        assert name in severities, result.stdout
    assert severities["authority"] == "OK" and severities["privileges"] == "OK"
    worst = max({"OK": 0, "WARN": 1, "FAIL": 2}[s] for s in severities.values())
    assert result.returncode == worst, result.stdout + result.stderr
    assert summary.endswith(f"(exit status {worst})")
    assert not (tmp_path / "data").exists() and not (tmp_path / "keys").exists()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.mark.slow
def test_unreachable_authority_fails_its_line_within_the_bound(tmp_path: Path, silent_server: int) -> None:
    (tmp_path / "node_id").write_text("1\n")
    (tmp_path / "node_key").write_text("secret\n")
    config = make_config(tmp_path, authority={
        "url": f"http://127.0.0.1:{silent_server}/PLCAPI/", "timeout": 30,
        "node_id_file": str(tmp_path / "node_id"), "node_key_file": str(tmp_path / "node_key")})
    started = time.monotonic()
    found = by_name(run_checks(config, DoctorProbes(host=fake_machine(), kernel_clock=lambda: (0, 0))))
    elapsed = time.monotonic() - started
    assert found["authority"].severity is Severity.FAIL, found["authority"].line
    assert str(silent_server) in found["authority"].detail
    assert elapsed < 15
