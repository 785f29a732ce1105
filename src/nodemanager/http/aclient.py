"""The asyncio twin of :mod:`.client`: one request on a fresh connection, in a running loop.

For programs that hold many exchanges at once in one thread -- the fleet simulator runs 10,000
hollow nodes, each with a blocking query outstanding, in one loop. Same rules, same errors
(:class:`~.client.HttpClientError` and its subclasses), same framing (:mod:`.framing`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence

from .client import ClientResponse, host_header, split_url, step_timeout, translated_errors
from .framing import encode_request
from .responses import ResponseReader

__all__ = ["arequest"]

_CHUNK = 256 * 1024


async def arequest(
    url: str,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: Sequence[tuple[str, str]] = (),
    timeout: float,
    max_body: int,
    ssl_context: ssl.SSLContext | None = None,
    unix_socket: str | None = None,
    deadline: float | None = None,
) -> ClientResponse:
    """As :func:`.client.request`, in the running loop (cancelling it closes the connection)."""
    scheme, host, port, target = split_url(url)
    if deadline is None:
        deadline = time.monotonic() + timeout
    data = encode_request(method, target, host=host_header(host, port), body=body, headers=headers,
                          keep_alive=False)
    where = unix_socket or f"{host}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        with translated_errors(where, timeout, deadline):
            async with asyncio.timeout(step_timeout(timeout, deadline)):
                if unix_socket is not None:
                    reader, writer = await asyncio.open_unix_connection(unix_socket, limit=_CHUNK)
                else:
                    context = None
                    if scheme == "https":
                        context = ssl_context if ssl_context is not None else ssl.create_default_context()
                    reader, writer = await asyncio.open_connection(
                        host, port, ssl=context, server_hostname=host if context else None, limit=_CHUNK
                    )
            writer.write(data)
            response = ResponseReader(max_body=max_body, head_only=method == "HEAD")
            while not response.done:
                async with asyncio.timeout(step_timeout(timeout, deadline)):
                    chunk = await reader.read(_CHUNK)
                if chunk:
                    response.feed(chunk)
                else:
                    response.end_of_stream()
            assert response.head is not None
            return ClientResponse(response.head.status, response.head.headers, response.body)
    finally:
        if writer is not None:
            writer.transport.abort()  # one exchange per connection; nothing left to flush
