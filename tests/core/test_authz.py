"""core.authz: every method x every caller role x every target kind, against api.md's role table.

Observers (api.md "Observer", docs/observer.md) are callers too: an observer sliver, a local
account named in ``api.observers``, an observer that is the target itself, and a sliver that is
both an nm-controller and an observer.

The expected matrix is written out in full below (not derived from the code under test), so a
change to any cell of the role table is a deliberate edit of this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodemanager.core.authz import ANONYMOUS, METHODS, OBSERVER_METHODS, Caller, Decision, Role, decide
from nodemanager.core.records import (
    DELEGATED,
    NM_CONTROLLER,
    NOT_INSTANTIATED,
    OBSERVER_TAG,
    PLC_INSTANTIATED,
    SOURCE_AUTHORITY,
    SOURCE_TICKET,
    Sliver,
)

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


def sliver_caller(uid: int, name: str, controller: bool, observer: bool = False) -> Caller:
    return Caller(uid=uid, is_root=False, local_account=True, sliver=name, is_controller=controller,
                  is_observer=observer)


def self_caller(target: Sliver, observer: bool = False) -> Caller:
    """The target's own account (a controller if the target is an nm-controller sliver)."""
    return sliver_caller(2000, target.name, target.instantiation == NM_CONTROLLER, observer)


FIXED_CALLERS: dict[str, Caller] = {
    "root": Caller(uid=0, is_root=True, local_account=True, sliver=None, is_controller=False),
    "controller-x": sliver_caller(1001, CTL_X, True),
    "controller-y": sliver_caller(1002, CTL_Y, True),
    "other-sliver": sliver_caller(1003, OTHER, False),
    "local-account": Caller(uid=1004, is_root=False, local_account=True, sliver=None, is_controller=False),
    "no-identity": ANONYMOUS,
    # an ordinary sliver whose authority record carries nm_observer = 1
    "observer-sliver": sliver_caller(1005, "site_obs", False, observer=True),
    # a local account named in api.observers (a monitoring agent), no sliver
    "observer-local": Caller(uid=1006, is_root=False, local_account=True, sliver=None, is_controller=False,
                             is_observer=True),
    # controller X whose record also carries nm_observer = 1
    "observer-controller-x": sliver_caller(1001, CTL_X, True, observer=True),
}
ROLES = ("root", "self", "self-observer", "controller-x", "controller-y", "observer-controller-x", "other-sliver",
         "observer-sliver", "observer-local", "local-account", "no-identity")


def caller_for(role: str, target: Sliver | None) -> Caller:
    if role in ("self", "self-observer"):
        assert target is not None
        return self_caller(target, observer=role == "self-observer")
    return FIXED_CALLERS[role]


# --- the expected matrix -------------------------------------------------------------------------
# Methods that take no sliver: role -> allowed (the target is irrelevant; checked with every kind).
NO_TARGET: dict[str, dict[str, bool]] = {
    "Help": {"root": True, "controller-x": True, "controller-y": True, "observer-controller-x": True,
             "other-sliver": True, "observer-sliver": True, "observer-local": True, "local-account": True,
             "no-identity": True},
    "GetXIDs": {"root": True, "controller-x": True, "controller-y": True, "observer-controller-x": True,
                "other-sliver": True, "observer-sliver": True, "observer-local": True, "local-account": True,
                "no-identity": False},
    "GetSSHKeys": {"root": True, "controller-x": True, "controller-y": True, "observer-controller-x": True,
                   "other-sliver": True, "observer-sliver": True, "observer-local": True, "local-account": True,
                   "no-identity": False},
    "Ticket": {"root": True, "controller-x": True, "controller-y": True, "observer-controller-x": True,
               "other-sliver": False, "observer-sliver": False, "observer-local": False, "local-account": False,
               "no-identity": False},
}

