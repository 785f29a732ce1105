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

from .client import (
    ClientResponse,
    ClientTimeout,
    ConnectionFailed,
    HttpClientError,
    MalformedResponse,
    ResponseTooLarge,
    TlsVerificationFailed,
    split_url,
)
from .framing import MAX_RESPONSE_HEAD_BYTES, BodyTooLarge, ChunkedDecoder, ProtocolError, ResponseHead, \
    encode_request, parse_response_head

__all__ = ["arequest"]

_CHUNK = 256 * 1024


class _Exchange:
    def __init__(self, reader: asyncio.StreamReader, timeout: float, deadline: float) -> None:
        self.reader = reader
        self.timeout = timeout
        self.deadline = deadline
        self.buffer = b""

    async def recv(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTimeout("no complete answer before the deadline")
        async with asyncio.timeout(min(self.timeout, remaining)):
            return await self.reader.read(_CHUNK)

    async def head(self) -> bytes:
        buffer = self.buffer
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_RESPONSE_HEAD_BYTES:
                raise MalformedResponse(f"response head over {MAX_RESPONSE_HEAD_BYTES} bytes")
            chunk = await self.recv()
            if not chunk:
                raise ConnectionFailed("the server closed the connection before answering"
                                       if not buffer else "the server closed the connection mid-head")
            buffer += chunk
        self.buffer = buffer[end + 4:]
        return buffer[: end + 4]

    async def body(self, head: ResponseHead, max_body: int, bodyless: bool) -> bytes:
        if bodyless:
            return b""
        if head.chunked:
            decoder = ChunkedDecoder(max_body)
            parts = [decoder.feed(self.buffer)]
            while not decoder.done:
                chunk = await self.recv()
                if not chunk:
                    raise ConnectionFailed("the response was cut short (chunked body incomplete)")
                parts.append(decoder.feed(chunk))
            return b"".join(parts)
        length = head.content_length
        if length is not None:
            if length > max_body:
                raise ResponseTooLarge(f"the body is {length} bytes, over the {max_body}-byte cap")
            parts, total = [self.buffer[:length]], min(len(self.buffer), length)
            while total < length:
                chunk = await self.recv()
                if not chunk:
                    raise ConnectionFailed(f"the response was cut short ({total} of {length} bytes)")
                parts.append(chunk[: length - total])
                total += len(parts[-1])
            return b"".join(parts)
        parts, total = [self.buffer], len(self.buffer)
        while True:
            if total > max_body:
                raise ResponseTooLarge(f"the body is over the {max_body}-byte cap")
            chunk = await self.recv()
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)
            total += len(chunk)


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
    data = encode_request(method, target, host=host if port in (80, 443) else f"{host}:{port}", body=body,
                          headers=headers, keep_alive=False)
    where = unix_socket or f"{host}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ClientTimeout(f"{where}: the deadline passed before connecting")
        async with asyncio.timeout(min(timeout, remaining)):
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
        exchange = _Exchange(reader, timeout, deadline)
        head = parse_response_head(await exchange.head())
        while 100 <= head.status < 200:
            head = parse_response_head(await exchange.head())
        bodyless = method == "HEAD" or head.status in (204, 304)
        content = await exchange.body(head, max_body, bodyless)
        return ClientResponse(head.status, head.headers, content)
    except HttpClientError as exc:
        raise type(exc)(f"{where}: {exc}") from exc
    except BodyTooLarge as exc:
        raise ResponseTooLarge(f"{where}: {exc}") from exc
    except ProtocolError as exc:
        raise MalformedResponse(f"{where}: malformed response: {exc}") from exc
    except ssl.SSLCertVerificationError as exc:
        raise TlsVerificationFailed(f"{where}: TLS certificate verification failed: {exc.verify_message}") from exc
    except TimeoutError as exc:
        if time.monotonic() >= deadline:
            raise ClientTimeout(f"{where}: no complete answer before the deadline") from exc
        raise ClientTimeout(f"{where}: no complete answer within {timeout:g} s") from exc
    except ConnectionRefusedError as exc:
        raise ConnectionFailed(f"{where}: connection refused (ConnectionRefusedError)") from exc
    except ConnectionResetError as exc:
        raise ConnectionFailed(f"{where}: connection reset by the server (ConnectionResetError)") from exc
    except OSError as exc:
        raise ConnectionFailed(f"{where}: {type(exc).__name__}: {exc.strerror or exc}") from exc
    finally:
        if writer is not None:
            writer.transport.abort()  # one exchange per connection; nothing left to flush
