"""Observer slivers get delegate accounts (api.md "Observer", docs/observer.md), over FakeHost.

A sliver whose authority record carries ``nm_observer = 1`` logs in by ssh for API access only,
as an ``nm-controller`` does: the generated wrapper as login shell, a root-owned ``~/.hushlogin``
and ``restrict`` keys. When the tag goes (or is not ``1``, or came from a ticket) the account is
an ordinary one again, and the plan sees the change (a new fingerprint -> CONFIGURE).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nodemanager.backends.account import AccountBackend
from nodemanager.core.plan import ActionKind, plan_actions
from nodemanager.core.records import (
    DELEGATED,
    OBSERVER_TAG,
    PLC_INSTANTIATED,
    SOURCE_TICKET,
    AccountState,
    ObservedAccount,
    Phase,
    Sliver,
)
from nodemanager.testing.fakehost import FakeFile, FakeHost, ShellAwareFakeHost

HOME_ROOT = Path("/srv/homes")
KEYS_DIR = Path("/etc/nm-keys")
SHELLS = Path("/etc/shells-test")
WRAPPER = Path("/run/nm-test/delegate-shell")
NAME, ACCOUNT = "pl_obs", "nmpl_obs"
KEY = "ssh-ed25519 AAAA obs@x"


@pytest.fixture
def host() -> ShellAwareFakeHost:
    host = ShellAwareFakeHost()
    host.files[SHELLS] = FakeFile(b"/bin/sh\n/bin/bash\n", 0, 0, 0o644)
    return host


@pytest.fixture
def backend(host: ShellAwareFakeHost) -> AccountBackend:
    return AccountBackend(host, home_root=HOME_ROOT, shell="/bin/bash", name_prefix="nm", delegate_shell=WRAPPER,
                          delegate_socket="/run/nm-test/api.sock", forward_command=["/usr/bin/forward_api_calls"],
                          shells_file=SHELLS, keys_dir=KEYS_DIR)


def observer(value: str | None = "1", **changes: object) -> Sliver:
    attributes = (("nm_cpu_share", "2"),) + (((OBSERVER_TAG, value),) if value is not None else ())
    fields: dict[str, object] = dict(name=NAME, slice_id=77, instantiation=PLC_INSTANTIATED, expires=2**31 - 1,
                                     timestamp=1, keys=(KEY,), attributes=attributes)
    fields.update(changes)
    return Sliver(**fields)  # type: ignore[arg-type]


def is_delegate_account(host: FakeHost) -> bool:
    shell = host.users[ACCOUNT].shell == str(WRAPPER)
    hush = HOME_ROOT / ACCOUNT / ".hushlogin"
    hushed = hush in host.files and host.files[hush].uid == 0
    restricted = host.files[KEYS_DIR / ACCOUNT].data == f"restrict {KEY}\n".encode()
    assert shell == hushed == restricted, (shell, hushed, restricted)
    return shell


def test_an_observer_gets_a_delegate_account(backend: AccountBackend, host: ShellAwareFakeHost) -> None:
    backend.create(observer())
    [argv] = host.commands_named("useradd")
    assert argv[argv.index("--shell") + 1] == str(WRAPPER)
    backend.configure(observer(), {})
    assert is_delegate_account(host)
    assert str(WRAPPER) in host.files[SHELLS].data.decode().splitlines()


@pytest.mark.parametrize("value", [None, "0", "yes", ""])
def test_a_sliver_without_the_tag_set_to_1_is_ordinary(backend: AccountBackend, host: ShellAwareFakeHost,
                                                      value: str | None) -> None:
    backend.create(observer(value))
    backend.configure(observer(value), {})
    assert not is_delegate_account(host)
    assert host.users[ACCOUNT].shell == "/bin/bash"


def test_a_ticket_sourced_observer_tag_makes_no_delegate_account(backend: AccountBackend,
                                                                 host: ShellAwareFakeHost) -> None:
    ticketed = observer(instantiation=DELEGATED, controller="pl_ctl", source=SOURCE_TICKET)
    backend.create(ticketed)
    backend.configure(ticketed, {})
    assert not is_delegate_account(host)


def test_removing_the_tag_gives_the_ordinary_shell_back_and_setting_it_again_restores(
        backend: AccountBackend, host: ShellAwareFakeHost) -> None:
    backend.create(observer())
    backend.configure(observer(), {})
    assert is_delegate_account(host)
    backend.configure(observer(None), {})
    assert not is_delegate_account(host)
    assert host.users[ACCOUNT].shell == "/bin/bash"
    assert str(WRAPPER) not in host.files[SHELLS].data.decode().splitlines()  # nobody uses it now
    backend.configure(observer("1"), {})
    assert is_delegate_account(host)


@pytest.mark.parametrize(
    "before, after",
    [
        (observer("1"), observer(None)),            # 1 -> absent
        (observer(None), observer("1")),            # absent -> 1
        (observer("1"), observer("0")),             # 1 -> 0
        # a ticket's record taken over by the authority with the same attributes
        (observer("1", source=SOURCE_TICKET), observer("1")),
        (observer("1"), observer("1", source=SOURCE_TICKET)),
    ],
)
def test_the_plan_reconfigures_when_the_role_changes(before: Sliver, after: Sliver) -> None:
    state = AccountState(name=NAME, uid=100077, owned=True, applied=before.fingerprint(), phase=Phase.RUNNING)
    seen = ObservedAccount(NAME, 100077, managed_marker=True)
    actions = plan_actions({NAME: after}, {NAME: state}, {NAME: seen}, 0.0, may_destroy_orphans=True)
    assert [(a.kind, a.name) for a in actions] == [(ActionKind.CONFIGURE, NAME)]
    unchanged = plan_actions({NAME: before}, {NAME: state}, {NAME: seen}, 0.0, may_destroy_orphans=True)
    assert unchanged == []
