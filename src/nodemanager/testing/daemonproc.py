"""Test helpers for running ``nodemanager`` as a separate process against a ``file://`` document.

The daemon tests (clean stop, kill -9 mid-sync, faults) need the same three things: a slivers.json
document the authority URL points at, rewritten between runs; a configuration file naming it and a
node-id file; and ``python -m nodemanager`` run from this source tree (``PYTHONPATH`` set to the
directory holding the package, so the child runs the code under test, not an installed copy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import tomli_w

from .accounts import uid_base_for_tests
from .fakeauthority import stable_slice_id

#: The directory holding the ``nodemanager`` package: the child's ``PYTHONPATH``.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def write_slivers_document(
    path: Path,
    names: Sequence[str],
    timestamp: int,
    *,
    key_template: str | None = None,
    attributes: Mapping[str, str] | None = None,
    first_slice_id: int | None = None,
) -> None:
    """Replace ``path`` atomically with an authority document listing ``names`` (node 1).

    Sliver ``i`` gets slice id ``first_slice_id + i``, or one derived from its name when none is
    given (stable across documents: a sliver's uid derives from it), expires in a day, has the one ssh key
    ``key_template.format(i)`` (none without a template) and ``attributes`` as its tags."""
    slivers = [{
        "name": name, "instantiation": "plc-instantiated",
        "slice_id": stable_slice_id(name) if first_slice_id is None else first_slice_id + i,
        "expires": int(time.time()) + 86400,
        "keys": [] if key_template is None else [{"key_type": "ssh", "key": key_template.format(i)}],
        "attributes": [{"tagname": tag, "value": value} for tag, value in (attributes or {}).items()],
    } for i, name in enumerate(names)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"timestamp": timestamp, "node_id": 1, "slivers": slivers}))
    tmp.replace(path)


def write_daemon_config(
    directory: Path,
    document: Path,
    *,
    slivers: Mapping[str, str | int],
    poll_interval: int = 1,
    unix_socket: str = "",
    enforce: bool | None = False,
) -> Path:
    """Write ``directory/nm.toml`` (and the node-id file it names) for a daemon polling
    ``file://document`` every ``poll_interval`` seconds; return the config's path.

    Data, log and node id live in ``directory``; TCP API and metrics are off; ``unix_socket``
    empty means no Unix API either. ``slivers`` is the ``[slivers]`` table; its ``keys_dir``
    defaults to ``directory/keys`` and its ``uid_base`` to this test process's (a test never
    writes the node's real keys directory). ``enforce=False`` turns every enforcer off, ``None``
    leaves the ``[enforce]`` defaults."""
    (directory / "node_id").write_text("1\n")
    settings: dict[str, object] = {
        "node": {"data_dir": str(directory / "data"), "log_file": str(directory / "nm.log")},
        "authority": {
            "url": f"file://{document}",
            "node_id_file": str(directory / "node_id"),
            "poll_interval": poll_interval,
            "poll_jitter": 0,
        },
        "api": {"tcp": "", "unix_socket": unix_socket},
        "metrics": {"listen": ""},
        "slivers": {"keys_dir": str(directory / "keys"), "uid_base": uid_base_for_tests(), **slivers},
    }
    if enforce is not None:
        settings["enforce"] = {kind: enforce for kind in ("cpu", "memory", "bandwidth", "disk")}
    config = directory / "nm.toml"
    config.write_text(tomli_w.dumps(settings))
    return config


def _argv(config: Path, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "nodemanager", "-c", str(config), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}


def run_nodemanager(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``nodemanager -c CONFIG ARGS...`` to its end; its output captured as text."""
    return subprocess.run(_argv(config, args), env=_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_nodemanager(config: Path, *args: str, discard_output: bool = True) -> subprocess.Popen[bytes]:
    """Start ``nodemanager -c CONFIG ARGS...`` in the background (the caller stops and waits
    for it); its stdout and stderr discarded, or inherited with ``discard_output=False``."""
    output = subprocess.DEVNULL if discard_output else None
    return subprocess.Popen(_argv(config, args), env=_env(), stdout=output, stderr=output)
