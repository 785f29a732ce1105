"""Who may call which API method: the method table and one pure decision function.

Why one table and one function: the original node manager checked roles in each method body, and
the checks drifted apart (a method forgot the controller case, another compared names it never
validated). Here the API's public surface is declared once in :data:`METHODS` (name, arguments,
role rule) and every call is judged by :func:`decide`, which does no I/O: the transport establishes
the caller's uid from the kernel, the API turns it into a :class:`Caller` with the store and the
password database, and only then asks this module. The roles are those of api.md's method table:

* ``ANYONE``: every caller, even one with no identity;
* ``LOCAL_ACCOUNT``: root or any caller with an entry in the password database;
* ``CONTROLLER_ACCOUNT``: root or a caller whose account is an ``nm-controller`` sliver;
* ``SLIVER``: root, the target sliver itself ("self"), or its controller: the caller's account is
  an ``nm-controller`` sliver and the target is a ``delegated`` sliver whose record names it;
* ``SLIVER_READ``: as ``SLIVER``, or an **observer** (the seed's ``del_snoop``, "allowed to spy
  on everyone's RSpec"): a caller whose sliver record carries ``nm_observer = 1`` from the
  authority, or a local account named in ``api.observers``. Observers may also call the
  ``LOCAL_ACCOUNT`` methods; every other method stays denied to them (they change state).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .records import DELEGATED, Sliver


@dataclass(frozen=True, slots=True)
class Caller:
    """The caller of one request, as far as the node knows it.

    Built by the API from the kernel's uid (never from the request): ``uid`` is None when the
    transport could not establish one (such a caller may use only ``ANYONE`` methods).
    """

    uid: int | None
    #: uid == 0.
    is_root: bool
    #: The uid has an entry in the password database.
    local_account: bool
    #: The sliver whose account (created by the node manager) has this uid.
    sliver: str | None
    #: That sliver's instantiation is ``nm-controller``.
    is_controller: bool
    #: Read-only access to every sliver: the caller's sliver record is an observer's
    #: (``Sliver.is_observer``), or its account is named in ``api.observers``.
    is_observer: bool = False

    def describe(self) -> str:
        """A short, secret-free description for denial messages and logs."""
        if self.uid is None:
            return "a caller with no identity"
        if self.is_root:
            return "root"
        if self.sliver is not None:
            kind = "controller sliver" if self.is_controller else "sliver"
            if self.is_observer:
                kind = f"observer {kind}"
            return f"uid {self.uid} ({kind} {self.sliver})"
        if self.is_observer:
            return f"uid {self.uid} (an observer local account)"
        if self.local_account:
            return f"uid {self.uid} (a local account that is no sliver)"
        return f"uid {self.uid} (no local account)"


#: The caller nobody knows (a non-loopback TCP peer, an owner the kernel could not tell).
ANONYMOUS = Caller(uid=None, is_root=False, local_account=False, sliver=None, is_controller=False)


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`; ``reason`` says which rule allowed or denied the call."""

    allowed: bool
    reason: str


class Role(str, Enum):
    """Who may call a method (api.md, column "allowed")."""

    ANYONE = "anyone"
    LOCAL_ACCOUNT = "root, or any local account"
    CONTROLLER_ACCOUNT = "root, or an nm-controller sliver's account"
    SLIVER = "the sliver itself, root, or the sliver's controller"
    SLIVER_READ = "the sliver itself, root, the sliver's controller, or an observer"


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """One API method: its XML-RPC argument names, its role rule, and whether it applies only to
    ``delegated`` slivers (Create, Destroy: the authority owns the others' lifetime)."""

    name: str
    args: tuple[str, ...]
    role: Role
    delegated_only: bool = False

    @property
    def takes_sliver(self) -> bool:
        """The first argument is a sliver name (checked, and looked up, before authorization)."""
        return self.args[:1] == ("sliver",)

    @property
    def observable(self) -> bool:
        """An observer may call it (it changes nothing)."""
        return self.role in (Role.LOCAL_ACCOUNT, Role.SLIVER_READ)


#: The API's public surface, in Help() order. Declared once; ``api.methods`` dispatches from it
#: and a test pins it against api.md.
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("Help", (), Role.ANYONE),
        MethodSpec("GetXIDs", (), Role.LOCAL_ACCOUNT),
        MethodSpec("GetSSHKeys", (), Role.LOCAL_ACCOUNT),
        MethodSpec("Ticket", ("ticket",), Role.CONTROLLER_ACCOUNT),
        MethodSpec("Create", ("sliver",), Role.SLIVER, delegated_only=True),
        MethodSpec("Destroy", ("sliver",), Role.SLIVER, delegated_only=True),
        MethodSpec("Start", ("sliver",), Role.SLIVER),
        MethodSpec("Stop", ("sliver",), Role.SLIVER),
        MethodSpec("GetRSpec", ("sliver",), Role.SLIVER_READ),
        MethodSpec("GetEffectiveRSpec", ("sliver",), Role.SLIVER_READ),
        MethodSpec("GetLoans", ("sliver",), Role.SLIVER_READ),
        MethodSpec("SetLoans", ("sliver", "loans"), Role.SLIVER),
    )
}


#: What an observer may call, for every sliver (api.md "Observer"): the methods that change nothing.
OBSERVER_METHODS: tuple[str, ...] = tuple(name for name, spec in METHODS.items() if spec.observable)


def is_controller_of(caller: Caller, target: Sliver) -> bool:
    """The caller's account is an nm-controller sliver that the delegated ``target`` names."""
    return (
        caller.is_controller
        and caller.sliver is not None
        and target.instantiation == DELEGATED
        and target.controller == caller.sliver
    )


def decide(caller: Caller, method: str, target: Sliver | None) -> Decision:
    """May ``caller`` call ``method`` on ``target``?

    ``target`` is the record of the sliver named by the first argument (None for methods that take
    no sliver; a sliver method without a target is denied: the API looks the record up first and
    answers an unknown sliver with its own fault). Total and pure: an unknown method is denied,
    never an exception.
    """
    spec = METHODS.get(method)
    if spec is None:
        return Decision(False, f"unknown method {method[:64]!r}")
    role = spec.role
    what = f"{method}({target.name})" if spec.takes_sliver and target is not None else method
    if role is Role.ANYONE:
        return Decision(True, "allowed to anyone")
    if caller.uid is None:
        return Decision(False, f"{what} is allowed to {role.value}; the caller has no identity")
    if caller.is_root:
        return Decision(True, "root")
    if role is Role.LOCAL_ACCOUNT:
        if caller.local_account:
            return Decision(True, "a local account")
        if caller.is_observer:
            return Decision(True, "observer")
    elif role is Role.CONTROLLER_ACCOUNT:
        if caller.is_controller and caller.sliver is not None:
            return Decision(True, f"nm-controller sliver {caller.sliver}")
    elif target is None:
        return Decision(False, f"{method} needs a target sliver")
    elif caller.sliver is not None and caller.sliver == target.name:
        return Decision(True, "self")
    elif is_controller_of(caller, target):
        return Decision(True, f"controller of {target.name}")
    elif role is Role.SLIVER_READ and caller.is_observer:
        return Decision(True, "observer")
    reason = f"{what} is allowed to {role.value}; the caller is {caller.describe()}"
    if caller.is_observer and not spec.observable:
        reason += f"; observers may call only {', '.join(OBSERVER_METHODS)}"
    return Decision(False, reason)
