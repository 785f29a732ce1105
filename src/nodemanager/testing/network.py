"""Test helper: an uplink to shape, a veth pair whose far end lives in a private network
namespace, made and always removed (with the nftables table enforcement made for it)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def _ip(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)


@contextmanager
def veth_uplink(netns: str, veth: str, peer: str, *, nft_table: str = "nodemanager") -> Iterator[str]:
    """Yield ``veth`` (up, in this namespace) whose peer ``peer`` is in the namespace ``netns``;
    afterwards remove both and the ``inet nft_table`` table. Leftovers of an interrupted earlier
    run of the same names are removed first."""
    _ip("netns", "del", netns)
    _ip("link", "del", veth)
    made = _ip("netns", "add", netns)
    assert made.returncode == 0, made.stderr
    made = _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
    assert made.returncode == 0, made.stderr
    try:
        _ip("link", "set", peer, "netns", netns)
        _ip("link", "set", veth, "up")
        yield veth
    finally:
        _ip("link", "del", veth)
        _ip("netns", "del", netns)
        subprocess.run(["nft", "delete", "table", "inet", nft_table], capture_output=True, check=False)
