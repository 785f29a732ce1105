"""The whole ticket story, all real (root): authority -> controller -> SSH -> node -> account.

1. The bundled authority serves a controller slice (``nm-controller``) and a user, carol, who
   belongs to it. The node manager (``daemon.Node`` from a real configuration, API on a Unix
   socket) syncs once: the controller's delegate account appears.
2. The authority's operator adds a delegated slice controlled by the controller. Before the node
   polls again, carol gets its ticket with ``GetSliceTicket`` (password auth, over XML-RPC) and
   the controller delivers it: ``ssh controller@node < ticket_request.xml``. Answer: 1.
3. Over SSH (``XmlRpcOverSsh``) the controller runs Create, Start, Stop and Destroy on the
   delegated sliver: its account really appears (pwd), survives a sync (the ticket is newer than
   the authority's data), and goes.
4. Delivering the same ticket again is a replay: Fault 102.

The node is built by ``daemon.build_node`` from a real configuration (its ticket verifier from
``authority.ticket_cert``) by :class:`nodemanager.testing.story.TicketStory`, shared with the
OpenPGP story; the backend is ``AccountBackend.from_config``'s, except that the shells file is a
copy (the real /etc/shells is left alone), and resource enforcement is off (this story is about
tickets; enforcement has its own tests). Accounts are named ``nmt4...`` and always removed.
"""

from __future__ import annotations

import pwd
import xmlrpc.client
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodemanager.core.records import SOURCE_TICKET
from nodemanager.testing.story import StoryNode, TicketStory, real_sshd_marks

pytestmark = real_sshd_marks()

STORY = TicketStory(prefix="nmt4", controller="story_ctrl", delegated="story_deleg", node_key="story-node-key")
PREFIX, CONTROLLER, DELEGATED = STORY.prefix, STORY.controller, STORY.delegated
USER, PASSWORD = STORY.user, STORY.password
DAVE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPUu1j+SFdR6aTH02ad8zTIUcWRL3mwYxtpeUEMqQvvU dave@example.org"


@pytest.fixture
def story(tmp_path: Path, home_root: Path) -> Iterator[StoryNode]:
    with STORY.run(tmp_path, home_root) as node:
        yield node


def test_ticket_story(story: StoryNode) -> None:
    manager = story.manager
    controller_account, delegated_account = PREFIX + CONTROLLER, PREFIX + DELEGATED

    # 1. the first sync creates the controller's delegate account
    STORY.first_sync(story)

    # 2. a delegated slice appears at the authority; carol gets its ticket; the controller delivers it
    STORY.add_delegated_slice(story, DAVE)
    with xmlrpc.client.ServerProxy(story.server.url) as plc:
        auth = {"AuthMethod": "password", "Username": USER, "AuthString": PASSWORD}
        ticket = plc.GetSliceTicket(auth, DELEGATED)
    assert manager.store.sliver(DELEGATED) is None  # the node has not polled since
    request = story.tmp_path / "ticket_request.xml"
    request.write_text(xmlrpc.client.dumps((ticket,), "Ticket"))
    delivered = story.deliver(request)
    assert delivered.returncode == 0, (delivered.stderr, story.sshd.log()[-2000:])
    assert xmlrpc.client.loads(delivered.stdout) == ((1,), None)  # the response body and nothing else
    record = manager.store.sliver(DELEGATED)
    assert record is not None and record.source == SOURCE_TICKET and record.controller == CONTROLLER
    assert record.keys == (DAVE,) and ("nm_cpu_share", "3") in record.attributes
    assert delegated_account not in STORY.ours()  # the account waits for Create

    # 3. Create, Start, Stop, Destroy over SSH, as the controller
    api = story.api()
    assert api.Create(DELEGATED) == 1
    entry = pwd.getpwnam(delegated_account)
    assert Path(manager.config.slivers.keys_dir, delegated_account).read_text() == DAVE + "\n"
    assert manager.sync_once().ok  # the authority's older data neither replaces nor removes it
    record = manager.store.sliver(DELEGATED)
    assert record is not None and record.source == SOURCE_TICKET
    assert pwd.getpwnam(delegated_account).pw_uid == entry.pw_uid
    assert api.Start(DELEGATED) == 1
    assert api.Stop(DELEGATED) == 1
    assert api.Destroy(DELEGATED) == 1
    with pytest.raises(KeyError):
        pwd.getpwnam(delegated_account)
    assert not Path(entry.pw_dir).exists()
    assert manager.store.sliver(DELEGATED) is None
    assert STORY.ours() == {controller_account}

    # 4. the same ticket again is a replay
    replayed = story.deliver(request)
    assert replayed.returncode == 0, replayed.stderr
    with pytest.raises(xmlrpc.client.Fault) as caught:
        xmlrpc.client.loads(replayed.stdout)
    assert caught.value.faultCode == 102
    assert "replay" in caught.value.faultString
    assert manager.store.sliver(DELEGATED) is None
