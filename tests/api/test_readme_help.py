"""The README's API section shows exactly what Help() answers."""

from __future__ import annotations

from pathlib import Path

from nodemanager.api.methods import help_text

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_help_block_equals_help() -> None:
    text = README.read_text()
    block = text.split("<!-- help-text -->\n", 1)[1].split("```", 2)[1]
    assert block.split("\n", 1)[1].rstrip("\n") == help_text().rstrip("\n")
