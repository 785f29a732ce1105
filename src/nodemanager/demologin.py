"""``make demo``'s login: a private sshd and a key pair so that the user can log into a demo sliver.

The demo generates an ed25519 key pair in its work directory, adds the public key to one
auto-instantiated slice of its copy of the slices file (so the key reaches the node the way every
key does: authority -> sync -> the root-owned keys file), and starts a throw-away sshd on a
loopback port whose ``Match Group`` block reads the demo's keys directory -- the node's own sshd
and keys are never touched. The sshd launcher is :mod:`nodemanager.testing.sshd`, which lives in
the source tree only (the wheel leaves ``nodemanager.testing`` out): ``make demo`` runs from the
checkout, an installed copy says why there is no login line.

sshd's ``StrictModes`` wants every directory above a keys file root-owned and not writable by
others; a checkout in a user's home is not, so the keys directory is a fresh root-owned directory
under ``/var/lib``, removed on exit.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from types import ModuleType

#: Parent of the demo's keys directory: root-owned 0755 all the way up (sshd StrictModes).
KEYS_PARENT = Path("/var/lib")
#: No known_hosts entry for a host key that changes every run, and no warning about it either.
CLIENT_OPTIONS = ("-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", "LogLevel=ERROR")


def _sshd_kit() -> tuple[ModuleType | None, str]:
    """The testing kit's sshd module, or None and why it cannot be used."""
    try:
        from .testing import sshd
    except ImportError:
        return None, ("the private sshd launcher (nodemanager.testing) is not installed with the program: "
                      "run the demo from the source tree (make demo)")
    reason = sshd.sshd_available()
    return (None, reason) if reason else (sshd, "")


def login_unavailable(real: bool) -> str | None:
    """None when the demo can offer a login, else the reason it cannot (printed instead)."""
    if not real:
        return "the hollow backend creates no accounts to log into (run as root for real accounts)"
    return _sshd_kit()[1] or None


def login_slice(slices: Path) -> str:
    """The first slice of ``slices`` that node 1 instantiates by itself (the login's target)."""
    data = tomllib.loads(slices.read_text())
    for entry in data.get("slices", []):
        nodes = entry.get("nodes", "all")
        if entry.get("instantiation", "plc-instantiated") == "plc-instantiated" and (nodes == "all" or 1 in nodes):
            return str(entry["name"])
    raise ValueError(f"{slices} has no plc-instantiated slice on node 1 to log into")


def add_key(slices: Path, name: str, public_key: str) -> None:
    """Add ``public_key`` to slice ``name``'s keys in ``slices``, keeping the file's comments
    (the user edits this copy while the demo runs). Raises ValueError when the file's layout
    is not one this edit understands; the result is checked by parsing it."""
    text = slices.read_text()
    blocks = re.split(r"(?m)^(?=\[\[slices\]\])", text)
    for i, block in enumerate(blocks):
        if re.search(rf'(?m)^name\s*=\s*"{re.escape(name)}"\s*$', block):
            quoted = '"' + public_key.replace("\\", "\\\\").replace('"', '\\"') + '"'
            edited, count = re.subn(r"(?m)^keys\s*=\s*\[", f"keys = [{quoted}, ", block, count=1)
            if not count:
                edited, count = re.subn(rf'(?m)^(name\s*=\s*"{re.escape(name)}"\s*)$', rf"\1\nkeys = [{quoted}]",
                                        block, count=1)
            blocks[i] = edited
            break
    new_text = "".join(blocks)
    parsed = tomllib.loads(new_text)
    keys = next((s.get("keys", []) for s in parsed.get("slices", []) if s.get("name") == name), [])
    if public_key not in keys:
        raise ValueError(f"could not add the demo's key to slice {name} in {slices}")
    slices.write_text(new_text)


class DemoLogin:
    """The key pair, the private sshd and the keys directory of one demo run."""

    def __init__(self, work: Path, group: str) -> None:
        self.work = work
        self.group = group
        self.keys_parent = Path(tempfile.mkdtemp(prefix="nodemanager-demo-", dir=KEYS_PARENT))
        os.chown(self.keys_parent, 0, 0)
        os.chmod(self.keys_parent, 0o755)
        self.keys_dir = self.keys_parent / "authorized_keys"
        self.sshd = None
        self.key = work / "id_ed25519"
        self.public_key = ""

    def make_key(self) -> str:
        sshd, reason = _sshd_kit()
        if sshd is None:
            raise RuntimeError(reason)
        try:
            self.key, self.public_key = sshd.make_client_key(self.work, self.key.name)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"ssh-keygen failed: {exc.stderr.decode(errors='replace').strip()}") from exc
        return self.public_key

    def start(self) -> int:
        """Start sshd on a free loopback port; the port."""
        sshd, reason = _sshd_kit()
        if sshd is None:
            raise RuntimeError(reason)
        self.sshd = sshd.PrivateSshd(keys_dir=self.keys_dir, sliver_group=self.group, log_level="INFO")
        self.sshd.start()
        return int(self.sshd.port)

    def command(self, account: str, cwd: Path | None = None) -> str:
        """The ``ssh`` line to paste: the key path relative to ``cwd`` when it is below it."""
        assert self.sshd is not None, "not started"
        key = self.key
        try:
            key = key.relative_to((cwd or Path.cwd()).resolve())
        except ValueError:
            pass
        argv = ["ssh", "-i", str(key), "-p", str(self.sshd.port), *CLIENT_OPTIONS, f"{account}@127.0.0.1"]
        return shlex.join(argv)

    def close(self) -> None:
        """Stop sshd (ending its sessions) and remove the keys directory."""
        if self.sshd is not None:
            self.sshd.stop()
            self.sshd = None
        shutil.rmtree(self.keys_parent, ignore_errors=True)
