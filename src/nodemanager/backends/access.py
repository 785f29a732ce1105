"""What decides who may use a sliver's account: its lock state and its authoritative keys.

Both live where the sliver cannot touch them, so nothing it does in its home can keep it enabled
or keep a key the authority removed:

* the lock state is in ``/etc/shadow``: ``*`` and no expiry when enabled; ``!*`` and an expiry in
  1970 when disabled, which refuses key logins under sshd's ``UsePAM no`` (the ``!``) and
  ``UsePAM yes`` (the expiry, checked by PAM's account phase);
* the keys are ``<keys_dir>/<account>``: a root-owned 0644 file in a root-owned 0755 directory,
  replaced atomically, empty when disabled. sshd reads that file, and only that file, for members
  of the sliver group (``packaging/sshd_config.d/nodemanager.conf``, checked by
  :mod:`.sshdconfig`); the home's ``~/.ssh`` belongs to the sliver and grants nothing.

The **access signature** is a digest of both: the shadow password field and expiry, and the keys
file's ``(inode, size, mtime_ns)``. ``configure`` returns it and ``observe`` recomputes it for
every account from one read of the shadow file and one listing of the keys directory, so a lock
or key file changed behind the node manager's back is seen (and repaired) at the next cycle.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

from ..host import Host, ShadowEntry, ensure_file

logger = logging.getLogger(__name__)

OPEN_PASSWORD, OPEN_EXPIRE = "*", ""
LOCKED_PASSWORD, LOCKED_EXPIRE = "!*", "1"
DEFAULT_KEYS_DIR = Path("/etc/nodemanager/authorized_keys")
KEYS_DIR_MODE = 0o755
KEYS_FILE_MODE = 0o644
#: Key types an ``authorized_keys`` line may start with (otherwise it starts with options).
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")

Stamp = tuple[int, int, int]


def keys_content(name: str, keys: Sequence[str], *, restrict: bool = False) -> bytes:
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


def lock_fields(enabled: bool) -> tuple[str, str]:
    """The shadow ``(password, expiry)`` an enabled or disabled sliver account must have."""
    return (OPEN_PASSWORD, OPEN_EXPIRE) if enabled else (LOCKED_PASSWORD, LOCKED_EXPIRE)


def access_signature(shadow: ShadowEntry | None, stamp: Stamp | None) -> str:
    """The digest of an account's lock state and keys file (see the module docstring); equal
    inputs give equal signatures, any change of either gives another one."""
    lock = "-" if shadow is None else f"{shadow.password}\0{shadow.expire}"
    keys = "-" if stamp is None else ":".join(str(part) for part in stamp)
    return hashlib.sha256(f"{lock}\n{keys}".encode()).hexdigest()[:24]


class KeyFiles:
    """The authoritative keys directory: one file per account, root-owned. Thread-safe (each
    file is written by one worker at a time, and writes are atomic renames)."""

    def __init__(self, host: Host, directory: Path) -> None:
        self.host = host
        self.directory = Path(directory)

    def path(self, account: str) -> Path:
        return self.directory / account

    def write(self, account: str, data: bytes) -> bool:
        """Make ``account``'s file hold exactly ``data`` (root 0644, in a root 0755 directory).
        True when it had to be written; an identical file is left alone (its stamp, and so the
        access signature, stays the same). Idempotent."""
        self.host.makedirs_owned(self.directory, 0, 0, KEYS_DIR_MODE)
        return ensure_file(self.host, self.path(account), data, uid=0, gid=0, mode=KEYS_FILE_MODE)

    def remove(self, account: str) -> None:
        """No file, no key: idempotent."""
        self.host.remove_file(self.path(account))

    def stamp(self, account: str) -> Stamp | None:
        info = self.host.stat_file(self.path(account))
        return info.stamp if info is not None and info.kind == "file" else None

    def stamps(self) -> dict[str, Stamp]:
        """Every account's stamp, from one listing of the directory."""
        return self.host.file_stamps(self.directory)
