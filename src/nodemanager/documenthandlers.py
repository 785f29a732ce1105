"""The node-wide document handlers the configuration turns on (``sync.DocumentHandler``).

A GetSlivers answer carries, besides slivers, members about the node itself: the admin keys of
local accounts (``accounts``) and configuration files (``conf_files``). Each is opt-in
(``accounts.manage_keys``, ``conf_files.enabled``) because it changes the node outside the
slivers' accounts, as root. With the ``hollow`` backend (records only) none is built: a scale
test or an unprivileged trial never writes root's keys or the node's files.
"""

from __future__ import annotations

import logging

from .adminkeys import AdminKeys
from .config import Config
from .conffiles import ConfFilesHandler
from .host import Host
from .store import Store
from .sync import DocumentHandler

logger = logging.getLogger(__name__)


def document_handlers_from_config(config: Config, *, host: Host, store: Store, hollow: bool) -> list[DocumentHandler]:
    """The handlers ``config`` enables, in the order they run (admin keys, then files); none
    when the node's backend is ``hollow``."""
    wanted = [key for key, on in (("accounts.manage_keys", bool(config.accounts.manage_keys)),
                                  ("conf_files.enabled", config.conf_files.enabled)) if on]
    if hollow:
        for key in wanted:
            logger.warning("event=document-handler-off key=%s reason=hollow-backend", key)
        return []
    handlers: list[DocumentHandler] = []
    if config.accounts.manage_keys:
        handlers.append(AdminKeys(host, store, config.accounts.manage_keys, confirm_after=config.sync.confirm_after))
    if config.conf_files.enabled:
        handlers.append(ConfFilesHandler.from_config(config, host=host, store=store))
    return handlers
