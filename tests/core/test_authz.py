"""core.authz: every method x every caller role x every target kind, against api.md's role table.

The expected matrix is written out in full below (not derived from the code under test), so a
change to any cell of the role table is a deliberate edit of this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodemanager.core.authz import ANONYMOUS, METHODS, Caller, Decision, Role, decide
from nodemanager.core.records import DELEGATED, NM_CONTROLLER, NOT_INSTANTIATED, PLC_INSTANTIATED, Sliver

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def sliver(name: str, instantiation: str, controller: str = "") -> Sliver:
    return Sliver(name=name, slice_id=1, instantiation=instantiation, expires=2**31 - 1, timestamp=1,
                  controller=controller)


# Controllers X and Y are nm-controller slivers; "other" is an ordinary sliver.
CTL_X, CTL_Y, OTHER = "site_ctlx", "site_ctly", "site_other"

TARGETS: dict[str, Sliver] = {
    "plc": sliver("site_plc", PLC_INSTANTIATED),
    "delegated-x": sliver("site_delx", DELEGATED, controller=CTL_X),
    "delegated-y": sliver("site_dely", DELEGATED, controller=CTL_Y),
    "nm-controller": sliver("site_ctlz", NM_CONTROLLER),
    "not-instantiated": sliver("site_noti", NOT_INSTANTIATED),
}


def sliver_caller(uid: int, name: str, controller: bool) -> Caller:
    return Caller(uid=uid, is_root=False, local_account=True, sliver=name, is_controller=controller)


def self_caller(target: Sliver) -> Caller:
    """The target's own account (a controller if the target is an nm-controller sliver)."""
    return sliver_caller(2000, target.name, target.instantiation == NM_CONTROLLER)


FIXED_CALLERS: dict[str, Caller] = {
    "root": Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False),
    "controller-x": sliver_caller(1001, CTL_X, True),
    "controller-y": sliver_caller(1002, CTL_Y, True),
    "other-sliver": sliver_caller(1003, OTHER, False),
    "local-account": Caller(uid=1004, is_root=False, local_account=True, sliver=None, is_controller=False),
    "no-identity": ANONYMOUS,
}
ROLES = ("root", "self", "controller-x", "controller-y", "other-sliver", "local-account", "no-identity")


def caller_for(role: str, target: Sliver | None) -> Caller:
    if role == "self":
        assert target is not None
        return self_caller(target)
    return FIXED_CALLERS[role]


# --- the expected matrix -------------------------------------------------------------------------
# Methods that take no sliver: role -> allowed (the target is irrelevant; checked with every kind).
NO_TARGET: dict[str, dict[str, bool]] = {
    "Help": {"root": True, "controller-x": True, "controller-y": True, "other-sliver": True,
             "local-account": True, "no-identity": True},
    "GetXIDs": {"root": True, "controller-x": True, "controller-y": True, "other-sliver": True,
                "local-account": True, "no-identity": False},
    "GetSSHKeys": {"root": True, "controller-x": True, "controller-y": True, "other-sliver": True,
                   "local-account": True, "no-identity": False},
    "Ticket": {"root": True, "controller-x": True, "controller-y": True, "other-sliver": False,
               "local-account": False, "no-identity": False},
}

# Sliver methods: role -> target kind -> allowed. The same for all eight sliver methods.
T, F = True, False
SLIVER_MATRIX: dict[str, dict[str, bool]] = {
    #                  plc  deleg-x deleg-y nm-ctl not-inst
    "root":          dict(zip(TARGETS, (T, T, T, T, T))),
    "self":          dict(zip(TARGETS, (T, T, T, T, T))),
    "controller-x":  dict(zip(TARGETS, (F, T, F, F, F))),
    "controller-y":  dict(zip(TARGETS, (F, F, T, F, F))),
    "other-sliver":  dict(zip(TARGETS, (F, F, F, F, F))),
    "local-account": dict(zip(TARGETS, (F, F, F, F, F))),
    "no-identity":   dict(zip(TARGETS, (F, F, F, F, F))),
}
SLIVER_METHODS = (
    "Create", "Destroy", "Start", "Stop", "GetRSpec", "GetEffectiveRSpec", "GetLoans", "SetLoans",
)


def test_method_table_is_the_twelve_methods_in_help_order() -> None:
    assert list(METHODS) == ["Help", "GetXIDs", "GetSSHKeys", "Ticket", *SLIVER_METHODS]
    assert {m for m, s in METHODS.items() if s.takes_sliver} == set(SLIVER_METHODS)
    assert METHODS["SetLoans"].args == ("sliver", "loans")
    assert METHODS["Ticket"].args == ("ticket",)
    assert {m for m, s in METHODS.items() if s.delegated_only} == {"Create", "Destroy"}


@pytest.mark.parametrize("method", list(NO_TARGET))
@pytest.mark.parametrize("role", [r for r in ROLES if r != "self"])
@pytest.mark.parametrize("kind", [None, *TARGETS])
def test_methods_without_a_sliver(method: str, role: str, kind: str | None) -> None:
    target = None if kind is None else TARGETS[kind]
    decision = decide(FIXED_CALLERS[role], method, target)
    assert isinstance(decision, Decision)
    assert decision.allowed is NO_TARGET[method][role], decision.reason
    assert decision.reason


