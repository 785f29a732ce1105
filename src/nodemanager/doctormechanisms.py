"""The doctor's checks of the enforcement mechanisms and of sshd (``docs/doctor.md``).

Enforcement: ``EnforcementSet.from_config(...).probe()``, the daemon's own start-up probe, run over
a :class:`~nodemanager.hostreadonly.ReadOnlyHost` so that what it would prepare (parent cgroups,
controllers enabled in ``cgroup.subtree_control``, the images directory) is reported, not done.
Its ``describe()`` and ``problems()`` become one line per resource. sshd: ``sshd_problems`` (the
daemon's ``sshd -T -C user=...``) for an existing sliver account; before the first one exists,
``sshd -T`` must parse and the ``Match Group`` block must be installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backends.sshdconfig import SSHD, sshd_problems
from .config import Config
from .core.doctor import Check, Severity
from .core.errors import BackendError
from .enforce.cgroups import CgroupTree, Hierarchy, detect_hierarchies
from .enforce.set import EnforcementSet
from .hostreadonly import ReadOnlyHost

__all__ = ["keys_dir_check", "mechanism_checks", "sshd_check"]

#: Where the node's sshd drop-in is looked for before any sliver account exists.
SSHD_CONFIG_FILES = (Path("/etc/ssh/sshd_config.d/nodemanager.conf"), Path("/etc/ssh/sshd_config"))
_CGROUP_FIX = ("mount a cgroup hierarchy offering it (v2: list it in the parent's cgroup.subtree_control; "
               "v1: mount -t cgroup -o CONTROLLER), or turn the resource off in [enforce]")
_FIXES = {
    "cpu": _CGROUP_FIX, "memory": _CGROUP_FIX, "pids": _CGROUP_FIX, "cpuset": _CGROUP_FIX,
    "bandwidth": "install iproute2 and nftables (apt install iproute2 nftables), run as root, "
                 "and set [enforce] uplink if there is no default route",
    "disk": "for quotas: mount slivers.home_root with usrquota and install quota; for loop images: "
            "install e2fsprogs and util-linux, and make sure node.data_dir/images can be created",
    "placement": "run the daemon as root in the initial network namespace, on a kernel with "
                 "CONFIG_PROC_EVENTS (else logins join their groups only at the periodic sweep)",
}
#: Enforced resources: unavailable while enabled is a FAIL; the derived ones (pids, cpuset) a WARN.
_CONFIGURED = ("cpu", "memory", "bandwidth", "disk")


def _hierarchy_of(found: list[Hierarchy], controller: str) -> Hierarchy | None:
    """Where ``controller`` would be driven (the tree's own choice; the freezer: v1's, else v2)."""
    if controller == "freezer":
        return _freezer(found)
    return CgroupTree(None, [controller], hierarchies=found).hierarchy_for(controller)  # type: ignore[arg-type]


def _describe_hierarchies(found: list[Hierarchy], controllers: list[str]) -> str:
    versions = frozenset(h.version for h in found)
    mode = {frozenset({1}): "v1", frozenset({2}): "v2", frozenset({1, 2}): "hybrid v1+v2"}.get(versions, "none mounted")
    placed = []
    for controller in controllers:
        h = _hierarchy_of(found, controller)
        placed.append(f"{controller} {'v' + str(h.version) if h else 'MISSING'}")
    v2 = next((h for h in found if h.version == 2), None)
    tracking = f"; v2 at {v2.mount} tracks processes" if v2 is not None else ""
    return f"{mode}: {', '.join(placed)}{tracking}"


def _freezer(found: list[Hierarchy]) -> Hierarchy | None:
    """v1's freezer hierarchy, else any v2 one (``cgroup.freeze`` is in every v2 group)."""
    return next((h for h in found if h.version == 1 and "freezer" in h.controllers),
                next((h for h in found if h.version == 2), None))


