"""Signed webhooks for async jobs, as the Standard Webhooks specification describes them.

A job that names a callback URL gets one POST when it finishes or fails:

    webhook-id: <message id, the same on every retry>
    webhook-timestamp: <unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>

where key is the base64-decoded part of the operator's "whsec_..." secret. Failed attempts
(no connection, timeout, non-2xx) are retried on the configured backoff schedule; each attempt is
reported to the caller, who records it on the job. Targets that resolve to internal addresses
are refused (not retried) unless the operator allow-listed them; the connection goes to the
address that was checked, so a second DNS answer cannot redirect it (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tokenrelay_engines.base import InvalidRequest
from tokenrelay_server.jobs import webhook_http
from tokenrelay_server.jobs.webhook_config import (
    WebhookConfig,
    add_webhook_arguments,
    decode_secret,
    webhook_config_from_args,
)
from tokenrelay_server.jobs.webhook_url import FIELD, WebhookTarget, check_addresses, parse_webhook_url

__all__ = [
    "DeliveryAttempt", "WebhookConfig", "WebhookSender", "add_webhook_arguments", "sign",
    "validate_webhook_url", "webhook_config_from_args",
]

USER_AGENT = "tokenrelay-webhooks/1"

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""resolve(host, port) -> the host's addresses as strings, in the order to try them."""
Sleep = Callable[[float], Awaitable[None]]


def sign(secret: str, message_id: str, timestamp: int, payload: bytes) -> str:
    """The Standard Webhooks v1 signature "v1,<base64 HMAC-SHA256>" of one message."""
    key = decode_secret(secret)
    signed = f"{message_id}.{timestamp}.".encode() + payload
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def validate_webhook_url(url: str, config: WebhookConfig) -> None:
    """Checks that need no DNS, for SubmitJob. Raises InvalidRequest("webhook.url", ...)."""
    _target(url, config)


def _target(url: str, config: WebhookConfig) -> WebhookTarget:
    if not config.enabled:
        raise InvalidRequest(FIELD, "webhooks are not enabled on this server (no webhook secret configured)")
    return parse_webhook_url(url, allow_http=config.allow_http, allow=config.allow_list)


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    attempt: int  # 1-based
    time: float  # unix time the attempt started
    http_status: int  # 0 when no response came back
    error: str  # "" on success

    def __post_init__(self) -> None:
        if self.attempt < 1:
            raise ValueError("attempt must be >= 1")
        if self.http_status != 0 and not 100 <= self.http_status <= 599:
            raise ValueError("http_status must be 0 or an HTTP status code")

    @property
    def ok(self) -> bool:
        return 200 <= self.http_status < 300


class _Refused(Exception):
    """A target that must never be contacted: permanent, not retried."""


async def system_resolve(host: str, port: int) -> list[str]:
    """getaddrinfo in the loop's executor (off the event loop); unique addresses, in order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WebhookSender:
    """Delivers signed webhooks. Holds no per-delivery state: one per server, shared by all jobs."""

    def __init__(self, config: WebhookConfig, *, resolver: Resolver | None = None, sleep: Sleep | None = None,
                 connect: webhook_http.Connector | None = None, ssl_context: ssl.SSLContext | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._config = config
        self._resolve = resolver or system_resolve
        self._sleep = sleep or asyncio.sleep
        self._connect = connect or webhook_http.open_tcp
        self._ssl_context = ssl_context
        self._clock = clock or time.time

    @property
    def config(self) -> WebhookConfig:
        return self._config

    def _tls(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()  # certificate and host name checked
        return self._ssl_context

    async def deliver(self, url: str, message_id: str, payload: bytes,
                      on_attempt: Callable[[DeliveryAttempt], Awaitable[None]]) -> bool:
        """POST `payload` (JSON) to `url` until a 2xx answer or `max_attempts`; True when delivered.

        Every attempt goes to `on_attempt` before the next starts (an exception there propagates).
        A refused target (bad URL, internal address) is reported as one attempt and not retried.
        """
        if not message_id or not all(33 <= ord(ch) <= 126 for ch in message_id):
            raise ValueError("message_id must be non-empty printable ASCII without spaces")
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes (a JSON document)")
        for attempt in range(1, self._config.max_attempts + 1):
            if attempt > 1:
                await self._sleep(self._config.backoff_before(attempt))
            started = self._clock()
            status, error, permanent = await self._attempt(url, message_id, payload, int(started))
            await on_attempt(DeliveryAttempt(attempt, started, status, error))
            if 200 <= status < 300:
                return True
            if permanent:
                return False
        return False

    async def _attempt(self, url: str, message_id: str, payload: bytes, timestamp: int) -> tuple[int, str, bool]:
        """(http_status, error, permanent) of one attempt."""
        try:
            target = _target(url, self._config)
        except InvalidRequest as exc:
            return 0, f"refused: {exc.description}", True
        headers = [
            ("User-Agent", USER_AGENT),
            ("Content-Type", "application/json"),
            ("webhook-id", message_id),
            ("webhook-timestamp", str(timestamp)),
            ("webhook-signature", sign(self._config.secret, message_id, timestamp, payload)),
        ]
        timeout = self._config.timeout_seconds
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                addresses = await self._checked_addresses(target)
            status = await webhook_http.post(self._connect, addresses, target, headers, payload,
                                             ssl_context=self._tls() if target.tls else None, deadline=deadline)
        except _Refused as exc:
            return 0, f"refused: {exc}", True
        except TimeoutError:
            return 0, f"timed out after {timeout:g}s", False
        except socket.gaierror as exc:
            return 0, f"could not resolve {target.host}: {exc.strerror or exc}", False
        except ssl.SSLError as exc:
            return 0, f"TLS error: {exc.reason or exc}", False
        except (OSError, EOFError) as exc:
            return 0, f"connection failed: {exc.strerror or str(exc) or type(exc).__name__}", False
        except webhook_http.WebhookProtocolError as exc:
            return 0, f"bad response: {exc}", False
        if 200 <= status < 300:
            return status, "", False
        return status, f"HTTP {status} response", False

    async def _checked_addresses(self, target: WebhookTarget) -> list[str]:
        """The addresses to connect to, each checked; resolved once per attempt, never again."""
        if target.literal_ip is not None:
            addresses = [target.literal_ip]
        else:
            answers = await self._resolve(target.host, target.port)
            addresses = []
            for answer in answers:
                try:
                    addresses.append(ipaddress.ip_address(str(answer)))
                except ValueError:
                    raise _Refused(f"{target.host} resolved to {answer!r}, which is not an address") from None
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no addresses returned")  # may be transient: retried
        refusal = check_addresses(target.host, addresses, self._config.allow_list)
        if refusal is not None:
            raise _Refused(refusal)
        return [str(address) for address in addresses]
