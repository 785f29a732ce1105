"""What a distribution checks before taking the package: the licence file matches the declared
licence, the version is written once, and the wheel holds the program without the test helpers."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import nodemanager

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_the_declared_licence() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "BSD-3-Clause"  # an SPDX expression (PEP 639)
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2026, the nodemanager authors" in text
    assert "Neither the name of the copyright holder nor the names of its" in text


def test_version_is_written_once() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "src/nodemanager/__init__.py"


def test_cli_version_is_the_installed_distribution_version() -> None:
    out = subprocess.run([sys.executable, "-m", "nodemanager", "--version"], capture_output=True,
                         text=True, check=True, timeout=60).stdout.strip()
    assert out == f"nodemanager {importlib.metadata.version('nodemanager')}"
    assert out == f"nodemanager {nodemanager.__version__}"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                    reason="hatchling is not installed in this interpreter (pip install -e '.[test]')")
def test_wheel_has_the_program_and_the_licence_but_not_the_test_helpers(tmp_path: Path) -> None:
    # --no-build-isolation: the hatchling installed here, no network needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=240, capture_output=True)
    (wheel,) = tmp_path.glob("nodemanager-*.whl")
    version = importlib.metadata.version("nodemanager")
    assert wheel.name == f"nodemanager-{version}-py3-none-any.whl"
    names = zipfile.ZipFile(wheel).namelist()
    assert "nodemanager/cli.py" in names and "nodemanager/daemon.py" in names
    assert not [n for n in names if n.startswith("nodemanager/testing/")]
    assert f"nodemanager-{version}.dist-info/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"nodemanager-{version}.dist-info/METADATA").decode()
    assert "License-Expression: BSD-3-Clause" in metadata
    # The unit's Documentation= files are installed with the program, under the venv's prefix.
    docs = _unit_documentation()
    assert docs
    for url in docs:
        assert url.startswith(f"file://{VENV}/"), url
        assert f"nodemanager-{version}.data/data/{url.removeprefix(f'file://{VENV}/')}" in names, url


VENV = "/opt/nodemanager/venv"


def _unit_documentation() -> list[str]:
    lines = (ROOT / "packaging" / "nodemanager.service").read_text().splitlines()
    return [u for line in lines if line.startswith("Documentation=")
            for u in line.removeprefix("Documentation=").split()]


def test_unit_runs_the_venv_it_documents() -> None:
    unit = (ROOT / "packaging" / "nodemanager.service").read_text()
    assert f"ExecStart={VENV}/bin/nodemanager " in unit
    assert all(url.startswith("file:///") for url in _unit_documentation())


def test_editable_install_still_imports_the_test_helpers() -> None:
    # The wheel leaves nodemanager.testing out; the editable install (make test) maps src/.
    import nodemanager.testing.backend_contract  # noqa: F401
    import nodemanager.testing.sshd  # noqa: F401
