"""The authority's admin keys (GetSlivers ``accounts``): validation, the delimited block, the hold.

A real PLCAPI sends ``accounts: [{name: "root" | "site_admin", keys: ["ssh-rsa ...", ...]}]``.
For each local account ``accounts.manage_keys`` names, the keys go into one delimited block of
that account's ``~/.ssh/authorized_keys``::

    ...the operator's own lines, never touched...
    # BEGIN nodemanager admin keys (from the authority; edit outside this block)
    ssh-ed25519 AAAA... admin@plc
    # END nodemanager admin keys
    ...more operator lines...

Everything here is pure (bytes in, bytes out); :mod:`nodemanager.adminkeys` does the I/O.

* :func:`parse_accounts` validates the untrusted member per item: a malformed entry is dropped
  with its reason and says nothing about its account (it never empties a block); a bad key is
  dropped with its reason and the entry's other keys apply; an entry whose every key is bad is
  dropped as a whole; names not managed are ignored; duplicate keys (same type and blob) collapse.
* :func:`split_keys_file` finds the block(s); :func:`decide_keys` computes the new content.
  Operator lines outside the block are kept byte for byte (only a missing final newline is added
  when a block must follow them). A second block is merged into the first; a block without its
  end marker makes the file untouchable (reported: nobody can tell where it was meant to end).
* **The hold** (the slivers' safety valve, per account): a document that would remove every
  key of a block is held; the removal is applied once the same removal is seen in
  ``confirm_after`` consecutive documents. A document that says nothing about the account (no
  ``accounts`` member, a malformed entry) neither applies nor confirms anything and resets the count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

BEGIN_TAG = "# BEGIN nodemanager admin keys"
END_TAG = "# END nodemanager admin keys"
BEGIN_LINE = BEGIN_TAG + " (from the authority; edit outside this block)"
END_LINE = END_TAG
_BEGIN = BEGIN_TAG.encode()
_END = END_TAG.encode()
#: Surrounding whitespace a PLC key string may carry (a trailing newline is common); never inside.
_KEY_STRIP = " \t\r\n"


@dataclass(frozen=True, slots=True)
class KeyRejection:
    """An entry or a key dropped by validation: where it was and why."""

    label: str
    reason: str


@dataclass(frozen=True, slots=True)
class AccountsStatement:
    """What one document says about the managed accounts.

    ``wanted[name]`` is the validated key list for every managed account the document speaks
    about: its entry's good keys, or ``()`` when a well-formed list has no entry for it. A
    managed account absent from ``wanted`` is one the document says nothing about (no member, a
    malformed member, a malformed entry): its block stays as it is."""

    wanted: Mapping[str, tuple[str, ...]]
    rejections: tuple[KeyRejection, ...] = ()
    ignored: tuple[str, ...] = ()
    #: Why the member as a whole was unusable ("" when it was a list, or absent).
    problem: str = ""


def _describe(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _label(index: int, name: object) -> str:
    if isinstance(name, str) and len(name) <= 64 and name.isprintable():
        return f"accounts #{index} {name!r}"
    return f"accounts #{index}"


def key_identity(key: str) -> str:
    """``type blob`` of a validated key: two lines differing only in their comment are one key."""
    return " ".join(key.split()[:2])


def check_key(value: object, is_key: Callable[[str], bool]) -> tuple[str | None, str]:
    """``(key, "")`` for an acceptable key string (surrounding whitespace removed), else
    ``(None, reason)``. ``is_key`` is the authority parser's one-line OpenSSH key test."""
    if type(value) is not str:
        return None, f"not a string: {_describe(value)}"
    key = value.strip(_KEY_STRIP)
    if BEGIN_TAG in key or END_TAG in key:
        return None, "contains the block marker"
    if not is_key(key):
        return None, f"not a one-line OpenSSH public key: {key[:40]!r}"
    return key, ""


def parse_accounts(value: object, managed: Collection[str], is_key: Callable[[str], bool]) -> AccountsStatement:
    """Validate the document's ``accounts`` member (``None``: absent or nil) per item."""
    if value is None:
        return AccountsStatement(wanted={})
    if not isinstance(value, (list, tuple)):
        return AccountsStatement(wanted={}, problem=f"the accounts member must be an array, not {_describe(value)}")
    rejections: list[KeyRejection] = []
    ignored: list[str] = []
    collected: dict[str, dict[str, str]] = {}
    silenced: set[str] = set()
    for index, entry in enumerate(value):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        label = _label(index, name)
        if not isinstance(entry, Mapping):
            rejections.append(KeyRejection(label, f"an entry must be a struct, not {_describe(entry)}"))
            continue
        if type(name) is not str:
            rejections.append(KeyRejection(label, f"the name must be a string, not {_describe(name)}"))
            continue
        if name not in managed:
            ignored.append(name)
            continue
        keys = entry.get("keys")
        if not isinstance(keys, (list, tuple)):
            rejections.append(KeyRejection(label, f"keys must be an array, not {_describe(keys)}"))
            silenced.add(name)
            continue
        good: dict[str, str] = {}
        for number, raw in enumerate(keys):
            key, reason = check_key(raw, is_key)
            if key is None:
                rejections.append(KeyRejection(f"{label} key #{number}", reason))
            else:
                good.setdefault(key_identity(key), key)
        if keys and not good:
            rejections.append(KeyRejection(label, "every key of the entry is invalid: the entry is ignored"))
            silenced.add(name)
            continue
        merged = collected.setdefault(name, {})
        for identity, key in good.items():
            merged.setdefault(identity, key)
    wanted: dict[str, tuple[str, ...]] = {}
    for name in managed:
        if name in silenced:
            continue  # a malformed entry says nothing, even beside a good one: never guess
        wanted[name] = tuple(collected.get(name, {}).values())
    return AccountsStatement(wanted=wanted, rejections=tuple(rejections), ignored=tuple(ignored))