def mechanism_checks(config: Config, host: ReadOnlyHost, *, hollow: bool) -> list[Check]:
    """``cgroups``, one ``enforce.RESOURCE`` line per resource, ``placement``, ``tc``, ``nftables``."""
    found = detect_hierarchies(host)  # type: ignore[arg-type]
    e = config.enforce
    wanted = [c for c, on in (("cpu", e.cpu), ("memory", e.memory)) if on]
    wanted += (["cpuset"] if e.cpu else []) + (["pids", "freezer"] if wanted else [])
    if hollow:
        return [Check.ok("cgroups", _describe_hierarchies(found, ["cpu", "memory", "pids", "freezer"])
                         + "; not used by the hollow backend"),
                Check.ok("enforcement", "none: the hollow backend creates nothing to enforce")]
    enforcement = EnforcementSet.from_config(config, host)  # type: ignore[arg-type]
    enforcement.probe()
    mechanisms = enforcement.describe()
    problems: dict[str, list[str]] = {}
    for problem in enforcement.problems():
        name, _, reason = problem.partition(": ")
        problems.setdefault(name, []).append(reason)
    mounts = {h.mount for h in found}
    cgroup_would = [w for w in host.would if any(str(m) in w for m in mounts)]
    other_would = [w for w in host.would if w not in cgroup_would]
    checks = [_cgroup_line(found, wanted, cgroup_would)]
    for resource in ("cpu", "memory", "pids", "cpuset", "bandwidth", "disk"):
        if resource in mechanisms:
            detail = mechanisms[resource]
            if resource == "disk":
                checks.append(_disk_line(host, detail, other_would))
                continue
            checks.append(Check.ok(f"enforce.{resource}", detail))
        elif resource in problems:
            reason = "; ".join(problems[resource])
            if "not enforced" in reason:
                checks.append(Check.warn(f"enforce.{resource}", reason,
                                         f"set [enforce] {resource} = true to limit the slivers' {resource}"
                                         if resource in _CONFIGURED else "set [enforce] cpu or memory = true"))
            else:
                severity = Severity.FAIL if resource in _CONFIGURED else Severity.WARN
                checks.append(Check(f"enforce.{resource}", severity, reason, _FIXES[resource]))
    if "placement" in problems:
        checks.append(Check.warn("placement", "; ".join(problems["placement"]), _FIXES["placement"]))
    elif "placement" in mechanisms:
        checks.append(Check.ok("placement", mechanisms["placement"]))
    return [*checks, _tc_line(host, e.bandwidth), _nft_line(host, e.bandwidth)]


def _cgroup_line(found: list[Hierarchy], wanted: list[str], would: list[str]) -> Check:
    detail = _describe_hierarchies(found, wanted or ["cpu", "memory", "pids"])
    if would:
        created = [w for w in would if w.startswith("would create")]
        detail += f"; the first start {', '.join(created) or 'would write'} ({len(would) - len(created)} writes)"
    if not found and wanted:
        return Check.fail("cgroups", "no cgroup file system is mounted",
                          "mount cgroup2 on /sys/fs/cgroup (or v1 hierarchies), or turn cpu and memory off in [enforce]")
    missing = [c for c in wanted if _hierarchy_of(found, c) is None]
    if missing:
        return Check.warn("cgroups", detail, f"provide the {', '.join(missing)} controller(s): {_CGROUP_FIX}")
    return Check.ok("cgroups", detail)


def _disk_line(host: ReadOnlyHost, mechanism: str, would: list[str]) -> Check:
    if mechanism.startswith("image") and host.stat_file(Path("/dev/loop-control")) is None:
        return Check.fail("enforce.disk", f"{mechanism}: no /dev/loop-control, loop images cannot be attached",
                          "load the loop module (modprobe loop) or mount home_root with usrquota")
    return Check.ok("enforce.disk", mechanism + (f"; the first start {', '.join(would)}" if would else ""))


def _tc_line(host: ReadOnlyHost, needed: bool) -> Check:
    severity = Severity.FAIL if needed else Severity.OK
    try:
        version = host.run(["tc", "-V"]).stdout.decode("utf-8", "replace").strip().splitlines()[:1]
    except BackendError as exc:
        return Check("tc", severity, f"tc cannot run ({exc})" + ("" if needed else "; not needed: bandwidth off"),
                     "apt install iproute2")
    htb = _htb(host)
    detail = f"{version[0] if version else 'tc present'}; {htb or 'sch_htb not found'}"
    if not needed:
        return Check.ok("tc", detail + "; not needed: bandwidth off")
    if htb is None:
        return Check.warn("tc", detail, "install a kernel with sch_htb (CONFIG_NET_SCH_HTB), or modprobe sch_htb")
    return Check.ok("tc", detail)


def _htb(host: ReadOnlyHost) -> str | None:
    """Whether the kernel has HTB: loaded (``/sys/module/sch_htb``), built in, or a module."""
    if host.stat_file(Path("/sys/module/sch_htb")) is not None:
        return "HTB in the kernel (sch_htb)"
    modules = Path("/lib/modules") / os.uname().release
    if b"sch_htb" in (host.read_file(modules / "modules.builtin") or b""):
        return "HTB built in"
    if b"sch_htb.ko" in (host.read_file(modules / "modules.dep", limit=16 << 20) or b""):
        return "HTB as a loadable module (sch_htb)"
    return None


