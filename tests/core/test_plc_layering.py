"""The bundled authority (``nodemanager.plc``) and the node stay two programs.

* Nothing of the node imports ``nodemanager.plc``: not ``nodemanager.authority`` (the node's
  client side) nor any other node module, except the CLI's ``authority`` commands, the demo and
  the shipped test helpers (``nodemanager.testing``).
* ``nodemanager.plc`` uses of the node's code only the protocol both sides speak
  (``nodemanager.authority.{auth,parse,safe_xml}``), the pure ``nodemanager.core``, the shared
  HTTP stack (``nodemanager.http``) and ``nodemanager.host`` (the one place that runs commands:
  the OpenPGP signer runs gpg through it).
* Inside ``plc`` the imports form no circle, and no import hides inside a function (a lazy import
  is the usual way to dodge a circle).

The test reads every module's AST, so an import anywhere in a file (lazy or not) counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "nodemanager"

MAY_IMPORT_PLC = ("nodemanager.plc", "nodemanager.cli", "nodemanager.demo", "nodemanager.testing")
PLC_MAY_USE = ("nodemanager.plc", "nodemanager.core", "nodemanager.authority.auth", "nodemanager.authority.parse",
               "nodemanager.authority.safe_xml", "nodemanager.http", "nodemanager.host")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[str, bool]]:
    """Every ``nodemanager`` module ``path`` imports (see :func:`imports_of`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_of(path.read_text(encoding="utf-8"), package)


def imports_of(source: str, package: str) -> list[tuple[str, bool]]:
    """Every ``nodemanager`` module ``source`` (a module of ``package``) imports, resolved to an
    absolute name, with whether the import sits at module level (``if TYPE_CHECKING:`` blocks
    count as module level)."""
    tree = ast.parse(source)
    top = set()
    for node in tree.body:
        top.add(id(node))
        if isinstance(node, ast.If):
            top.update(id(child) for child in node.body)
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None:  # "from . import x": x may be a module
                found += [(f"{target}.{alias.name}", id(node) in top) for alias in node.names]
            else:
                found.append((target, id(node) in top))
    return [(target, level) for target, level in found if target.split(".")[0] == "nodemanager"]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


MODULES = sorted(PACKAGE.rglob("*.py"))
PLC_MODULES = [p for p in MODULES if within(module_name(p), ("nodemanager.plc",))]


def test_the_packages_exist() -> None:
    names = {module_name(p) for p in PLC_MODULES}
    assert {"nodemanager.plc.server", "nodemanager.plc.model", "nodemanager.plc.issue"} <= names
    assert not (PACKAGE / "authority" / "server.py").exists()


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_the_node_does_not_import_the_bundled_authority(path: Path) -> None:
    if within(module_name(path), MAY_IMPORT_PLC):
        return
    assert [t for t, _ in imported_modules(path) if within(t, ("nodemanager.plc",))] == []


@pytest.mark.parametrize("path", PLC_MODULES, ids=[module_name(p) for p in PLC_MODULES])
def test_the_bundled_authority_uses_only_the_shared_protocol(path: Path) -> None:
    imports = imported_modules(path)
    assert [t for t, _ in imports if not within(t, PLC_MAY_USE)] == []
    assert [t for t, top in imports if not top] == [], "a lazy import inside plc"


def test_no_import_circle_inside_plc() -> None:
    names = {module_name(p) for p in PLC_MODULES}
    graph = {module_name(p): {t for t, _ in imported_modules(p) if t in names and t != module_name(p)}
             for p in PLC_MODULES}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join([*trail, node, target]))
            if target not in state:
                visit(target, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..plc.server import X", [("nodemanager.plc.server", True)]),
        ("def f():\n    from .model import X", [("nodemanager.plc.model", False)]),
        ("from . import waits", [("nodemanager.plc.waits", True)]),
        ("import nodemanager.plc.issue", [("nodemanager.plc.issue", True)]),
        ("import os", []),
    ],
)
def test_the_checker_resolves_imports(source: str, expected: list[tuple[str, bool]]) -> None:
    assert imports_of(source, "nodemanager.plc") == expected
