"""The configuration contract (config.md): keys, defaults, errors that name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from nodemanager.cli import main
from nodemanager.config import Config, load_config, parse_config, to_toml
from nodemanager.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT.parent / "shared" / "design" / "config.md"


def _contract_text() -> str:
    if DESIGN.exists():
        return DESIGN.read_text()
    return (ROOT / "examples" / "nodemanager.toml").read_text()


def _contract_keys(text: str) -> dict[str, object]:
    """Parse the TOML block of config.md into {section.key: default}."""
    block = text.split("```", 2)[1] if "```" in text else text
    data = tomllib.loads(block)
    return {f"{s}.{k}": v for s, keys in data.items() for k, v in keys.items()}


#: Keys this project adds to config.md's list (README, "Where this deviates").
EXTENSIONS = {
    "slivers.keys_dir": "/etc/nodemanager/authorized_keys",
    "slivers.group": "slivers",
    "bwmon.daily_max_kbyte": 0,
    "bwmon.daily_thresh_percent": 80,
    "bwmon.period": 86400,
    "bwmon.poll_interval": 30.0,
    "authority.blocking_wait": 300,
}


def test_every_contract_key_exists_with_its_default() -> None:
    expected = _contract_keys(_contract_text())
    actual = _contract_keys(to_toml(Config()))
    assert actual == {**expected, **EXTENSIONS}


def test_example_file_equals_defaults() -> None:
    assert load_config(ROOT / "examples" / "nodemanager.toml") == Config()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"slivers": {"workers": "four"}}, "slivers.workers"),
        ({"slivers": {"bogus": 1}}, "slivers.bogus"),
        ({"nonsense": {}}, "nonsense"),
        ({"authority": {"timeout": 1.5}}, "authority.timeout"),
        ({"api": {"tcp": 812}}, "api.tcp"),
        ({"sync": {"max_delete_fraction": 2.0}}, "sync.max_delete_fraction"),
        ({"slivers": {"backend": "vserver"}}, "slivers.backend"),
        ({"slivers": {"name_prefix": "Bad-"}}, "slivers.name_prefix"),
        ({"tickets": {"create_on_redeem": "yes"}}, "tickets.create_on_redeem"),
        ({"slivers": {"uid_base": 10}}, "slivers.uid_base"),
        ({"slivers": {"keys_dir": "keys"}}, "slivers.keys_dir"),
        ({"slivers": {"group": "Bad Group"}}, "slivers.group"),
        ({"tickets": {"max_age": 0}}, "tickets.max_age"),
        ({"accounts": {"manage_keys": ["root", "Bad Name"]}}, "accounts.manage_keys"),
        ({"api": {"observers": ["../x"]}}, "api.observers"),
        ({"authority": {"ticket_keyring": "pubring.gpg"}}, "authority.ticket_keyring"),
        ({"conf_files": {"enabled": True, "allowed_dirs": ["/etc/app"]}}, "conf_files.base_url"),
        ({"conf_files": {"enabled": True, "base_url": "https://plc/boot/"}}, "conf_files.allowed_dirs"),
        ({"conf_files": {"allowed_dirs": ["/etc/../root"]}}, "conf_files.allowed_dirs"),
        ({"conf_files": {"allowed_dirs": ["/"]}}, "conf_files.allowed_dirs"),
        ({"bwmon": {"daily_thresh_percent": 120}}, "bwmon.daily_thresh_percent"),
        ({"bwmon": {"period": 0}}, "bwmon.period"),
        ({"bwmon": {"poll_interval": 0}}, "bwmon.poll_interval"),
        ({"bwmon": {"daily_max_kbyte": -1}}, "bwmon.daily_max_kbyte"),
        ({"authority": {"blocking_wait": -1}}, "authority.blocking_wait"),
        ({"authority": {"blocking_wait": 601}}, "authority.blocking_wait"),
        ({"authority": {"blocking_wait": "300"}}, "authority.blocking_wait"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_config(data)


def test_the_parity_keys_load_when_valid() -> None:
    config = parse_config({
        "authority": {"ticket_keyring": "/etc/planetlab/pubring.gpg"}, "api": {"observers": ["monitor"]},
        "accounts": {"manage_keys": ["root", "site_admin"]},
        "conf_files": {"enabled": True, "base_url": "https://plc.example.org/", "allowed_dirs": ["/etc/app"]},
    })
    assert config.accounts.manage_keys == ["root", "site_admin"] and config.conf_files.enabled


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_show_prints_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nm.toml"
    path.write_text('[slivers]\nworkers = 9\nbackend = "hollow"\n')
    assert main(["-c", str(path), "config", "show"]) == 0
    shown = tomllib.loads(capsys.readouterr().out)
    assert shown["slivers"]["workers"] == 9 and shown["slivers"]["backend"] == "hollow"
    assert shown["authority"]["poll_interval"] == 600


def test_config_error_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nm.toml"
    path.write_text("[slivers]\nworkerz = 9\n")
    assert main(["-c", str(path), "config", "show"]) == 2
    assert "slivers.workerz" in capsys.readouterr().err