# Sliver methods: role -> target kind -> allowed. Methods that change state (WRITE_METHODS) share
# SLIVER_MATRIX; the read-only ones (READ_METHODS) share READ_MATRIX, which adds the observers.
T, F = True, False
SLIVER_MATRIX: dict[str, dict[str, bool]] = {
    #                          plc  deleg-x deleg-y nm-ctl not-inst
    "root":                  dict(zip(TARGETS, (T, T, T, T, T))),
    "self":                  dict(zip(TARGETS, (T, T, T, T, T))),
    "self-observer":         dict(zip(TARGETS, (T, T, T, T, T))),
    "controller-x":          dict(zip(TARGETS, (F, T, F, F, F))),
    "controller-y":          dict(zip(TARGETS, (F, F, T, F, F))),
    "observer-controller-x": dict(zip(TARGETS, (F, T, F, F, F))),
    "other-sliver":          dict(zip(TARGETS, (F, F, F, F, F))),
    "observer-sliver":       dict(zip(TARGETS, (F, F, F, F, F))),
    "observer-local":        dict(zip(TARGETS, (F, F, F, F, F))),
    "local-account":         dict(zip(TARGETS, (F, F, F, F, F))),
    "no-identity":           dict(zip(TARGETS, (F, F, F, F, F))),
}
READ_MATRIX: dict[str, dict[str, bool]] = {
    #                          plc  deleg-x deleg-y nm-ctl not-inst
    "root":                  dict(zip(TARGETS, (T, T, T, T, T))),
    "self":                  dict(zip(TARGETS, (T, T, T, T, T))),
    "self-observer":         dict(zip(TARGETS, (T, T, T, T, T))),
    "controller-x":          dict(zip(TARGETS, (F, T, F, F, F))),
    "controller-y":          dict(zip(TARGETS, (F, F, T, F, F))),
    "observer-controller-x": dict(zip(TARGETS, (T, T, T, T, T))),
    "other-sliver":          dict(zip(TARGETS, (F, F, F, F, F))),
    "observer-sliver":       dict(zip(TARGETS, (T, T, T, T, T))),
    "observer-local":        dict(zip(TARGETS, (T, T, T, T, T))),
    "local-account":         dict(zip(TARGETS, (F, F, F, F, F))),
    "no-identity":           dict(zip(TARGETS, (F, F, F, F, F))),
}
WRITE_METHODS = ("Create", "Destroy", "Start", "Stop", "SetLoans")
READ_METHODS = ("GetRSpec", "GetEffectiveRSpec", "GetLoans")
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
@pytest.mark.parametrize("role", [r for r in ROLES if not r.startswith("self")])
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
    matrix = READ_MATRIX if method in READ_METHODS else SLIVER_MATRIX
    assert decision.allowed is matrix[role][kind], decision.reason
    if not decision.allowed:
        assert method in decision.reason and target.name in decision.reason


def test_full_matrix_counts() -> None:
    """A summary pin: how many (method, role, target) cells allow, over the whole table."""
    allowed = 0
    for method in METHODS:
        for role in ROLES:
            for target in TARGETS.values():
                if role.startswith("self") and method in NO_TARGET:
                    continue
                caller = caller_for(role, target)
                allowed += decide(caller, method, target if method in SLIVER_METHODS else None).allowed
    # no-target: Help 9 + GetXIDs 8 + GetSSHKeys 8 + Ticket 4 = 29 roles, x 5 targets
    # write methods: root 5 + self 5 + self-observer 5 + controller-x 1 + controller-y 1
    #   + observer-controller-x 1 = 18, x 5 methods
    # read methods: root, self, self-observer, observer-controller-x, observer-sliver,
    #   observer-local 5 each + controller-x 1 + controller-y 1 = 32, x 3 methods
    assert allowed == 29 * 5 + 18 * 5 + 32 * 3


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
        Role.SLIVER_READ: "observer",
    }
    for name, spec in METHODS.items():
        assert name in rows, f"{name} missing from the method table of docs/api.md"
        assert expected_words[spec.role] in rows[name], name


# --- observers -----------------------------------------------------------------------------------
def test_observer_methods_are_the_read_only_ones() -> None:
    """api.md "Observer": GetRSpec, GetEffectiveRSpec, GetLoans, GetXIDs and GetSSHKeys; nothing
    that changes state (Help is anyone's anyway)."""
    assert set(OBSERVER_METHODS) == {"GetRSpec", "GetEffectiveRSpec", "GetLoans", "GetXIDs", "GetSSHKeys"}
    assert set(READ_METHODS) | set(WRITE_METHODS) == set(SLIVER_METHODS)
    assert {m for m, s in METHODS.items() if s.role is Role.SLIVER_READ} == set(READ_METHODS)


@pytest.mark.parametrize("method", [*WRITE_METHODS, "Ticket"])
@pytest.mark.parametrize("role", ["observer-sliver", "observer-local"])
def test_an_observer_denied_a_change_is_told_why(method: str, role: str) -> None:
    target = None if method == "Ticket" else TARGETS["delegated-x"]
    decision = decide(FIXED_CALLERS[role], method, target)
    assert decision.allowed is False
    assert decision.reason.endswith(
        "; observers may call only GetXIDs, GetSSHKeys, GetRSpec, GetEffectiveRSpec, GetLoans"
    )
    assert "observer" in decision.reason.split("; the caller is ")[1]


