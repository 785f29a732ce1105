"""Growing a sliver's disk image to a larger ``nm_disk_quota``, crash-safely.

Three steps: ``truncate`` the file, ``losetup -c`` so the loop device sees its new size,
``resize2fs`` so the filesystem fills it -- online on the mounted device, else offline (unmount,
``e2fsck -f``, ``resize2fs``, mount) when the home is not in use; online resizing needs
CAP_SYS_RESOURCE, which containers often lack. When neither works, the file is put back to its
old size so that the next apply tries again, and a note says so.

The file is the first thing grown and the filesystem the last, so a daemon killed in between
leaves a file that claims the quota around a filesystem that does not have it; judged by the
file, the image would look grown for ever. So a marker beside the image (``NAME.img.grow``,
root's, 0600) holds the filesystem's old size from before the first step until after the last:
an image found marked was not grown, whatever its file's size (``DiskEnforcer.prepare_home``
grows it again), and the marker goes with the image (sweep, release).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..host import Host

log = logging.getLogger(__name__)

#: Mode of the images and their markers: root's alone.
IMAGE_MODE = 0o600
GROW_SUFFIX = ".grow"


def grow_marker(image: Path) -> Path:
    return image.with_name(image.name + GROW_SUFFIX)


def grow_cut_short(host: Host, image: Path) -> int | None:
    """The filesystem's size (KiB) before a grow of ``image`` that never finished, or None."""
    text = (host.read_file(grow_marker(image)) or b"").decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def grow_image(host: Host, name: str, image: Path, device: str, home: Path, size: int, kib: int) -> list[str]:
    """Grow ``image`` (on loop ``device``, mounted on ``home``) from ``size`` to ``kib`` KiB
    (module docstring); returns notes. Idempotent: a grow cut short is redone from the start."""
    marker = grow_marker(image)
    host.atomic_write(marker, f"{size}\n".encode(), uid=0, gid=0, mode=IMAGE_MODE)
    host.run(["truncate", "-s", f"{kib}K", str(image)])
    host.run(["losetup", "-c", device])
    online = host.run(["resize2fs", device], timeout=300, check=False)
    if online.returncode == 0:
        host.remove_file(marker)
        log.info("event=image_grown sliver=%s kib=%d how=online", name, kib)
        return []
    if host.run(["umount", str(home)], check=False).returncode == 0:
        try:
            host.run(["e2fsck", "-f", "-p", str(image)], timeout=300, check=False)
            host.run(["resize2fs", str(image)], timeout=300)
        finally:
            host.run(["mount", "-o", "loop,nosuid,nodev", str(image), str(home)])
        host.remove_file(marker)
        log.info("event=image_grown sliver=%s kib=%d how=offline", name, kib)
        return []
    host.run(["truncate", "-s", f"{size}K", str(image)])
    host.run(["losetup", "-c", device])
    host.remove_file(marker)
    reason = online.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
    return [(f"sliver {name}: disk image not grown to {kib} KiB yet: online resize refused "
             f"({reason[0]}) and the home is in use")]
