"""The bundled authority's configuration files: ``[[conf_files]]`` of the data file, their
GetSlivers entries, and their content served over HTTP (``GET /conf_files/<source>``).

In the data file::

    [authority]
    conf_files_dir = "conf_files"   # default; relative to the data file: the served files

    [[conf_files]]
    source = "motd"                 # a file below conf_files_dir
    dest = "/etc/motd"              # where nodes install it (within their conf_files.allowed_dirs)
    file_owner = "root"             # default root
    file_group = "root"             # default root
    file_permissions = "644"        # default "644" (octal, as PLC sends it)
    preinstall_cmd = ""             # shell commands the node runs as root, as PLC's
    postinstall_cmd = ""
    error_cmd = ""
    ignore_cmd_errors = false
    always_update = false
    enabled = true
    nodes = "all"                   # or a list of node ids

Nodes receive ``source = "conf_files/<source>"``: with ``conf_files.base_url`` set to the
authority's root URL (``http://HOST:PORT/``) they fetch it from this server, as real nodes fetch
``PlanetLabConf/...`` from PLC's boot server. The files are public (like slices.xml): never put a
secret in ``conf_files_dir``.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ..core.errors import ConfigError

#: URL path prefix of the served files (and of the sources sent to nodes, without the "/").
URL_PREFIX = "/conf_files/"
DEFAULT_DIR = "conf_files"
MAX_SERVED_BYTES = 16 << 20
_SOURCE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_MODE = re.compile(r"[0-7]{3,4}")
_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


class ConfFileSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    source: str
    dest: str
    file_owner: str = "root"
    file_group: str = "root"
    file_permissions: str = "644"
    preinstall_cmd: str = ""
    postinstall_cmd: str = ""
    error_cmd: str = ""
    ignore_cmd_errors: bool = False
    always_update: bool = False
    enabled: bool = True
    nodes: list[int] | str = "all"


@dataclass(frozen=True, slots=True)
class ConfFileEntry:
    """A validated ``[[conf_files]]`` entry: ``nodes`` None means every node."""

    spec: ConfFileSpec
    nodes: frozenset[int] | None


def valid_source(source: str) -> bool:
    """A relative path of plain names (no ``.``/``..`` components, no ``//``)."""
    return bool(_SOURCE.fullmatch(source)) and not any(p in (".", "..") for p in source.split("/"))


def parse_conf_files(specs: Sequence[ConfFileSpec], node_ids: Mapping[int, object], origin: str) -> tuple[
        ConfFileEntry, ...]:
    """Validate the entries up front (an error names the entry and the field)."""
    entries: list[ConfFileEntry] = []
    for index, spec in enumerate(specs):
        where = f"{origin}: conf_files[{index}] ({spec.dest!r})"
        if not valid_source(spec.source):
            raise ConfigError(f"{where}.source: must be a relative path of names below conf_files_dir")
        if not spec.dest.startswith("/") or _CONTROL.search(spec.dest):
            raise ConfigError(f"{where}.dest: must be an absolute path")
        if not _MODE.fullmatch(spec.file_permissions):
            raise ConfigError(f"{where}.file_permissions: must be an octal mode like \"644\"")
        for key in ("file_owner", "file_group"):
            if not _NAME.fullmatch(getattr(spec, key)):
                raise ConfigError(f"{where}.{key}: must be an account or group name")
        for key in ("preinstall_cmd", "postinstall_cmd", "error_cmd"):
            if _CONTROL.search(getattr(spec, key)):
                raise ConfigError(f"{where}.{key}: contains a control character XML cannot carry")
        if isinstance(spec.nodes, str):
            if spec.nodes != "all":
                raise ConfigError(f"{where}.nodes: must be a list of node ids or \"all\"")
            nodes = None
        else:
            unknown = sorted(set(spec.nodes) - set(node_ids))
            if unknown:
                raise ConfigError(f"{where}.nodes: unknown node id(s) {unknown}")
            nodes = frozenset(spec.nodes)
        entries.append(ConfFileEntry(spec, nodes))
    return tuple(entries)


def conf_files_for(entries: Sequence[ConfFileEntry], node_id: int) -> list[dict[str, Any]]:
    """The GetSlivers ``conf_files`` of ``node_id``, shaped as PLCAPI sends them."""
    out = []
    for number, entry in enumerate(entries, start=1):
        if entry.nodes is not None and node_id not in entry.nodes:
            continue
        spec = entry.spec
        out.append({
            "conf_file_id": number, "enabled": spec.enabled, "source": URL_PREFIX.lstrip("/") + spec.source,
            "dest": spec.dest, "file_owner": spec.file_owner, "file_group": spec.file_group,
            "file_permissions": spec.file_permissions, "preinstall_cmd": spec.preinstall_cmd,
            "postinstall_cmd": spec.postinstall_cmd, "error_cmd": spec.error_cmd,
            "ignore_cmd_errors": spec.ignore_cmd_errors, "always_update": spec.always_update,
        })
    return out


def read_served_file(directory: Path, url_path: str) -> bytes | None:
    """The content for ``GET /conf_files/<source>``: a regular file below ``directory`` reached
    without following any link below it; None when there is no such file (or it is too big)."""
    source = url_path[len(URL_PREFIX):]
    if not url_path.startswith(URL_PREFIX) or not valid_source(source):
        return None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts = source.split("/")
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
        handle = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        try:
            info = os.fstat(handle)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SERVED_BYTES:
                return None
            with os.fdopen(handle, "rb", closefd=False) as stream:
                return stream.read(MAX_SERVED_BYTES)
        finally:
            os.close(handle)
    except OSError:
        return None
    finally:
        os.close(fd)
