"""Resource isolation: make each sliver's effective RSpec real (cgroups, HTB + nftables, disk).

``EnforcementSet`` (enforce/set.py) is what the daemon holds; the enforcers implement the
``Enforcer`` port of enforce/base.py; the arithmetic lives in ``core.allocation``.
"""

from .base import Enforcer
from .set import EnforcementSet

__all__ = ["EnforcementSet", "Enforcer"]
