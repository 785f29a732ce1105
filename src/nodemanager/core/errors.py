"""The one exception tree of the node manager.

Every adapter translates foreign exceptions (OSError, CalledProcessError, sqlite3.Error, lxml and
xmlrpc errors) into one of these at its boundary (``raise ... from exc``), so callers handle a small,
closed set of failures. Each class carries the XML-RPC fault code the API answers with; the API's
``faults`` module is the only place that turns them into a ``Fault``.

    NodeManagerError (fault 1: internal)
    ├── ConfigError                 bad configuration file, unknown key, wrong type
    ├── InvalidArgument (102)       a caller's argument is wrong
    │   ├── InvalidName             not a valid slice/account name
    │   ├── UnknownSliver           no such sliver on this node
    │   ├── InvalidLoans            malformed loan list
    │   └── TicketRejected          ticket failed verification (reason in the message)
    ├── OperationFailed (104)       a valid call whose operation failed or is not allowed here
    │   ├── BackendError            an OS operation on a sliver failed (account, process, file)
    │   │   └── AccountConflict     a foreign account already has the sliver's name
    │   ├── NotAllowedForSliver     e.g. Create of a non-delegated sliver
    │   ├── IllegalTransition       a sliver's phase cannot move that way (a bug or a crash
    │   │                           left it there): that sliver's failure, never the daemon's
    │   └── PoolClosed              the node manager is shutting down: the work was not done
    ├── PermissionDenied (108)      the caller's role does not allow the call
    ├── UnknownMethod (100)
    ├── WrongArgumentCount (101)
    ├── AuthorityError              fetching or parsing an authority document failed
    │   ├── AuthorityUnavailable    network/HTTP/timeout: retry later
    │   └── DocumentRejected        the document as a whole is malformed: nothing changes
    └── StoreError                  the SQLite store cannot be read or written
        └── StoreCorrupt            the store file is unreadable: quarantined, never replaced silently
"""

from __future__ import annotations

from enum import Enum


class NodeManagerError(Exception):
    """Base of every error the node manager raises on purpose."""

    fault_code: int = 1


class ConfigError(NodeManagerError):
    """The configuration file is unreadable, has an unknown key or a value of the wrong type."""


class InvalidArgument(NodeManagerError):
    fault_code = 102


class InvalidName(InvalidArgument):
    """A slice name that cannot safely become a Unix account name and a path component."""


class UnknownSliver(InvalidArgument):
    pass


class InvalidLoans(InvalidArgument):
    pass


class TicketReason(str, Enum):
    """Why a ticket was rejected (the first words of the fault message, and a metrics label)."""

    TOO_LARGE = "too large"
    MALFORMED = "malformed"
    #: The ticket's format is refused by this node's configuration (e.g. OpenPGP tickets with no
    #: ``authority.ticket_keyring``).
    NOT_CONFIGURED = "format not configured"
    SIGNATURE = "bad signature"
    INVALID_NAME = "invalid slice name"
    INVALID_CONTROLLER = "invalid controller name"
    NOT_YET_VALID = "not yet valid"
    EXPIRED = "expired"
    #: An OpenPGP (PLCAPI) ticket older than ``tickets.max_age``.
    TOO_OLD = "too old"
    WRONG_INSTANTIATION = "wrong instantiation"
    WRONG_NODE = "wrong node"
    NODE_UNKNOWN = "node id unknown"
    WRONG_CALLER = "wrong caller"
    REPLAY = "replay"
    STALE = "stale"

    @property
    def label(self) -> str:
        """The metrics label: ``bad-signature``, ``wrong-node``..."""
        return self.value.replace(" ", "-")


class TicketRejected(InvalidArgument):
    """A ticket failed verification; ``reason`` says which rule, the message says how."""

    def __init__(self, reason: TicketReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class OperationFailed(NodeManagerError):
    fault_code = 104


class BackendError(OperationFailed):
    """An operating-system operation on one sliver failed; the message names the sliver."""


class AccountConflict(BackendError):
    """An account with the sliver's name exists but was not created by the node manager."""


class NotAllowedForSliver(OperationFailed):
    pass


class IllegalTransition(OperationFailed):
    """A sliver's phase cannot move from where it is to where an operation wants it."""


class PoolClosed(OperationFailed):
    """The worker pool stopped accepting or dropped the work: the node manager is shutting down."""


class PermissionDenied(NodeManagerError):
    fault_code = 108


class UnknownMethod(NodeManagerError):
    fault_code = 100


class WrongArgumentCount(NodeManagerError):
    fault_code = 101


class AuthorityError(NodeManagerError):
    pass


class AuthorityUnavailable(AuthorityError):
    """The authority could not be reached or answered with a transport error; retry later."""


class DocumentRejected(AuthorityError):
    """The document as a whole is malformed (bad XML, wrong node, no timestamp): nothing changes."""


class StoreError(NodeManagerError):
    pass


class StoreCorrupt(StoreError):
    pass