def test_observer_reasons_and_descriptions() -> None:
    target = TARGETS["plc"]
    assert decide(FIXED_CALLERS["observer-sliver"], "GetRSpec", target).reason == "observer"
    assert decide(FIXED_CALLERS["observer-local"], "GetLoans", target).reason == "observer"
    assert decide(FIXED_CALLERS["observer-local"], "GetXIDs", None).reason == "a local account"
    # an observer on itself is "self"; a controller-observer on its delegated sliver is "controller"
    assert decide(self_caller(target, observer=True), "Stop", target).reason == "self"
    assert decide(FIXED_CALLERS["observer-controller-x"], "Stop", TARGETS["delegated-x"]).reason == (
        "controller of site_delx"
    )
    assert FIXED_CALLERS["observer-sliver"].describe() == "uid 1005 (observer sliver site_obs)"
    assert FIXED_CALLERS["observer-local"].describe() == "uid 1006 (an observer local account)"
    assert FIXED_CALLERS["observer-controller-x"].describe() == "uid 1001 (observer controller sliver site_ctlx)"
    # non-observers' denials say nothing about observers
    assert "observer" not in decide(FIXED_CALLERS["other-sliver"], "Stop", target).reason
    assert "or an observer; the caller is uid 1003" in decide(FIXED_CALLERS["other-sliver"], "GetRSpec", target).reason


def test_an_observer_without_a_password_entry_still_reads_but_has_no_identity_without_uid() -> None:
    """Inconsistent inputs: the flag grants the read-only methods only with an established uid."""
    odd = Caller(uid=7, is_root=False, local_account=False, sliver=None, is_controller=False, is_observer=True)
    assert decide(odd, "GetXIDs", None).allowed is True
    assert decide(odd, "GetRSpec", TARGETS["plc"]).allowed is True
    assert decide(odd, "Stop", TARGETS["plc"]).allowed is False
    nobody = Caller(uid=None, is_root=False, local_account=False, sliver=None, is_controller=False, is_observer=True)
    for method in METHODS:
        target = TARGETS["plc"] if METHODS[method].takes_sliver else None
        assert decide(nobody, method, target).allowed is (method == "Help"), method


@pytest.mark.parametrize("method", READ_METHODS)
def test_an_observer_still_needs_a_target(method: str) -> None:
    assert decide(FIXED_CALLERS["observer-local"], method, None).allowed is False


def observer_record(attributes: tuple[tuple[str, str], ...], source: str = SOURCE_AUTHORITY,
                    instantiation: str = PLC_INSTANTIATED) -> Sliver:
    return Sliver(name="site_obs", slice_id=9, instantiation=instantiation, expires=2**31 - 1, timestamp=1,
                  source=source, attributes=attributes)


@pytest.mark.parametrize(
    "attributes, observer",
    [
        (((OBSERVER_TAG, "1"),), True),
        (((OBSERVER_TAG, " 1 "),), True),
        (((OBSERVER_TAG, "0"),), False),
        (((OBSERVER_TAG, ""),), False),
        (((OBSERVER_TAG, "yes"),), False),
        (((OBSERVER_TAG, "true"),), False),
        (((OBSERVER_TAG, "2"),), False),
        (((OBSERVER_TAG, "01"),), False),
        ((), False),
        ((("nm_cpu_share", "1"),), False),
        ((("NM_OBSERVER", "1"),), False),
        # repeated: the last one counts, as for resource tags
        (((OBSERVER_TAG, "1"), (OBSERVER_TAG, "0")), False),
        (((OBSERVER_TAG, "0"), ("nm_cpu_share", "3"), (OBSERVER_TAG, "1")), True),
    ],
)
def test_which_records_make_an_observer(attributes: tuple[tuple[str, str], ...], observer: bool) -> None:
    assert observer_record(attributes).is_observer is observer
    # a sliver whose tag is not "1" is an ordinary sliver: no read access to others
    caller = sliver_caller(1010, "site_obs", False, observer_record(attributes).is_observer)
    assert decide(caller, "GetRSpec", TARGETS["plc"]).allowed is observer


@pytest.mark.parametrize("instantiation", [PLC_INSTANTIATED, NM_CONTROLLER, DELEGATED, NOT_INSTANTIATED])
def test_only_the_authority_confers_the_observer_role(instantiation: str) -> None:
    """A ticket's record (signed by the authority, but delivered by a controller for a delegated
    sliver) never makes an observer, whatever its attributes: tickets grant resources, not rights
    over other slivers (docs/observer.md)."""
    tagged = ((OBSERVER_TAG, "1"),)
    assert observer_record(tagged, SOURCE_AUTHORITY, instantiation).is_observer is True
    assert observer_record(tagged, SOURCE_TICKET, instantiation).is_observer is False


def test_the_fingerprint_follows_the_observer_role() -> None:
    """The backend applies the role (the delegate shell), so a record that gains or loses it --
    through its tag, or a ticket's record taken over by the authority with the same attributes --
    has a new fingerprint, hence a configure."""
    tagged = observer_record(((OBSERVER_TAG, "1"),))
    assert tagged.fingerprint() != observer_record(()).fingerprint()
    assert tagged.fingerprint() != observer_record(((OBSERVER_TAG, "0"),)).fingerprint()
    from_ticket = observer_record(((OBSERVER_TAG, "1"),), SOURCE_TICKET)
    assert from_ticket.fingerprint() != tagged.fingerprint()
    # a non-observer's fingerprint does not depend on the source
    assert observer_record((), SOURCE_TICKET).fingerprint() == observer_record(()).fingerprint()
