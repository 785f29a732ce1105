"""The password database part of the account backend: shadow commands, lock state, groups.

Every change to passwd, shadow and group goes through shadow's own tools (``useradd``,
``usermod``, ``groupadd``...), which lock the files correctly; :meth:`AccountDatabase.command`
runs them one at a time per backend and retries while another program holds the lock.

Groups are decided here, never inherited: a sliver account is a member of its own group and of
the sliver group (``slivers.group``, made with ``groupadd --system`` when missing), and of
nothing else. ``/etc/group`` may list the account's name in some group before the account even
exists (a stale entry, or one planted for the name); :meth:`AccountDatabase.ensure_memberships`
removes every such membership (``usermod --groups`` sets the whole list) and logs it, and programs
started for the sliver get exactly :meth:`AccountDatabase.process_groups`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..core.errors import BackendError
from ..host import CommandResult, GroupEntry, Host, PasswdEntry
from .access import lock_fields

logger = logging.getLogger(__name__)

#: Retries of a shadow command that found the password database locked by another program.
LOCK_RETRIES = 8
LOCK_RETRY_DELAY_S = 0.25
DEFAULT_GROUP = "slivers"
_GROUP_EXISTS = 9


class AccountDatabase:
    """passwd/shadow/group changes for one backend. Thread-safe."""

    def __init__(self, host: Host, group: str = DEFAULT_GROUP) -> None:
        self.host = host
        #: The supplementary group of every sliver account (sshd's ``Match Group``).
        self.group = group
        # The shadow tools serialise on the passwd lock with a timeout ("cannot lock /etc/passwd;
        # try again later"); queueing here keeps a burst of workers clear of that timeout.
        self._lock = threading.Lock()

    def command(self, argv: Sequence[str], *, check: bool = True) -> CommandResult[bytes]:
        """Run a shadow command, one at a time per backend.

        Another program holding the password database's lock (an administrator's ``vipw``,
        another tool's ``useradd``) makes the shadow tools fail at once with "cannot lock";
        that is retried for a few seconds instead of failing the sliver."""
        with self._lock:
            for attempt in range(LOCK_RETRIES):
                result = self.host.run(list(argv), check=False)
                if result.returncode == 0 or b"cannot lock" not in result.stderr or attempt == LOCK_RETRIES - 1:
                    break
                self.host.sleep(LOCK_RETRY_DELAY_S * (attempt + 1))
            if check and result.returncode != 0:
                tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
                raise BackendError(f"{argv[0]} exited with status {result.returncode}: {tail or '(no stderr)'}")
            return result

    def ensure_lock_state(self, name: str, account: str, enabled: bool) -> bool:
        """Enabled: password ``*``, no expiry; disabled: ``!*`` and expired in 1970. True when
        it had to change. Idempotent."""
        want = lock_fields(enabled)
        shadow = self.host.shadow_entry(account)
        if shadow is not None and (shadow.password, shadow.expire) == want:
            return False
        self.command(["usermod", "--password", want[0], "--expiredate", want[1], account])
        logger.info("sliver=%s event=%s", name, "unlocked" if enabled else "locked")
        return True

    def sliver_group(self) -> GroupEntry:
        """The sliver group, made (``groupadd --system``) when missing."""
        group = self.host.getgrnam(self.group)
        if group is not None:
            return group
        result = self.command(["groupadd", "--system", self.group], check=False)
        if result.returncode not in (0, _GROUP_EXISTS):
            tail = result.stderr.decode("utf-8", "replace").strip()[-400:]
            raise BackendError(f"cannot create the sliver group {self.group!r}: groupadd exited with status "
                               f"{result.returncode}: {tail or '(no stderr)'}")
        group = self.host.getgrnam(self.group)
        if group is None:
            raise BackendError(f"groupadd succeeded but group {self.group!r} does not exist")
        logger.info("event=sliver-group-created group=%s gid=%d", group.name, group.gid)
        return group

    def ensure_memberships(self, name: str, account: str) -> None:
        """Make ``account`` a member of the sliver group and of no other group (its own
        primary group aside). Idempotent: one pass over the group database when nothing is
        wrong."""
        self.sliver_group()
        listed = [g.name for g in self.host.all_groups() if account in g.members]
        stale = sorted(g for g in listed if g != self.group)
        if stale or self.group not in listed:
            self.command(["usermod", "--groups", self.group, account])
            if stale:
                logger.warning("sliver=%s event=stale-groups-removed account=%s groups=%s",
                               name, account, ",".join(stale))

    def process_groups(self, entry: PasswdEntry) -> list[int]:
        """The supplementary groups of programs started for the account: its own group and the
        sliver group, nothing ``/etc/group`` may otherwise say."""
        group = self.host.getgrnam(self.group)
        return [entry.gid] + ([group.gid] if group is not None and group.gid != entry.gid else [])
