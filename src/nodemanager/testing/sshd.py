"""A private OpenSSH server for tests: XML-RPC over SSH against a real sshd.

:class:`PrivateSshd` writes a host key and an ``sshd_config`` into a fresh root-owned 0755
directory (under ``/var/tmp`` by default, not ``/tmp``), starts ``/usr/sbin/sshd -D -e`` on
127.0.0.1 with a free port, waits until it sends its banner, and stops it and removes the
directory on exit. It needs root (sshd changes to the logged-in user) and ``/run/sshd`` (the
privilege-separation directory, created when missing and left in place: it is the
openssh-server package's own runtime directory, possibly shared with another sshd).

``UsePAM`` is a parameter because it changes what works: with ``UsePAM no`` sshd refuses key
logins to accounts whose password field is ``!``, and with ``UsePAM yes`` (Debian's default)
PAM prints the message of the day for sessions without a command. Tests should try both.

With ``keys_dir`` (and ``sliver_group``) the configuration ends with the node's own ``Match Group``
block (:func:`nodemanager.backends.sshdconfig.match_block`, the text of
``packaging/sshd_config.d/nodemanager.conf``): sliver accounts then log in with the keys in
``keys_dir/<account>`` and nothing else, exactly as on a node.

:func:`make_client_key` makes an ed25519 key pair for the client side.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ..backends.sshdconfig import match_block

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
DEFAULT_BASE = Path("/var/tmp")
START_TIMEOUT = 10.0


class SshdUnavailable(RuntimeError):
    """sshd is not installed, or this process cannot run it (not root): tests skip on this."""


def sshd_available() -> str | None:
    """None when a private sshd can run here, else the reason it cannot."""
    if not SSHD.exists():
        return f"{SSHD} is missing (install openssh-server)"
    if shutil.which(SSH_KEYGEN) is None:
        return "ssh-keygen is missing (install openssh-client)"
    if os.geteuid() != 0:
        return "a private sshd needs root"
    return None


def make_client_key(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """An unencrypted ed25519 key pair in ``directory``: ``(private key path, public key line)``."""
    key = Path(directory) / name
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "nodemanager-test", "-f", str(key)],
                   check=True, capture_output=True)
    return key, key.with_name(name + ".pub").read_text().strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateSshd:
    """A throw-away sshd on 127.0.0.1. Use as a context manager; ``port`` is set once started.

    ``use_pam``: the ``UsePAM`` setting. ``authorized_keys_file``: sshd's ``AuthorizedKeysFile``
    (relative paths are under the user's home) for accounts outside ``sliver_group``;
    ``keys_dir``: the node's keys directory for members of ``sliver_group`` (None: no such
    block). ``log_level``: sshd's ``LogLevel``; :meth:`log` returns what sshd wrote so far
    (useful in assertion messages). ``extra`` lines are appended to the global part."""

    def __init__(self, *, use_pam: bool = True, authorized_keys_file: str = ".ssh/authorized_keys",
                 log_level: str = "VERBOSE", base_dir: Path = DEFAULT_BASE, extra: tuple[str, ...] = (),
                 keys_dir: Path | None = None, sliver_group: str = "slivers") -> None:
        self.use_pam = use_pam
        self.authorized_keys_file = authorized_keys_file
        self.keys_dir = Path(keys_dir) if keys_dir is not None else None
        self.sliver_group = sliver_group
        self.log_level = log_level
        self.base_dir = Path(base_dir)
        self.extra = extra
        self.directory: Path | None = None
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "sshd_config"

    @property
    def log_path(self) -> Path:
        assert self.directory is not None, "not started"
        return self.directory / "sshd.log"

    def config_text(self, host_key: Path, port: int) -> str:
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            "PidFile none",
            f"UsePAM {'yes' if self.use_pam else 'no'}",
            f"AuthorizedKeysFile {self.authorized_keys_file}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "StrictModes yes",
            f"LogLevel {self.log_level}",
            "Subsystem sftp /usr/lib/openssh/sftp-server",  # as Debian's: run through the login shell
            *self.extra,
        ]
        block = match_block(self.keys_dir, self.sliver_group) if self.keys_dir is not None else ""
        return "".join(line + "\n" for line in lines) + block

    def start(self) -> PrivateSshd:
        reason = sshd_available()
        if reason is not None:
            raise SshdUnavailable(reason)
        if not PRIVSEP_DIR.exists():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="nm-sshd-", dir=self.base_dir))
        try:
            os.chown(self.directory, 0, 0)
            os.chmod(self.directory, 0o755)
            host_key = self.directory / "ssh_host_ed25519_key"
            subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "nodemanager-test-host",
                            "-f", str(host_key)], check=True, capture_output=True)
            for _attempt in range(5):
                self.port = free_port()
                self.config_path.write_text(self.config_text(host_key, self.port))
                check = subprocess.run([str(SSHD), "-t", "-f", str(self.config_path)], capture_output=True, text=True)
                if check.returncode != 0:
                    raise RuntimeError(f"sshd rejected its test configuration: {check.stderr.strip()}")
                with self.log_path.open("ab") as log:
                    self.process = subprocess.Popen(
                        [str(SSHD), "-D", "-e", "-f", str(self.config_path), "-p", str(self.port)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    )
                if self._wait_ready():
                    return self
                self._terminate()  # most likely the port was taken meanwhile: try another
            raise RuntimeError(f"sshd did not start; its log:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> bool:
        """True once sshd sends its banner; False when it exited or stayed silent."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as probe:
                    if probe.recv(64).startswith(b"SSH-"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Stop sshd (its session children end with their connections) and remove the directory."""
        self._terminate()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def ssh_options(self, key: Path) -> list[str]:
        """Client options for this server: port, key only, no known_hosts, batch mode."""
        return ["-p", str(self.port), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-F", "/dev/null"]

    def __enter__(self) -> PrivateSshd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
