"""``nodemanager.core`` stays pure: it imports only standard-library value modules.

The core never reads the clock, logs, or touches files, sockets or processes (style.md,
"Layering"); this test reads the source of every core module and fails on any other import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "nodemanager" / "core"

ALLOWED = frozenset(
    {
        "__future__",
        "re",
        "hashlib",
        "dataclasses",
        "enum",
        "typing",
        "collections",
        "collections.abc",
        "math",
        "itertools",
        "functools",
        "ipaddress",
    }
)

MODULES = sorted(CORE.glob("*.py"))


def forbidden_imports(source: str) -> list[str]:
    """Every import in ``source`` outside the allow-list, as readable strings."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name not in ALLOWED]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module not in ALLOWED:
                    problems.append(f"from {node.module} import ...")
            elif node.level > 1:  # reaches outside core/
                problems.append(f"from {'.' * node.level}{node.module or ''} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in {"__import__", "open", "eval", "exec", "print"}:
                problems.append(f"call to {node.func.id}()")
    return problems


def test_core_has_modules() -> None:
    assert {p.name for p in MODULES} >= {"records.py", "errors.py", "__init__.py"}


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_core_module_imports_only_value_modules(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    "source",
    [
        "import os",
        "import time, re",
        "from subprocess import run",
        "import logging",
        "from .. import config",
        "from ..store import Store",
        "import collections.abc, os.path",
        "__import__('socket')",
        "open('/etc/passwd')",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    assert forbidden_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "import re",
        "from collections.abc import Mapping",
        "from . import records",
        "from .errors import X",
    ],
)
def test_checker_allows_value_modules(source: str) -> None:
    assert forbidden_imports(source) == []
