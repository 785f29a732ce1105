"""The ``admin_keys`` document handler: the authority's keys in local accounts' ``authorized_keys``.

Opt-in through ``accounts.manage_keys`` (see :mod:`nodemanager.core.adminkeys` for the block,
the validation and the hold). This adapter does the file work, as root, in homes that may belong
to someone else (``site_admin``), through the link-safe :class:`~nodemanager.host.Host` seam:

* the account must exist (it is reported, never created) and have an existing home directory;
* ``~/.ssh`` is made (the account's, 0700) when missing; a ``~/.ssh`` or ``authorized_keys``
  that is a symbolic link or not a directory / regular file is reported and left alone, never
  followed (the walk itself also refuses any link in a directory the account can write);
* ``authorized_keys`` must belong to the account: a file of anyone else (a hard link to
  ``/etc/shadow``, say) is reported and neither read into the new file nor written;
* the new file is written atomically (a temporary file in the same directory, renamed over the
  old one through directory descriptors) owned by the account, 0600 for a new file, else the old
  mode without group/other write bits; it is written only when its content changes.

The outcome per account (keys in the block, last change, held removal, problem) is stored as JSON
under ``Meta.ADMIN_KEYS`` for ``status`` and metrics. Called from the sync thread only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .authority.parse import is_openssh_public_key
from .core.adminkeys import AccountOutcome, Hold, KeysDecision, decide_keys, parse_accounts
from .core.errors import NodeManagerError
from .core.records import AuthorityDocument
from .datadir import Meta
from .host import Host
from .store import Store

logger = logging.getLogger(__name__)

SSH_DIR_MODE = 0o700
NEW_FILE_MODE = 0o600
#: An ``authorized_keys`` larger than this is left alone: reading part of it would lose lines.
MAX_FILE_BYTES = 1 << 20


class KeysFileProblem(NodeManagerError):
    """The account's keys file cannot be handled safely; the message says why (for ``status``)."""


class AdminKeys:
    """``sync.DocumentHandler`` for the ``accounts`` member."""

    name = "admin_keys"

    def __init__(self, host: Host, store: Store, managed: Sequence[str], *, confirm_after: int = 2,
                 now: Callable[[], float] = time.time) -> None:
        self.host = host
        self.store = store
        self.managed = tuple(dict.fromkeys(managed))
        self.confirm_after = confirm_after
        self.now = now

    def apply(self, doc: AuthorityDocument) -> None:
        """Bring every managed account's block in line with ``doc``; idempotent."""
        statement = parse_accounts(doc.members.get("accounts"), self.managed, is_openssh_public_key)
        if statement.problem:
            logger.error("event=admin-keys-rejected reason=%s", statement.problem)
        for rejection in statement.rejections:
            logger.warning("event=admin-key-rejected entry=%s reason=%s", rejection.label, rejection.reason)
        for name in statement.ignored:
            logger.debug("event=admin-keys-ignored account=%s reason=not-in-manage_keys", name[:64])
        previous = load_outcomes(self.store.get_meta(Meta.ADMIN_KEYS, ""))
        outcomes: dict[str, AccountOutcome] = {}
        for account in self.managed:
            outcome = self._apply_account(account, statement.wanted.get(account),
                                          previous.get(account, AccountOutcome()), doc.timestamp)
            rejected = tuple(f"{r.label}: {r.reason}" for r in statement.rejections if f"{account!r}" in r.label)
            outcomes[account] = replace(outcome, problem=outcome.problem or statement.problem,
                                        rejections=rejected[:8])
        self.store.set_meta({Meta.ADMIN_KEYS: dump_outcomes(outcomes, self.confirm_after)})

    def _apply_account(self, account: str, wanted: tuple[str, ...] | None, before: AccountOutcome,
                       timestamp: int) -> AccountOutcome:
        try:
            decision = self._decide(account, wanted, before.hold)
        except KeysFileProblem as exc:
            logger.error("event=admin-keys-failed account=%s reason=%s", account, exc)
            return AccountOutcome(before.keys, before.changed_at, before.document, None, str(exc))
        if decision.problem:
            logger.error("event=admin-keys-failed account=%s reason=%s", account, decision.problem)
            return AccountOutcome(len(decision.keys), before.changed_at, before.document, None, decision.problem)
        if decision.held_now and decision.hold is not None:
            logger.critical("event=admin-keys-removal-held account=%s keys=%d seen=%d confirm_after=%d",
                            account, decision.hold.count, decision.hold.seen, self.confirm_after)
        if decision.content is None:
            return AccountOutcome(len(decision.keys), before.changed_at, before.document, decision.hold)
        logger.warning("event=admin-keys-changed account=%s keys=%d added=%d removed=%d document=%d",
                       account, len(decision.keys), len(decision.added), len(decision.removed), timestamp)
        return AccountOutcome(len(decision.keys), self.now(), timestamp, None)

    def _decide(self, account: str, wanted: tuple[str, ...] | None, hold: Hold | None) -> KeysDecision:
        """Read, decide and (when it changes) write ``account``'s file; ``KeysFileProblem`` when
        it cannot be done safely."""
        entry = self.host.getpwnam(account)
        if entry is None:
            raise KeysFileProblem(f"account {account} does not exist (it is never created)")
        home = Path(entry.home)
        if not home.is_absolute():
            raise KeysFileProblem(f"account {account} has no absolute home directory ({entry.home!r})")
        ssh_dir, path = home / ".ssh", home / ".ssh" / "authorized_keys"
        try:
            home_info = self.host.stat_file(home)
            if home_info is None or home_info.kind != "dir":
                raise KeysFileProblem(f"the home {home} of account {account} is not a directory")
            dir_info = self.host.stat_file(ssh_dir)
            if dir_info is not None:
                if dir_info.kind != "dir":
                    raise KeysFileProblem(f"{ssh_dir} is a {dir_info.kind}, not a directory; left alone")
                if dir_info.uid not in (0, entry.uid):
                    raise KeysFileProblem(f"{ssh_dir} belongs to uid {dir_info.uid}, not to {account}; left alone")
            info = self.host.stat_file(path) if dir_info is not None else None
            current: bytes | None = None
            if info is not None:
                if info.kind != "file":
                    raise KeysFileProblem(f"{path} is a {info.kind}, not a regular file; left alone")
                if info.uid != entry.uid:
                    raise KeysFileProblem(f"{path} belongs to uid {info.uid}, not to {account}; left alone")
                if info.size > MAX_FILE_BYTES:
                    raise KeysFileProblem(f"{path} is larger than {MAX_FILE_BYTES} bytes; left alone")
                current = self.host.read_file(path, limit=MAX_FILE_BYTES + 1)
                again = self.host.stat_file(path)
                if current is None or again is None or again.stamp != info.stamp or len(current) != info.size:
                    raise KeysFileProblem(f"{path} changed while it was read; it is tried again with the next document")
            decision = decide_keys(current, wanted, hold, self.confirm_after)
            if decision.content is None:
                return decision
            if dir_info is None:
                self.host.makedirs_owned(ssh_dir, entry.uid, entry.gid, SSH_DIR_MODE)
            mode = NEW_FILE_MODE if info is None else (info.mode & 0o644) | 0o600
            gid = entry.gid if info is None else info.gid
            self.host.atomic_write(path, decision.content, uid=entry.uid, gid=gid, mode=mode)
            return decision
        except NodeManagerError as exc:
            if isinstance(exc, KeysFileProblem):
                raise
            raise KeysFileProblem(f"account {account}: {exc}") from exc


