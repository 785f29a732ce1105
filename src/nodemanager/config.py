"""The TOML configuration: one frozen, typed value with a default for every key (config.md).

Decoding is done by msgspec, which rejects unknown keys and wrong types with an error that names
the key path (``Expected `int`, got `str` - at `$.slivers.workers```); we turn that into a
``ConfigError`` naming the key as ``slivers.workers``. Cross-field checks follow decoding.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from .core.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/nodemanager/nodemanager.toml")


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class NodeSection(_Section):
    data_dir: str = "/var/lib/nodemanager"
    log_file: str = "/var/log/pl_node_mgr.log"


class AuthoritySection(_Section):
    url: str = "https://plc.example.org/PLCAPI/"
    node_id_file: str = "/etc/planetlab/node_id"
    node_key_file: str = "/etc/planetlab/node_key"
    session_file: str = ""
    ticket_cert: str = "/etc/nodemanager/authority.pem"
    ticket_keyring: str = ""
    ca_file: str = ""
    poll_interval: int = 600
    poll_jitter: int = 300
    timeout: int = 30
    #: Seconds a blocking query asks the authority to hold (0: never use them, poll only).
    blocking_wait: int = 300


class SyncSection(_Section):
    max_delete_fraction: float = 0.5
    confirm_after: int = 2


class ApiSection(_Section):
    tcp: str = "127.0.0.1:812"
    unix_socket: str = "/run/nodemanager/api.sock"
    max_request_bytes: int = 1048576
    observers: list[str] = msgspec.field(default_factory=list)


class SliversSection(_Section):
    backend: str = "account"
    home_root: str = "/home"
    shell: str = "/bin/bash"
    name_prefix: str = ""
    delegate_shell: str = ""
    workers: int = 4
    stop_grace: int = 10
    uid_base: int = 100000
    #: Root-owned directory of the authoritative ``authorized_keys`` files, one per account
    #: (sshd: ``AuthorizedKeysFile <keys_dir>/%u`` for members of ``group``). Not in config.md.
    keys_dir: str = "/etc/nodemanager/authorized_keys"
    #: Supplementary group of every sliver account (sshd's ``Match Group``). Not in config.md.
    group: str = "slivers"


class TicketsSection(_Section):
    max_clock_skew: int = 300
    create_on_redeem: bool = False
    max_age: int = 86400


class EnforceSection(_Section):
    cpu: bool = True
    memory: bool = True
    bandwidth: bool = True
    disk: bool = True
    uplink: str = ""


class AccountsSection(_Section):
    manage_keys: list[str] = msgspec.field(default_factory=list)


class ConfFilesSection(_Section):
    enabled: bool = False
    base_url: str = ""
    allowed_dirs: list[str] = msgspec.field(default_factory=list)


class MetricsSection(_Section):
    listen: str = "127.0.0.1:9812"


class BwmonSection(_Section):
    """Daily byte budgets (``bwmon``): node defaults of PLC's ``net_max_kbyte`` and
    ``net_thresh_kbyte``, the period and how often the HTB counters are read. Not in config.md."""

    daily_max_kbyte: int = 0
    daily_thresh_percent: int = 80
    period: int = 86400
    poll_interval: float = 30.0


class Config(_Section, dict=True):
    """The whole configuration. ``explicit`` (not a key, not compared) names the keys the file set.

    ``dict=True`` gives instances a ``__dict__`` for that one undeclared attribute, so that two
    configurations with the same values stay equal however they were written."""

    node: NodeSection = msgspec.field(default_factory=NodeSection)
    authority: AuthoritySection = msgspec.field(default_factory=AuthoritySection)
    sync: SyncSection = msgspec.field(default_factory=SyncSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)
    slivers: SliversSection = msgspec.field(default_factory=SliversSection)
    tickets: TicketsSection = msgspec.field(default_factory=TicketsSection)
    enforce: EnforceSection = msgspec.field(default_factory=EnforceSection)
    accounts: AccountsSection = msgspec.field(default_factory=AccountsSection)
    conf_files: ConfFilesSection = msgspec.field(default_factory=ConfFilesSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)
    bwmon: BwmonSection = msgspec.field(default_factory=BwmonSection)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir)

    @property
    def explicit(self) -> frozenset[str]:
        """The ``section.key`` names the configuration file set, even to their default value.

        Why: a default can mean "not chosen" (``node.log_file``: under systemd the journal is used
        unless the operator set a file, see logsetup). Set by :func:`parse_config` only; a
        ``Config()`` or a ``msgspec.structs.replace`` copy has none."""
        return self.__dict__.get("_explicit", frozenset())


BACKENDS = ("account", "hollow")
_PREFIX = re.compile(r"[a-z][a-z0-9]{0,7}")
_GROUP = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
#: A local account name (useradd's default NAME_REGEX, without the trailing ``$``).
_ACCOUNT = _GROUP
#: uid_base + slice_id must stay a valid uid that XML-RPC's 32-bit ints can carry (GetXIDs).
UID_BASE_MAX = 2**31 - 2**24
_KEY_PATH = re.compile(r"at `\$\.?(?P<path>[^`]*)`")


def _key_of(message: str) -> str:
    match = _KEY_PATH.search(message)
    return match.group("path") if match else ""


def _check(config: Config) -> None:
    """Cross-field and range checks that types alone cannot express."""
    problems: list[tuple[str, str]] = []
    a, s, sl = config.authority, config.sync, config.slivers
    if a.poll_interval < 1:
        problems.append(("authority.poll_interval", "must be at least 1 second"))
    if a.poll_jitter < 0:
        problems.append(("authority.poll_jitter", "must not be negative"))
    if a.timeout < 1:
        problems.append(("authority.timeout", "must be at least 1 second"))
    if not 0 <= a.blocking_wait <= 600:
        problems.append(("authority.blocking_wait", "must be between 0 (poll only) and 600 seconds"))
    if not 0.0 < s.max_delete_fraction <= 1.0:
        problems.append(("sync.max_delete_fraction", "must be in (0, 1]"))
    if s.confirm_after < 1:
        problems.append(("sync.confirm_after", "must be at least 1"))
    if config.api.max_request_bytes < 1024:
        problems.append(("api.max_request_bytes", "must be at least 1024"))
    if sl.backend not in BACKENDS:
        problems.append(("slivers.backend", f"must be one of {', '.join(BACKENDS)}"))
    if sl.name_prefix and not _PREFIX.fullmatch(sl.name_prefix):
        problems.append(("slivers.name_prefix", "must be 1-8 characters of [a-z0-9], starting with a letter"))
    if not 1 <= sl.workers <= 256:
        problems.append(("slivers.workers", "must be between 1 and 256"))
    if sl.stop_grace < 0:
        problems.append(("slivers.stop_grace", "must not be negative"))
    if not sl.home_root.startswith("/"):
        problems.append(("slivers.home_root", "must be an absolute path"))
    if config.tickets.max_clock_skew < 0:
        problems.append(("tickets.max_clock_skew", "must not be negative"))
    if config.tickets.max_age < 1:
        problems.append(("tickets.max_age", "must be at least 1 second"))
    if not 1000 <= sl.uid_base <= UID_BASE_MAX:
        problems.append(("slivers.uid_base", f"must be between 1000 and {UID_BASE_MAX}"))
    if not sl.keys_dir.startswith("/"):
        problems.append(("slivers.keys_dir", "must be an absolute path"))
    if not _GROUP.fullmatch(sl.group):
        problems.append(("slivers.group", "must be a valid group name ([a-z_][a-z0-9_-]{0,31})"))
    if a.ticket_keyring and not a.ticket_keyring.startswith("/"):
        problems.append(("authority.ticket_keyring", "must be an absolute path (or empty: OpenPGP tickets refused)"))
    for key, names in (("api.observers", config.api.observers), ("accounts.manage_keys", config.accounts.manage_keys)):
        bad = [name for name in names if not _ACCOUNT.fullmatch(name)]
        if bad:
            problems.append((key, f"{bad[0]!r} is not a valid account name ([a-z_][a-z0-9_-]{{0,31}})"))
    cf = config.conf_files
    bad_dirs = [d for d in cf.allowed_dirs if not d.startswith("/") or d.rstrip("/") == "" or "/../" in d + "/"]
    if bad_dirs:
        problems.append(("conf_files.allowed_dirs", f"{bad_dirs[0]!r} must be an absolute directory other than / "
                         "with no '..'"))
    if cf.enabled and urlsplit(cf.base_url).scheme not in ("http", "https"):
        problems.append(("conf_files.base_url", "must be an http(s) URL when conf_files.enabled"))
    if cf.enabled and not cf.allowed_dirs:
        problems.append(("conf_files.allowed_dirs", "must name at least one directory when conf_files.enabled"))
    bw = config.bwmon
    if bw.daily_max_kbyte < 0:
        problems.append(("bwmon.daily_max_kbyte", "must not be negative (0: no budget)"))
    if not 0 <= bw.daily_thresh_percent <= 100:
        problems.append(("bwmon.daily_thresh_percent", "must be between 0 and 100"))
    if bw.period < 1:
        problems.append(("bwmon.period", "must be at least 1 second"))
    if not 0.1 <= bw.poll_interval <= bw.period:
        problems.append(("bwmon.poll_interval", "must be between 0.1 seconds and bwmon.period"))
    if problems:
        key, why = problems[0]
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(f"configuration key {key}: {why}{more}")


def parse_config(data: dict[str, Any], origin: str = "<config>") -> Config:
    """Decode a TOML-shaped mapping into a Config, or raise ConfigError naming the key."""
    try:
        config = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        key = _key_of(message)
        if "unknown field" in message.lower():
            field = message.split("`")[1] if "`" in message else "?"
            full = f"{key}.{field}" if key else field
            raise ConfigError(f"{origin}: unknown configuration key {full}") from exc
        raise ConfigError(f"{origin}: configuration key {key or '?'}: {message.split(' - at')[0]}") from exc
    _check(config)
    msgspec.structs.force_setattr(config, "_explicit", frozenset(
        f"{section}.{key}" for section, keys in data.items() if isinstance(keys, dict) for key in keys))
    return config


def load_config(path: Path | None) -> Config:
    """Read the TOML file at ``path``; ``None`` or the default path when absent gives all defaults.

    An explicitly named file that does not exist is an error: an operator who passes ``-c`` means
    that file."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, str(path))


def to_toml(config: Config) -> str:
    """The effective configuration as TOML (``nodemanager config show``)."""
    import tomli_w

    return tomli_w.dumps(msgspec.to_builtins(config))
