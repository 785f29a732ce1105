"""`make demo`'s program: slivers appear in the status table, and real demo accounts go on exit."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def demo_accounts() -> set[str]:
    return {p.pw_name for p in pwd.getpwall() if p.pw_name.startswith("demosite_")}


def run_demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "nodemanager.demo", "--seconds", "6", "--workdir", str(tmp_path / "demo"), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def test_demo_hollow_shows_slivers(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "--hollow")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HOLLOW" in result.stdout
    for name in ("site_alpha", "site_beta", "demo_ctrl"):
        assert name in result.stdout
    assert "running" in result.stdout


@pytest.mark.root
def test_demo_real_accounts_appear_and_are_removed(tmp_path: Path) -> None:
    if demo_accounts():
        pytest.skip(f"demo accounts already exist on this machine: {sorted(demo_accounts())}")
    result = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REAL Linux accounts" in result.stdout
    assert "demosite_alpha" in result.stdout  # listed as removed on exit
    table = result.stdout.split("--- sync at", 1)[1]
    assert "site_alpha" in table and "running" in table
    assert demo_accounts() == set()
    # the demo kept its keys and sliver group to itself, and took the group away again
    assert (tmp_path / "demo" / "authorized_keys").is_dir()  # its files went with the accounts
    assert subprocess.run(["getent", "group", "demoslivers"], capture_output=True).returncode != 0
