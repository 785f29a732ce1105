"""Running an authority-supplied shell command: the part of the :class:`~nodemanager.host.Host`
seam for ``conf_files``' ``preinstall_cmd``, ``postinstall_cmd`` and ``error_cmd``.

PLC sends these as shell command lines, so this is the one place that runs a shell string: the
string is a single argument of ``/bin/sh -c`` (nothing else of the document reaches the argument
list), run as the daemon's user (root) in ``/`` with stdin from ``/dev/null``, umask 022, and a
clean environment (:data:`SHELL_ENV`). It runs in its own session so that the timeout kills the
whole process group (the shell and everything it started that stayed in the group), not just
the shell. Its stdout and stderr are captured together, up to ``output_limit`` bytes (the rest
is read and dropped so the command never blocks on a full pipe).

When the shell exits, the command is over: a daemon it started that keeps the pipe open is not
waited for (an init script restarting a service must not hold the sync).
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass

from .core.errors import BackendError
from .forkguard import popen

#: Environment of every shell command: nothing of the daemon's own environment leaks in.
SHELL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root", "SHELL": "/bin/sh"}
SHELL = "/bin/sh"


@dataclass(frozen=True, slots=True)
class ShellResult:
    """How a shell command ended: ``returncode`` (negative: killed by that signal), whether the
    timeout killed it, and the first bytes of its output (``truncated`` when there was more)."""

    returncode: int
    timed_out: bool
    output: bytes
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def run_shell_command(command: str, *, timeout: float, output_limit: int) -> ShellResult:
    """Run ``command`` with ``/bin/sh -c`` (see the module docstring). Raises ``BackendError``
    only when the shell cannot be started; a failing or hanging command is a result."""
    try:
        child = popen(
            [SHELL, "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd="/", env=dict(SHELL_ENV), umask=0o022, start_new_session=True, close_fds=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"cannot run {SHELL}: {exc}") from exc
    assert child.stdout is not None
    pipe = child.stdout
    deadline = time.monotonic() + timeout
    kept: list[bytes] = []
    size, truncated, timed_out = 0, False, False
    os.set_blocking(pipe.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                ready = selector.select(min(remaining, 0.1))
                if ready:
                    chunk = _read(pipe.fileno())
                    if chunk is None:
                        continue
                    if not chunk:  # EOF: everyone holding the pipe is gone
                        break
                    if size < output_limit:
                        kept.append(chunk[:output_limit - size])
                    truncated = truncated or size + len(chunk) > output_limit
                    size += len(chunk)
                elif child.poll() is not None:
                    break  # the shell is done; a background daemon may still hold the pipe
            if not timed_out:
                try:  # EOF but the shell itself may still run (``exec >&-; sleep 1000``)
                    child.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    timed_out = True
            if timed_out:
                _kill_group(child.pid)
            returncode = child.wait()
        except BaseException:
            _kill_group(child.pid)
            child.wait()
            raise
        finally:
            pipe.close()
    return ShellResult(returncode=returncode, timed_out=timed_out, output=b"".join(kept), truncated=truncated)


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None


def _kill_group(pgid: int) -> None:
    """SIGKILL the command's process group (its pgid is the shell's pid: a new session)."""
    if pgid > 1:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
