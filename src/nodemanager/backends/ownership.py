"""Whose is it: the rules that keep the account backend from adopting what is not a slice's.

* The name (account or group) and the derived number (as a uid or a gid) must be free before an
  account is made: :func:`refuse_taken`.
* A home that exists before its account is never adopted -- a root-owned ``home_root/NAME`` with
  files in it, another account's tree -- except the leftover of this very slice's own earlier
  account, recognised by its owner: the slice's derived uid, which no other slice ever gets
  (:func:`check_home_free`).
* After ``userdel``, a home is removed only when it is such a leftover: owned by neither root nor a
  live account (:func:`remove_orphan_home`, :func:`orphan_owner`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.errors import AccountConflict
from ..host import Host

logger = logging.getLogger("nodemanager.backends.account")


def refuse_taken(host: Host, name: str, account: str, uid: int, slice_id: int) -> None:
    """``AccountConflict`` when the name, or the derived number as a uid or a gid, is taken."""
    if host.getpwnam(account) is not None:
        raise AccountConflict(f"sliver {name}: account {account!r} already exists and was not created by the "
                              "node manager; it is left untouched")
    if host.getgrnam(account) is not None:
        raise AccountConflict(f"sliver {name}: group {account!r} already exists and was not created by the "
                              "node manager; it is left untouched")
    holder = host.getpwuid(uid)
    if holder is not None:
        raise AccountConflict(f"sliver {name}: its uid {uid} (slice id {slice_id}) is already the uid of account "
                              f"{holder.name!r}; two slices never share a uid")
    group = host.getgrgid(uid)
    if group is not None:
        raise AccountConflict(f"sliver {name}: its uid {uid} (slice id {slice_id}) is already the gid of group "
                              f"{group.name!r}; the sliver's group must get the same number")


def check_home_free(host: Host, name: str, home: Path, uid: int) -> bool:
    """True when ``home`` exists already and may be reused: a directory owned by this
    slice's own uid (its earlier account's leftover). Anything else there is refused: a
    home made before its account is never adopted."""
    info = host.stat_file(home)
    if info is None:
        return False
    if info.kind != "dir":
        raise AccountConflict(f"sliver {name}: home {home} exists and is not a directory; it is left untouched")
    if info.uid != uid:
        owner = host.getpwuid(info.uid)
        who = f"account {owner.name!r}" if owner is not None else f"uid {info.uid}"
        raise AccountConflict(
            f"sliver {name}: home {home} already exists and belongs to {who}, not to this slice's uid {uid}; "
            "a home made before its account is never adopted (remove it to let the sliver be created)")
    logger.warning("sliver=%s event=home-reused home=%s uid=%d", name, home, uid)
    return True


def orphan_owner(host: Host, home: Path) -> int | None:
    """The uid owning ``home`` when it is a leftover of a removed account (owned by neither
    root nor a live account), else None."""
    info = host.stat_file(home)
    if info is None or info.uid == 0 or host.getpwuid(info.uid) is not None:
        return None
    return info.uid


def remove_orphan_home(host: Host, name: str, home: Path) -> None:
    """Remove ``home`` when it is a leftover of a removed account: owned by neither root
    nor a live account (a directory made by someone else is kept)."""
    info = host.stat_file(home)
    if info is None:
        return
    if orphan_owner(host, home) is None:
        owner = host.getpwuid(info.uid)
        logger.warning("sliver=%s event=home-kept home=%s owner=%s", name, home,
                       owner.name if owner is not None else info.uid)
        return
    host.remove_tree(home)