# --------------------------------------------------------------------------- the file


def _lines(data: bytes) -> list[bytes]:
    """``data`` split after each ``\\n`` (sshd's line end); the last piece may lack one."""
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _marker(line: bytes) -> bytes | None:
    text = line.strip()
    if text.startswith(_BEGIN):
        return _BEGIN
    if text.startswith(_END):
        return _END
    return None


@dataclass(frozen=True, slots=True)
class KeysFile:
    """An ``authorized_keys`` file taken apart: the operator's bytes around the (first) block
    and the keys found in every block. ``keys`` is None when there is no block."""

    before: bytes
    keys: tuple[str, ...] | None
    after: bytes
    #: Blocks found (a second one is merged into the first when the file is rewritten).
    blocks: int = 0
    #: Why the file must not be rewritten ("" when it may be).
    problem: str = ""


def split_keys_file(data: bytes) -> KeysFile:
    """Take ``data`` apart. Lines between markers that are neither blank nor comments are the
    block's keys (as text; undecodable bytes replaced). A stray end marker outside a block is an
    operator line; a begin marker inside a block is dropped with the block."""
    before: list[bytes] = []
    after: list[bytes] = []
    keys: list[str] = []
    blocks = 0
    inside = False
    for line in _lines(data):
        marker = _marker(line)
        if inside:
            if marker == _END:
                inside = False
            elif marker is None:
                text = line.decode("utf-8", "replace").strip()
                if text and not text.startswith("#"):
                    keys.append(text)
            continue
        if marker == _BEGIN:
            inside = True
            blocks += 1
            continue
        (after if blocks else before).append(line)
    if inside:
        return KeysFile(data, None, b"", blocks, "its admin keys block has no end marker; fix the file by hand")
    return KeysFile(b"".join(before), tuple(keys) if blocks else None, b"".join(after), blocks)


def render_block(keys: Sequence[str]) -> bytes:
    """The block holding ``keys`` (validated one-line keys), markers included."""
    return "".join(line + "\n" for line in (BEGIN_LINE, *keys, END_LINE)).encode()


def render_keys_file(parts: KeysFile, keys: Sequence[str]) -> bytes:
    """The file with one block holding ``keys`` where the first block was (at the end when there
    was none), the operator's bytes around it unchanged."""
    before = parts.before
    if before and not before.endswith(b"\n"):
        before += b"\n"
    return before + render_block(keys) + parts.after


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True, slots=True)
class Hold:
    """A held removal of every key of a block: which keys (a digest of the set), how many, and
    in how many consecutive documents it has been seen."""

    digest: str
    count: int
    seen: int


def keys_digest(keys: Collection[str]) -> str:
    """Order-free digest of a key set (by identity)."""
    text = "\n".join(sorted({key_identity(key) for key in keys}))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class KeysDecision:
    """What to do with one account's file for one document."""

    #: The new file content; None to leave the file as it is (nothing to change, or a problem).
    content: bytes | None
    #: The keys in the block once ``content`` is written (or as they stay).
    keys: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: The pending removal of every key, to remember until the next document (None: none).
    hold: Hold | None = None
    #: The removal was held by this very document (log it loudly).
    held_now: bool = False
    problem: str = ""


def decide_keys(current: bytes | None, wanted: tuple[str, ...] | None, hold: Hold | None,
                confirm_after: int) -> KeysDecision:
    """The new content of an account's ``authorized_keys`` for one document.

    ``current``: the file's content (None: no file); ``wanted``: the account's validated keys
    from the document (None: the document says nothing about it); ``hold``: the pending removal
    remembered from the previous document. Idempotent: applying the result again changes nothing."""
    parts = split_keys_file(current or b"")
    present = parts.keys or ()
    if parts.problem:
        return KeysDecision(None, present, problem=parts.problem)
    if wanted is None:
        return KeysDecision(None, present)
    if not wanted and present:
        digest = keys_digest(present)
        seen = hold.seen + 1 if hold is not None and hold.digest == digest else 1
        if seen < max(confirm_after, 1):
            return KeysDecision(None, present, hold=Hold(digest, len(set(map(key_identity, present))), seen),
                                held_now=True)
    identities = {key_identity(key) for key in wanted}
    had = {key_identity(key) for key in present}
    added = tuple(key for key in wanted if key_identity(key) not in had)
    removed = tuple(key for key in present if key_identity(key) not in identities)
    if parts.keys is None and not wanted:
        return KeysDecision(None, ())
    content = render_keys_file(parts, wanted)
    if current is not None and content == current:
        return KeysDecision(None, wanted)
    return KeysDecision(content, wanted, added, removed)


@dataclass(frozen=True, slots=True)
class AccountOutcome:
    """The per-account record ``status`` and metrics show (kept in the store as JSON)."""

    keys: int = 0
    changed_at: float = 0.0
    document: int = 0
    hold: Hold | None = None
    problem: str = ""
    rejections: tuple[str, ...] = ()