# --------------------------------------------------------------------------- the stored outcome


def dump_outcomes(outcomes: Mapping[str, AccountOutcome], confirm_after: int) -> str:
    """The JSON kept under ``Meta.ADMIN_KEYS``: ``{"confirm_after": N, "accounts": {name: ...}}``."""
    def one(outcome: AccountOutcome) -> dict[str, Any]:
        hold = outcome.hold
        return {"keys": outcome.keys, "changed_at": outcome.changed_at, "document": outcome.document,
                "hold": None if hold is None else {"digest": hold.digest, "count": hold.count, "seen": hold.seen},
                "problem": outcome.problem, "rejections": list(outcome.rejections)}
    accounts = {name: one(outcome) for name, outcome in outcomes.items()}
    return json.dumps({"confirm_after": confirm_after, "accounts": accounts}, sort_keys=True)


def load_state(raw: str) -> tuple[dict[str, AccountOutcome], int]:
    """The stored outcomes and the ``confirm_after`` they were counted against; an empty or
    unreadable value is none (nothing held, nothing known)."""
    try:
        data = json.loads(raw) if raw else {}
        outcomes = {}
        for name, item in data.get("accounts", {}).items():
            hold = item.get("hold")
            outcomes[str(name)] = AccountOutcome(
                int(item.get("keys", 0)), float(item.get("changed_at", 0.0)), int(item.get("document", 0)),
                None if not hold else Hold(str(hold["digest"]), int(hold["count"]), int(hold["seen"])),
                str(item.get("problem", "")), tuple(str(r) for r in item.get("rejections", ())))
        return outcomes, int(data.get("confirm_after", 0))
    except (ValueError, TypeError, KeyError, AttributeError):
        logger.warning("event=admin-keys-state-unreadable")
        return {}, 0


def load_outcomes(raw: str) -> dict[str, AccountOutcome]:
    """The stored outcomes by account (see :func:`load_state`)."""
    return load_state(raw)[0]


def status_lines(raw: str, when: Callable[[float], str]) -> list[str]:
    """``nodemanager status`` lines: one per managed account (none when the handler never ran)."""
    outcomes, confirm_after = load_state(raw)
    lines = []
    for name, outcome in sorted(outcomes.items()):
        if outcome.problem:
            lines.append(f"ADMIN KEYS:     {name}: {outcome.problem}")
        elif outcome.hold is not None:
            lines.append(f"ADMIN KEYS:     {name}: removal of all {outcome.hold.count} key(s) HELD (seen in "
                         f"{outcome.hold.seen} of {confirm_after} consecutive documents needed)")
        else:
            lines.append(f"admin keys:     {name}: {outcome.keys} key(s) in the block, "
                         f"last changed {when(outcome.changed_at)}")
        for rejection in outcome.rejections:
            lines.append(f"                {name}: rejected {rejection}")
    return lines


def gauge_values(raw: str) -> dict[str, tuple[int, int, int]]:
    """``account -> (keys in the block, keys held for removal, 1 if a problem else 0)``."""
    return {name: (o.keys, o.hold.count if o.hold else 0, 1 if o.problem else 0)
            for name, o in load_outcomes(raw).items()}
