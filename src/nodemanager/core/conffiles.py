"""Configuration files (GetSlivers ``conf_files``): validation, confinement, the step plan.

The authority names files the node installs as root, and commands it runs as root around them.
Everything here decides, nothing acts (the adapter is :mod:`nodemanager.conffiles`):

* :func:`validate_entries` checks each entry where it enters; a bad entry is refused with its
  reason and nothing of it is used, while the others proceed. ``enabled: false`` entries are
  skipped. At most :data:`MAX_ENTRIES` entries are taken; the rest are refused.
* :func:`confine_dest` is the destination rule: ``dest`` must be absolute, already normalised
  (no ``.``, ``..``, empty components or trailing ``/``), and strictly inside one of
  ``conf_files.allowed_dirs``. It returns the allowed directory (the most specific one) and the
  components below it, which the adapter walks without following any link.
* :func:`needs_install`, :func:`install_steps` and :func:`after_failure` are the plan: a file
  whose content, owner, group and mode already match is left alone and no command runs (unless
  ``always_update``); otherwise ``preinstall_cmd``, the write, ``postinstall_cmd``. A failed
  pre-install command runs ``error_cmd`` and gives the entry up unless ``ignore_cmd_errors``.

Permissions are octal strings as PLC sends them ("644"), at most ``0o7777``; setuid and setgid
bits are refused (a configuration file has no business being a privileged program, and a
compromised authority should not be able to plant one in one step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

#: The most entries one document may carry; later ones are refused (a real node has ~30).
MAX_ENTRIES = 256
#: The largest file fetched; a bigger source is refused and the installed file left alone.
MAX_FILE_BYTES = 16 << 20
#: Longest command, path and source accepted.
MAX_COMMAND_CHARS = 4096
MAX_PATH_CHARS = 4096
MAX_SOURCE_CHARS = 1024
_MAX_COMPONENT_BYTES = 255
#: Refused permission bits: setuid and setgid.
FORBIDDEN_MODE_BITS = 0o6000

#: useradd's default NAME_REGEX (with the optional trailing ``$`` of machine accounts).
_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}\$?")
_MODE = re.compile(r"[0-7]{1,4}")
#: A source path (and optional query) below the base URL: printable ASCII, no spaces, no
#: backslash, no fragment.
_SOURCE = re.compile(r"[A-Za-z0-9._~/%!$&'()*+,;=:@?-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class EntryState(str, Enum):
    """What became of one entry (``status``, the ``nodemanager_conf_files`` gauge)."""

    INSTALLED = "installed"
    UNCHANGED = "unchanged"
    REFUSED = "refused"
    FAILED = "failed"
    DISABLED = "disabled"


class StepKind(str, Enum):
    PREINSTALL = "preinstall_cmd"
    WRITE = "write"
    POSTINSTALL = "postinstall_cmd"


@dataclass(frozen=True, slots=True)
class Step:
    kind: StepKind
    command: str = ""


@dataclass(frozen=True, slots=True)
class FailurePolicy:
    """What to do when a step fails: run ``error_cmd`` (when non-empty), then go on or stop."""

    run_error_cmd: bool
    proceed: bool


@dataclass(frozen=True, slots=True)
class Confined:
    """A destination inside an allowed directory: ``root`` (normalised, absolute) and the
    components below it (at least one; the last is the file name)."""

    root: str
    parts: tuple[str, ...]

    @property
    def dest(self) -> str:
        return self.root + "/" + "/".join(self.parts)


@dataclass(frozen=True, slots=True)
class ConfFile:
    """A validated entry."""

    dest: Confined
    source: str
    owner: str
    group: str
    mode: int
    preinstall_cmd: str = ""
    postinstall_cmd: str = ""
    error_cmd: str = ""
    ignore_cmd_errors: bool = False
    always_update: bool = False


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """One entry's outcome. ``dest`` is a printable label: for a refused entry nothing of it is
    trusted, so it is a sanitised, shortened hint."""

    dest: str
    state: EntryState
    reason: str = ""


@dataclass(frozen=True, slots=True)
class InstalledFile:
    """What is at the destination now: ``content`` is None when it is not a regular file or is
    bigger than the fetch cap."""

    uid: int
    gid: int
    mode: int
    content: bytes | None


@dataclass(frozen=True, slots=True)
class Validated:
    entries: tuple[ConfFile, ...]
    outcomes: tuple[EntryOutcome, ...]  # refused and disabled entries


# --- paths ---------------------------------------------------------------------------------
def normalise_dir(path: str) -> tuple[str, ...] | None:
    """The components of an allowed directory (``//`` and ``.`` dropped, trailing ``/`` ignored);
    None when it is not absolute, is ``/``, or has a ``..``."""
    if not path.startswith("/"):
        return None
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if not parts or ".." in parts:
        return None
    return parts


def confine_dest(dest: object, allowed_dirs: Sequence[str]) -> Confined | str:
    """``dest`` inside the most specific allowed directory, or the reason it is refused."""
    if not isinstance(dest, str):
        return f"dest must be a string, not {_type(dest)}"
    if not dest or len(dest) > MAX_PATH_CHARS:
        return f"dest must be 1-{MAX_PATH_CHARS} characters"
    if _CONTROL.search(dest):
        return "dest contains control characters"
    if not dest.startswith("/"):
        return "dest must be an absolute path"
    parts = dest.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        return "dest must be a normalised path (no '.', '..', '//' or trailing '/')"
    if any(len(p.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT_BYTES for p in parts):
        return f"dest has a component longer than {_MAX_COMPONENT_BYTES} bytes"
    best: tuple[str, ...] | None = None
    for allowed in allowed_dirs:
        root = normalise_dir(allowed)
        if root is None or len(parts) <= len(root) or tuple(parts[:len(root)]) != root:
            continue
        if best is None or len(root) > len(best):
            best = root
    if best is None:
        return "dest is not inside conf_files.allowed_dirs"
    return Confined("/" + "/".join(best), tuple(parts[len(best):]))


def source_url(base_url: str, source: str, node_id: int | None) -> str:
    """Where ``source`` is fetched: below ``base_url``, with ``node_id`` appended as the original
    did (PLC's scripts use it to tailor the file)."""
    url = base_url.rstrip("/") + "/" + source.lstrip("/")
    if node_id is not None:
        url += ("&" if "?" in source else "?") + f"node_id={int(node_id)}"
    return url


def _check_source(source: object) -> str | None:
    if not isinstance(source, str):
        return f"source must be a string, not {_type(source)}"
    if not source or len(source) > MAX_SOURCE_CHARS or not _SOURCE.fullmatch(source):
        return f"source must be 1-{MAX_SOURCE_CHARS} printable URL characters without spaces or '#'"
    path = source.split("?", 1)[0]
    if "://" in source or source.startswith("//") or ".." in path.split("/"):
        return "source must be a path below conf_files.base_url (no scheme, '//' prefix or '..')"
    return None


# --- values --------------------------------------------------------------------------------
def _type(value: object) -> str:
    return "nil" if value is None else type(value).__name__


def parse_mode(value: object) -> int | str:
    """``file_permissions`` ("644", "0644") -> the mode, or the reason it is refused."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"file_permissions must be an octal string, not {_type(value)}"
    text = str(value).strip()
    if not _MODE.fullmatch(text):
        return f"file_permissions {text[:16]!r} is not an octal mode of at most 4 digits (<= 7777)"
    mode = int(text, 8)
    if mode & FORBIDDEN_MODE_BITS:
        return f"file_permissions {text} has setuid/setgid bits: refused"
    return mode


def _flag(entry: Mapping[str, Any], key: str, default: bool) -> bool | str:
    value = entry.get(key)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return f"{key} must be a boolean, not {_type(value)}"


def _command(entry: Mapping[str, Any], key: str) -> str:
    """The command (nil/absent -> ""); raises ValueError with the reason when it is refused."""
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, not {_type(value)}")
    if len(value) > MAX_COMMAND_CHARS or "\x00" in value:
        raise ValueError(f"{key} must be at most {MAX_COMMAND_CHARS} characters without NUL")
    return value.strip()


def _name(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"{key} must be an account or group name, not {_hint(value)}")
    return value


def _hint(value: object, limit: int = 60) -> str:
    """A printable, shortened rendering of an untrusted value, for reasons and labels."""
    text = value if isinstance(value, str) else _type(value)
    text = _CONTROL.sub("?", text)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def entry_label(index: int, entry: object) -> str:
    """A printable label for an entry: its dest when it is a printable string, else its index."""
    dest = entry.get("dest") if isinstance(entry, Mapping) else None
    if isinstance(dest, str) and dest and not _CONTROL.search(dest) and len(dest) <= 200:
        return dest
    return f"#{index}" + (f" {_hint(dest, 40)}" if isinstance(dest, str) else "")


def validate_entry(entry: object, allowed_dirs: Sequence[str]) -> ConfFile | str | None:
    """One entry: the validated value, the reason it is refused, or None when it is disabled."""
    if not isinstance(entry, Mapping):
        return f"entry must be a struct, not {_type(entry)}"
    enabled = _flag(entry, "enabled", True)
    if isinstance(enabled, str):
        return enabled
    if not enabled:
        return None
    dest = confine_dest(entry.get("dest"), allowed_dirs)
    if isinstance(dest, str):
        return dest
    problem = _check_source(entry.get("source"))
    if problem:
        return problem
    mode = parse_mode(entry.get("file_permissions"))
    if isinstance(mode, str):
        return mode
    flags = {key: _flag(entry, key, False) for key in ("ignore_cmd_errors", "always_update")}
    bad = next((v for v in flags.values() if isinstance(v, str)), None)
    if bad is not None:
        return bad
    try:
        return ConfFile(
            dest=dest, source=entry["source"], owner=_name(entry, "file_owner"), group=_name(entry, "file_group"),
            mode=mode, preinstall_cmd=_command(entry, "preinstall_cmd"),
            postinstall_cmd=_command(entry, "postinstall_cmd"), error_cmd=_command(entry, "error_cmd"),
            ignore_cmd_errors=bool(flags["ignore_cmd_errors"]), always_update=bool(flags["always_update"]),
        )
    except ValueError as exc:
        return str(exc)


def validate_entries(raw: object, allowed_dirs: Sequence[str]) -> Validated:
    """Every entry of the ``conf_files`` member: the valid ones (in order), and an outcome for
    each refused or disabled one. A later entry naming the same dest as an earlier valid one is
    refused (the files would fight each other at every sync)."""
    if not isinstance(raw, (list, tuple)):
        return Validated((), (EntryOutcome("conf_files", EntryState.REFUSED,
                                           f"conf_files must be an array, not {_type(raw)}"),))
    entries: list[ConfFile] = []
    outcomes: list[EntryOutcome] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        label = entry_label(index, entry)
        if index >= MAX_ENTRIES:
            outcomes.append(EntryOutcome(label, EntryState.REFUSED, f"beyond the {MAX_ENTRIES}-entry cap"))
            continue
        result = validate_entry(entry, allowed_dirs)
        if result is None:
            outcomes.append(EntryOutcome(label, EntryState.DISABLED))
        elif isinstance(result, str):
            outcomes.append(EntryOutcome(label, EntryState.REFUSED, result))
        elif result.dest.dest in seen:
            outcomes.append(EntryOutcome(label, EntryState.REFUSED, "dest already named by an earlier entry"))
        else:
            seen.add(result.dest.dest)
            entries.append(result)
    return Validated(tuple(entries), tuple(outcomes))


# --- the plan ------------------------------------------------------------------------------
def needs_install(entry: ConfFile, fetched: bytes, installed: InstalledFile | None, uid: int, gid: int) -> bool:
    """False when the installed file already is what the entry asks for (same content, owner,
    group and mode) and the entry does not ask ``always_update``."""
    if entry.always_update or installed is None or installed.content is None:
        return True
    return (installed.content, installed.uid, installed.gid, installed.mode) != (fetched, uid, gid, entry.mode)


def install_steps(entry: ConfFile) -> tuple[Step, ...]:
    """The steps of an install, in order; empty commands are left out."""
    steps = [Step(StepKind.PREINSTALL, entry.preinstall_cmd)] if entry.preinstall_cmd else []
    steps.append(Step(StepKind.WRITE))
    if entry.postinstall_cmd:
        steps.append(Step(StepKind.POSTINSTALL, entry.postinstall_cmd))
    return tuple(steps)


def after_failure(entry: ConfFile, step: StepKind) -> FailurePolicy:
    """A failed command runs ``error_cmd``; then, unless ``ignore_cmd_errors``, the entry fails:
    after ``preinstall_cmd`` nothing is written, after ``postinstall_cmd`` the file stays
    installed but the entry is reported failed. A failed write stops with no command (nothing
    changed, as the original did). ``proceed``: go on, and count the entry a success."""
    if step is StepKind.WRITE:
        return FailurePolicy(run_error_cmd=False, proceed=False)
    return FailurePolicy(run_error_cmd=bool(entry.error_cmd), proceed=entry.ignore_cmd_errors)


def count_states(outcomes: Sequence[EntryOutcome]) -> dict[str, int]:
    """Entries per state (every state present, zero included)."""
    counts = {state.value: 0 for state in EntryState}
    for outcome in outcomes:
        counts[outcome.state.value] += 1
    return counts
