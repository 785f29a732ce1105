"""The OpenPGP ticket story, all real (root): authority -> gpg -> controller -> SSH -> node -> login.

Like ``test_ticket_story.py`` (the same node, :class:`nodemanager.testing.story.TicketStory`, here
with the account prefix ``nmt6``), but the ticket is PLCAPI's OpenPGP signed message:

1. The bundled authority serves a controller slice; the node (``daemon.build_node`` from a real
   configuration whose ``authority.ticket_keyring`` is the authority's exported GnuPG public key)
   syncs once: the controller's delegate account appears.
2. The operator adds a delegated slice and issues its ticket with ``nodemanager authority ticket
   SLICE --format pgp`` (real ``gpg --armor --sign``). Before the node polls again the controller
   delivers it: ``cat ticket_request.xml | ssh controller@node`` (the XML-RPC ``Ticket`` request
   over the delegate shell). Answer: 1; the record is ticket-sourced and names the controller.
3. Over SSH the controller runs Create and Start; a login as the delegated sliver (with the key
   the ticket carries) works.
4. Delivering the same ticket again is a replay: Fault 102.

Accounts are named ``nmt6...`` and always removed.
"""

from __future__ import annotations

import io
import xmlrpc.client
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.plc.model import load_authority_text
from nodemanager.plc.pgpsigning import pgp_signer_for
from nodemanager.plc.ticketcli import cmd_authority_ticket
from nodemanager.core.records import SOURCE_TICKET
from nodemanager.testing.openpgp import missing_tools
from nodemanager.testing.sshd import make_client_key
from nodemanager.testing.story import StoryNode, TicketStory, real_sshd_marks

pytestmark = [
    *real_sshd_marks(),
    pytest.mark.skipif(missing_tools("gpg", "gpgv", "gpgconf", "prlimit") is not None,
                       reason=str(missing_tools("gpg", "gpgv", "gpgconf", "prlimit"))),
]

STORY = TicketStory(prefix="nmt6", controller="pgp_ctrl", delegated="pgp_deleg", node_key="pgp-story-node-key")
PREFIX, CONTROLLER, DELEGATED = STORY.prefix, STORY.controller, STORY.delegated


def pgp_keyring(data: Path) -> dict[str, str]:
    """``authority.ticket_keyring``: the authority's exported GnuPG public key (what the operator
    hands nodes), besides the ticket certificate."""
    settings = load_authority_text(data.read_text(), timestamp=0, base_time=0, origin=str(data)).tickets
    return {"ticket_keyring": str(pgp_signer_for(data, settings).load_or_create().public_path)}


@pytest.fixture
def story(tmp_path: Path, home_root: Path) -> Iterator[StoryNode]:
    with STORY.run(tmp_path, home_root, verifiers=pgp_keyring) as node:
        yield node


@pytest.fixture
def sliver_key(tmp_path: Path) -> tuple[Path, str]:
    """The delegated sliver's key pair: the ticket carries the public key, the login uses it."""
    return make_client_key(tmp_path, "id_sliver")


def test_pgp_ticket_story(story: StoryNode, sliver_key: tuple[Path, str]) -> None:
    key, public = sliver_key
    manager = story.manager
    delegated_account = PREFIX + DELEGATED

    # 1. the first sync creates the controller's delegate account
    STORY.first_sync(story)

    # 2. a delegated slice appears; the operator issues its OpenPGP ticket; the controller delivers it
    STORY.add_delegated_slice(story, public)
    out = io.StringIO()
    args = Namespace(data=story.data, slice=DELEGATED, nodes=None, ttl=None, output=None, format="pgp")
    assert cmd_authority_ticket(args, stdout=out) == 0
    ticket = out.getvalue()
    assert ticket.startswith("-----BEGIN PGP MESSAGE-----")
    assert manager.store.sliver(DELEGATED) is None
    request = story.tmp_path / "ticket_request.xml"
    request.write_text(xmlrpc.client.dumps((ticket,), "Ticket"))
    delivered = story.deliver(request)
    assert delivered.returncode == 0, (delivered.stderr, story.sshd.log()[-2000:])
    assert xmlrpc.client.loads(delivered.stdout) == ((1,), None)
    record = manager.store.sliver(DELEGATED)
    assert record is not None and record.source == SOURCE_TICKET and record.controller == CONTROLLER
    assert record.keys == (public,) and ("nm_cpu_share", "3") in record.attributes

    # 3. Create and Start over SSH as the controller; then a login as the delegated sliver
    api = story.api()
    assert api.Create(DELEGATED) == 1
    assert api.Start(DELEGATED) == 1
    assert delegated_account in STORY.ours()
    login = story.ssh(delegated_account, key, "id", "-un")
    assert login.returncode == 0, (login.stderr, story.sshd.log()[-2000:])
    assert login.stdout.decode().strip() == delegated_account

    # 4. the same ticket again is a replay, and changes nothing
    replayed = story.deliver(request)
    assert replayed.returncode == 0, replayed.stderr
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(replayed.stdout)
    assert caught.value.faultCode == 102 and "replay" in caught.value.faultString
    assert manager.store.sliver(DELEGATED) == record