def _nft_line(host: ReadOnlyHost, needed: bool) -> Check:
    try:
        out = host.run(["nft", "list", "tables"]).stdout.decode("utf-8", "replace")
    except BackendError as exc:
        return Check("nftables", Severity.FAIL if needed else Severity.OK,
                     f"`nft list tables` failed ({exc})" + ("" if needed else "; not needed: bandwidth off"),
                     "apt install nftables; run as root (the kernel needs nf_tables)")
    count = sum(1 for line in out.splitlines() if line.startswith("table "))
    return Check.ok("nftables", f"nft answers ({count} tables)" + ("" if needed else "; not needed: bandwidth off"))


def sshd_check(config: Config, host: ReadOnlyHost, *, hollow: bool) -> Check:
    if hollow:
        return Check.ok("sshd", "not used by the hollow backend")
    keys_dir, name = Path(config.slivers.keys_dir), config.slivers.group
    fix = ("install packaging/sshd_config.d/nodemanager.conf (for this configuration: "
           f"`Match Group {name}` / `AuthorizedKeysFile {keys_dir}/%u`) in /etc/ssh/sshd_config.d/ and reload sshd")
    group = host.getgrnam(name)
    members = sorted(m for m in (group.members if group else ()) if m.startswith(config.slivers.name_prefix))
    if members:
        problems = sshd_problems(host, members[0], keys_dir)  # type: ignore[arg-type]
        if problems:
            return Check.fail("sshd", "; ".join(problems), fix)
        return Check.ok("sshd", f"for sliver account {members[0]} sshd reads only {keys_dir}/%u (sshd -T)")
    try:
        result = host.run([SSHD, "-T"], check=False)
    except BackendError as exc:
        return Check.fail("sshd", f"sshd cannot be run ({exc})", "apt install openssh-server")
    if result.returncode != 0:
        tail = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        return Check.fail("sshd", f"`sshd -T` failed with status {result.returncode}: {tail[0]}",
                          "fix the sshd configuration (sshd -t says where)")
    wanted = f"match group {name}".split()
    for path in SSHD_CONFIG_FILES:
        text = (host.read_file(path) or b"").decode("utf-8", "replace")
        lines = [line.split() for line in text.lower().splitlines()]
        if wanted in lines and f"{keys_dir}/%u".lower() in text.lower():
            return Check.ok("sshd", f"`Match Group {name}` block in {path}; sshd -T parses; no sliver account "
                            "exists yet to ask sshd about (checked again once one does)")
    return Check.warn("sshd", f"no `Match Group {name}` block with AuthorizedKeysFile {keys_dir}/%u found "
                      f"in {', '.join(map(str, SSHD_CONFIG_FILES))} (no sliver account yet to ask sshd -T about)", fix)


def keys_dir_check(config: Config, host: ReadOnlyHost, *, hollow: bool) -> Check:
    """``slivers.keys_dir`` and every directory above it: root-owned, writable by nobody else
    (sshd's StrictModes refuses keys under a directory another user could change)."""
    if hollow:
        return Check.ok("slivers.keys_dir", "not used by the hollow backend")
    path = Path(config.slivers.keys_dir)
    fix = f"chown root:root and chmod go-w {path} and each directory above it"
    for where in [*reversed(path.parents[:-1]), path]:  # below /: its own safe walk cannot stat /
        info = host.stat_file(where)
        if info is None:
            return Check.ok("slivers.keys_dir", f"{path}: {where} does not exist yet (the first sliver makes it, "
                            "root-owned, 0755)")
        if info.kind == "symlink":
            if info.uid != 0:
                return Check.fail("slivers.keys_dir", f"{where} is a symbolic link owned by uid {info.uid}", fix)
            continue
        if info.kind != "dir":
            return Check.fail("slivers.keys_dir", f"{where} is a {info.kind}, not a directory",
                              f"remove it or choose another slivers.keys_dir than {path}")
        if info.uid != 0 or info.mode & 0o022:
            return Check.fail("slivers.keys_dir", f"{where} is owned by uid {info.uid} with mode "
                              f"{info.mode & 0o7777:o}: sshd (StrictModes) would refuse the keys under it", fix)
    return Check.ok("slivers.keys_dir", f"{path}: root-owned, writable by root only, as is every directory above it")
