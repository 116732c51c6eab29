"""A minimal HTTP/1.1 POST over asyncio streams, to an address that was already checked.

The connection goes to the resolved address the caller hands in (never a host name, so nothing
is resolved again here); the original host travels in the Host header and, for https, as the TLS
server name (SNI and certificate check). Only the status line matters: headers and body of the
response are read within fixed bounds and discarded.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence

from tokenrelay_server.jobs.webhook_url import WebhookTarget

Connector = Callable[..., Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""connect(address, port, *, ssl: SSLContext | None, server_hostname: str | None) -> (reader, writer)"""

LINE_LIMIT = 16 * 1024  # longest status or header line read
MAX_HEADER_LINES = 128
MAX_BODY_BYTES = 64 * 1024  # response body read (and dropped) at most
MAX_INFORMATIONAL = 8  # 1xx responses skipped before the final one
CLOSE_TIMEOUT = 1.0
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] ([1-5][0-9]{2})(?: [^\r\n]*)?\r?\n$")


class WebhookProtocolError(Exception):
    """The receiver's answer is not HTTP/1.x as we read it."""


async def open_tcp(address: str, port: int, *, ssl: ssl.SSLContext | None,
                   server_hostname: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The default connector: a TCP (and TLS) connection to a literal address."""
    if ssl is None:
        return await asyncio.open_connection(address, port, limit=LINE_LIMIT)
    return await asyncio.open_connection(address, port, ssl=ssl, server_hostname=server_hostname,
                                         limit=LINE_LIMIT)


def build_request(target: WebhookTarget, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"POST {target.request_target} HTTP/1.1", f"Host: {target.host_header}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError("header values must not contain line breaks")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise WebhookProtocolError(f"response line longer than {LINE_LIMIT} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise WebhookProtocolError("connection closed before the response was complete") from exc


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await _read_line(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raise WebhookProtocolError(f"more than {MAX_HEADER_LINES} response header lines")


async def read_status(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The final status code and its headers, skipping informational (1xx) responses."""
    for _ in range(MAX_INFORMATIONAL + 1):
        line = await _read_line(reader)
        match = _STATUS_LINE.match(line)
        if match is None:
            raise WebhookProtocolError(f"malformed status line {line[:80]!r}")
        status = int(match.group(1))
        headers = await _read_headers(reader)
        if status >= 200:
            return status, headers
    raise WebhookProtocolError(f"more than {MAX_INFORMATIONAL} informational responses")


async def discard_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    """Read and drop at most MAX_BODY_BYTES of the response body."""
    try:
        left = min(int(headers.get("content-length", MAX_BODY_BYTES)), MAX_BODY_BYTES)
    except ValueError:
        left = MAX_BODY_BYTES
    while left > 0:
        chunk = await reader.read(min(left, 16 * 1024))
        if not chunk:
            return
        left -= len(chunk)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (OSError, TimeoutError, ssl.SSLError):
        writer.transport.abort()


async def _connect_any(connect: Connector, addresses: Sequence[str], target: WebhookTarget,
                       ssl_context: ssl.SSLContext | None) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Try the checked addresses in order; the first that accepts wins."""
    last_error: OSError | None = None
    for address in addresses:
        try:
            reader, writer = await connect(address, target.port, ssl=ssl_context,
                                           server_hostname=target.host if ssl_context is not None else None)
            return address, reader, writer
        except OSError as exc:  # refused, unreachable; ssl.SSLError (certificate) is an OSError too
            last_error = exc
            if isinstance(exc, ssl.SSLError):
                break
    assert last_error is not None
    raise last_error


async def post(connect: Connector, addresses: Sequence[str], target: WebhookTarget,
               headers: Sequence[tuple[str, str]], body: bytes, *, ssl_context: ssl.SSLContext | None,
               deadline: float) -> int:
    """POST `body` to the first reachable address; the response status code.

    Everything up to the status line and headers must finish by `deadline` (loop time), else
    TimeoutError. Dropping the body is best effort within what is left of it.
    """
    request = build_request(target, headers, body)
    async with asyncio.timeout_at(deadline):
        _, reader, writer = await _connect_any(connect, addresses, target, ssl_context)
    try:
        async with asyncio.timeout_at(deadline):
            writer.write(request)
            await writer.drain()
            status, response_headers = await read_status(reader)
        try:
            async with asyncio.timeout_at(deadline):
                await discard_body(reader, response_headers)
        except (TimeoutError, OSError):
            pass  # the status is what counts
    except BaseException:
        writer.transport.abort()
        raise
    await _close(writer)
    return status
