"""A model of the kernel objects resource enforcement manages, for tests and the crash simulation.

* :mod:`.cgroupfs`: :class:`CgroupHost`, cgroupfs in the v1, hybrid or v2 layout;
* :mod:`.net`: tc (HTB qdiscs and classes), nftables, ``ip``;
* :mod:`.disk`: sparse images, loop devices, loop mounts, what runs as the sliver in its home;
* :mod:`.ipc`: SysV IPC objects;
* :mod:`.host`: :class:`KernelHost`, all of it on one fake machine.
"""

from .cgroupfs import HYBRID, LAYOUTS, V1, V2, CgroupHost
from .host import KernelHost
from .net import Unmodelled

__all__ = ["HYBRID", "LAYOUTS", "V1", "V2", "CgroupHost", "KernelHost", "Unmodelled"]