@pytest.mark.parametrize("method", SLIVER_METHODS)
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("kind", list(TARGETS))
def test_sliver_methods(method: str, role: str, kind: str) -> None:
    target = TARGETS[kind]
    decision = decide(caller_for(role, target), method, target)
    assert decision.allowed is SLIVER_MATRIX[role][kind], decision.reason
    if not decision.allowed:
        assert method in decision.reason and target.name in decision.reason


def test_full_matrix_counts() -> None:
    """A summary pin: how many (method, role, target) cells allow, over the whole table."""
    allowed = 0
    for method in METHODS:
        for role in ROLES:
            for target in TARGETS.values():
                if role == "self" and method in NO_TARGET:
                    continue
                caller = caller_for(role, target)
                allowed += decide(caller, method, target if method in SLIVER_METHODS else None).allowed
    # no-target: Help 6 + GetXIDs 5 + GetSSHKeys 5 + Ticket 3 = 19 roles, x 5 targets
    # sliver methods: root 5 + self 5 + controller-x 1 + controller-y 1 = 12, x 8 methods
    assert allowed == 19 * 5 + 12 * 8


@pytest.mark.parametrize("method", SLIVER_METHODS)
def test_sliver_method_without_target_is_denied(method: str) -> None:
    assert decide(FIXED_CALLERS["controller-x"], method, None).allowed is False
    assert decide(FIXED_CALLERS["no-identity"], method, None).allowed is False


def test_unknown_method_is_denied_even_for_root() -> None:
    decision = decide(FIXED_CALLERS["root"], "Shutdown", None)
    assert decision == Decision(False, "unknown method 'Shutdown'")


@pytest.mark.parametrize(
    "caller, target",
    [
        # names the caller as controller, but the caller's sliver is no nm-controller (any more)
        (sliver_caller(1003, OTHER, False), sliver("site_d", DELEGATED, controller=OTHER)),
        # a controller named by a non-delegated sliver's record is not its controller
        (FIXED_CALLERS["controller-x"], sliver("site_p", PLC_INSTANTIATED, controller=CTL_X)),
        (FIXED_CALLERS["controller-x"], sliver("site_c", NM_CONTROLLER, controller=CTL_X)),
        # a delegated sliver with no controller is nobody's
        (FIXED_CALLERS["controller-x"], sliver("site_n", DELEGATED, controller="")),
        # is_controller without a sliver name (inconsistent input) grants nothing
        (Caller(uid=7, is_root=False, local_account=True, sliver=None, is_controller=True),
         sliver("site_e", DELEGATED, controller="")),
    ],
)
def test_controller_edge_cases_are_denied(caller: Caller, target: Sliver) -> None:
    assert decide(caller, "Start", target).allowed is False


def test_ticket_needs_a_named_controller_sliver() -> None:
    odd = Caller(uid=7, is_root=False, local_account=True, sliver=None, is_controller=True)
    assert decide(odd, "Ticket", None).allowed is False


def test_uid_zero_flag_is_what_counts_for_root() -> None:
    """Root is the ``is_root`` flag set from uid 0 by the resolver; a sliver that merely has
    local_account and no sliver name is no one special."""
    fake = Caller(uid=5, is_root=False, local_account=True, sliver=None, is_controller=False)
    assert decide(fake, "Start", TARGETS["plc"]).allowed is False


def test_denials_describe_the_caller_without_secrets() -> None:
    reason = decide(FIXED_CALLERS["other-sliver"], "SetLoans", TARGETS["delegated-x"]).reason
    assert reason == (
        "SetLoans(site_delx) is allowed to the sliver itself, root, or the sliver's controller; "
        "the caller is uid 1003 (sliver site_other)"
    )
    assert "no identity" in decide(ANONYMOUS, "GetXIDs", None).reason
    assert "no local account" in decide(
        Caller(uid=99, is_root=False, local_account=False, sliver=None, is_controller=False), "GetXIDs", None
    ).reason


def test_allow_reasons_name_the_rule() -> None:
    target = TARGETS["delegated-x"]
    assert decide(FIXED_CALLERS["root"], "Stop", target).reason == "root"
    assert decide(self_caller(target), "Stop", target).reason == "self"
    assert decide(FIXED_CALLERS["controller-x"], "Stop", target).reason == "controller of site_delx"


def test_roles_match_the_api_reference() -> None:
    """The "allowed" column of docs/api.md's method table agrees with METHODS (style.md: a public
    surface is declared once and pinned against its document)."""
    text = API_MD.read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `?(\w+)`? \|[^|\n]*\|[^|\n]*\|([^|\n]*)\|$", text, re.MULTILINE))
    expected_words = {
        Role.ANYONE: "anyone",
        Role.LOCAL_ACCOUNT: "any local account",
        Role.CONTROLLER_ACCOUNT: "nm-controller",
        Role.SLIVER: "controller",
    }
    for name, spec in METHODS.items():
        assert name in rows, f"{name} missing from the method table of docs/api.md"
        assert expected_words[spec.role] in rows[name], name
