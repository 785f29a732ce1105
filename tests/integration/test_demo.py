"""`make demo`'s program: slivers appear in the status table, then only what changes is printed;
as root with sshd the printed `ssh` line logs into a demo sliver; real demo accounts, the private
sshd and its keys directory go on exit."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def demo_accounts() -> set[str]:
    return {p.pw_name for p in pwd.getpwall() if p.pw_name.startswith("demosite_")}


def run_demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "nodemanager.demo", "--seconds", "6", "--workdir", str(tmp_path / "demo"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_demo_hollow_shows_slivers(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--hollow")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HOLLOW" in result.stdout
    for name in ("site_alpha", "site_beta", "demo_ctrl"):
        assert name in result.stdout
    assert "running" in result.stdout


@pytest.mark.root
def test_demo_real_accounts_appear_and_are_removed(tmp_path: Path) -> None:
    if demo_accounts():
        pytest.skip(f"demo accounts already exist on this machine: {sorted(demo_accounts())}")
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REAL Linux accounts" in result.stdout
    assert "demosite_alpha" in result.stdout  # listed as removed on exit
    table = result.stdout.split("--- sync at", 1)[1]
    assert "site_alpha" in table and "running" in table
    assert demo_accounts() == set()
    # the demo kept its keys and sliver group to itself, and took the group away again
    if "login: ssh " in result.stdout:  # keys in a root-owned directory for sshd, removed on exit
        assert not (tmp_path / "demo" / "authorized_keys").exists()
    else:
        assert (tmp_path / "demo" / "authorized_keys").is_dir()  # its files went with the accounts
    assert subprocess.run(["getent", "group", "demoslivers"], capture_output=True).returncode != 0


class RunningDemo:
    """The demo in the background; its stdout lines collected by a thread as they come."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.workdir = tmp_path / "demo"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nodemanager.demo", "--seconds", "240", "--workdir", str(self.workdir), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, found: Callable[[str], bool], what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found(self.output):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"the demo never printed {what}; its output:\n{self.output[-4000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.reader.join(timeout=10)
        self.close()
        return code

    def close(self) -> None:
        if self.process.stdout is not None and not self.reader.is_alive():
            self.process.stdout.close()


@pytest.fixture
def demo_runner(tmp_path: Path) -> Iterator[Callable[..., RunningDemo]]:
    started: list[RunningDemo] = []

    def start(*extra: str) -> RunningDemo:
        started.append(RunningDemo(tmp_path, *extra))
        return started[-1]

    yield start
    for demo in started:
        if demo.process.poll() is None:
            demo.process.kill()
            demo.process.wait(timeout=60)
        demo.reader.join(timeout=10)
        demo.close()


FIRST_TABLE_DONE = "--- from now on: only what changes"


def test_after_the_first_table_only_changes_are_printed(demo_runner: Callable[..., RunningDemo]) -> None:
    demo = demo_runner("--hollow")
    demo.wait_for(lambda out: FIRST_TABLE_DONE in out, "its first table")
    slices = demo.workdir / "slices.toml"
    text = slices.read_text()
    assert text.count("nm_cpu_share = 2\n") == 1  # site_alpha's
    time.sleep(1.1)  # the authority's document timestamp is the file's mtime, in seconds
    slices.write_text(text.replace("nm_cpu_share = 2\n", "nm_cpu_share = 5\n") + (
        '\n[[slices]]\nname = "site_gamma"\nid = 401\nnodes = [1]\n'))
    demo.process.send_signal(signal.SIGUSR1)  # poll now instead of within 15-20 s
    demo.wait_for(lambda out: "site_gamma: added" in out and "site_alpha: rspec" in out, "the change lines")
    assert demo.stop() == 0
    after = demo.output.split(FIRST_TABLE_DONE, 1)[1]
    changes = [line for line in after.splitlines() if re.match(r"\d\d:\d\d:\d\d [-+~] ", line)]
    assert re.search(r"^\d\d:\d\d:\d\d \+ site_gamma: added \(plc-instantiated\), \w+", after, re.M), after
    assert any(line.endswith("~ site_alpha: rspec nm_cpu_share 2 -> 5") for line in changes), changes
    # nothing else changed, and the table is not printed again
    assert all("site_gamma" in line or "site_alpha" in line for line in changes), changes
    assert "INSTANTIATION" not in after and demo.output.count("INSTANTIATION") == 1
    assert "no login line: the hollow backend creates no accounts" in demo.output


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.root
def test_as_root_the_printed_ssh_line_logs_into_a_demo_sliver(demo_runner: Callable[..., RunningDemo]) -> None:
    from nodemanager.testing.sshd import sshd_available

    reason = sshd_available()
    if reason:
        pytest.skip(reason)
    if demo_accounts():
        pytest.skip(f"demo accounts already exist on this machine: {sorted(demo_accounts())}")
    keys_dirs_before = set(Path("/var/lib").glob("nodemanager-demo-*"))
    demo = demo_runner()
    demo.wait_for(lambda out: FIRST_TABLE_DONE in out, "its first table")
    (line,) = [line for line in demo.lines if line.startswith("login: ")]
    command = line.removeprefix("login: ").split("   (")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["ssh", "-i"] and Path(argv[2]).name == "id_ed25519"
    assert argv[-1] == "demosite_alpha@127.0.0.1"
    assert "StrictHostKeyChecking=no" in argv and "UserKnownHostsFile=/dev/null" in argv
    port = int(argv[argv.index("-p") + 1])
    # exactly as printed, plus batch mode (no prompt) and a command instead of a shell
    login = subprocess.run([*argv[:-1], "-o", "BatchMode=yes", "-F", "/dev/null", argv[-1], "id -un; id -Gn"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert login.returncode == 0, login.stderr + demo.output[-3000:]
    user, groups = login.stdout.split("\n")[:2]
    assert user == "demosite_alpha" and "demoslivers" in groups.split()
    assert demo.stop() == 0
    assert "removed demo accounts:" in demo.output
    assert demo_accounts() == set()
    assert not _port_open(port)  # the private sshd is gone
    assert set(Path("/var/lib").glob("nodemanager-demo-*")) == keys_dirs_before
