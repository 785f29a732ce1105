"""The only place that builds an XML-RPC Fault (api.md "Faults").

Errors are raised as ``core.errors`` classes everywhere; each knows its fault code. Anything else
reaching the API boundary is a bug: it is logged with its traceback and answered with Fault 1 and
a message that carries no internals.
"""

from __future__ import annotations

import logging
import xmlrpc.client

from ..core.errors import NodeManagerError

logger = logging.getLogger(__name__)

UNKNOWN_METHOD = 100
WRONG_ARGUMENT_COUNT = 101
INVALID_ARGUMENT = 102
OPERATION_FAILED = 104
PERMISSION_DENIED = 108
INTERNAL_ERROR = 1


def to_fault(exc: BaseException, *, method: str = "?") -> xmlrpc.client.Fault:
    """The Fault answering ``exc`` raised while serving ``method``."""
    if isinstance(exc, NodeManagerError) and exc.fault_code != INTERNAL_ERROR:
        return xmlrpc.client.Fault(exc.fault_code, str(exc))
    logger.error("event=internal-error method=%s", method, exc_info=exc)
    return xmlrpc.client.Fault(INTERNAL_ERROR, f"internal error in {method}; see the node manager's log")
