"""The one ``HOST:PORT`` parser (``api.tcp``, ``metrics.listen``, ``authority serve --listen``).

``HOST:PORT``, ``[IPV6]:PORT``; ``""`` means "disabled" (None). ``localhost`` is 127.0.0.1. With
``ip_only`` the host must be an IP literal (the API decides loopback-ness from it). Pure.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        """Whether the host is a loopback IP literal (False for a host name)."""
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_host_port(text: str, *, what: str, ip_only: bool = False) -> HostPort | None:
    """Parse ``text``; ``what`` names the setting in error messages (``ConfigError``)."""
    if not text:
        return None
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            raise ConfigError(f"{what} {text!r}: brackets are for IPv6 addresses only")
    elif ":" in host:
        raise ConfigError(f"{what} {text!r}: write an IPv6 address in brackets, e.g. [::1]:812")
    if not colon or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} {text!r}: expected HOST:PORT with a port from 0 to 65535")
    host = "127.0.0.1" if host == "localhost" else host
    if ip_only:
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            raise ConfigError(f"{what} {text!r}: the host must be an IP address or localhost") from exc
    return HostPort(host, int(port))
