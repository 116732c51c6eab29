"""Typed webhook configuration, built once in `server.main` from flags and env vars."""

from __future__ import annotations

import argparse
import base64
import binascii
import math
from dataclasses import dataclass, field

from tokenrelay_server.jobs.webhook_url import AllowList

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a "whsec_<base64>" secret. Raises ValueError (without echoing the secret)."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("webhook secret must be 'whsec_' followed by base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret must decode to at least {MIN_SECRET_BYTES} bytes")
    return key


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    secret: str = field(default="", repr=False)  # "whsec_<base64>"; "" disables webhooks
    allow_private_hosts: tuple[str, ...] = ()  # host names ("*.suffix" too), IPs or CIDRs let through
    max_attempts: int = 5
    backoff_seconds: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)  # before attempt 2, 3, ...; last repeats
    timeout_seconds: float = 10.0  # per attempt: resolve, connect, send, read the status
    allow_http: bool = False  # plain http only when the operator allows it
    allow_list: AllowList = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.secret:
            decode_secret(self.secret)
        if isinstance(self.allow_private_hosts, str):
            raise ValueError("allow_private_hosts must be a tuple of entries, not one string")
        object.__setattr__(self, "allow_list", AllowList.parse(tuple(self.allow_private_hosts)))
        if self.max_attempts < 1:
            raise ValueError("webhook max_attempts must be >= 1")
        if not self.backoff_seconds or not all(math.isfinite(s) and s >= 0 for s in self.backoff_seconds):
            raise ValueError("webhook backoff_seconds must be a non-empty list of finite delays >= 0")
        if not (math.isfinite(self.timeout_seconds) and self.timeout_seconds > 0):
            raise ValueError("webhook timeout_seconds must be > 0")

    @property
    def enabled(self) -> bool:
        return bool(self.secret)

    def backoff_before(self, attempt: int) -> float:
        """The delay before attempt number `attempt` (2, 3, ...); the last delay repeats."""
        return self.backoff_seconds[min(attempt - 2, len(self.backoff_seconds) - 1)]


def _secret_arg(value: str) -> str:
    if value:
        try:
            decode_secret(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError("must be > 0")
    return seconds


def _backoff(value: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a comma-separated list of seconds") from None
    if not all(math.isfinite(d) and d >= 0 for d in delays):
        raise argparse.ArgumentTypeError("delays must be finite and >= 0")
    return delays


def _allow_entry(value: str) -> str:
    try:
        AllowList.parse((value,))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_webhook_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = WebhookConfig()
    group = parser.add_argument_group("webhooks")
    group.add_argument("--webhook-secret", type=_secret_arg, default="",
                       metavar="whsec_...",
                       help="Standard Webhooks signing secret; empty disables webhooks")
    group.add_argument("--webhook-allow-host", dest="webhook_allow_hosts", action="append", default=[],
                       type=_allow_entry, metavar="HOST|IP|CIDR",
                       help="let webhooks reach this private/loopback host, address or network (repeatable)")
    group.add_argument("--webhook-max-attempts", type=_positive_int, default=defaults.max_attempts,
                       help="delivery attempts per webhook before giving up")
    group.add_argument("--webhook-backoff", type=_backoff, default=defaults.backoff_seconds, metavar="S,S,...",
                       help="seconds before attempt 2, 3, ...; the last repeats")
    group.add_argument("--webhook-timeout", type=_seconds, default=defaults.timeout_seconds,
                       help="seconds per delivery attempt")
    group.add_argument("--webhook-allow-http", action="store_true",
                       help="accept plain http:// callback URLs (https only otherwise)")


def webhook_config_from_args(args: argparse.Namespace) -> WebhookConfig:
    return WebhookConfig(
        secret=args.webhook_secret,
        allow_private_hosts=tuple(args.webhook_allow_hosts),
        max_attempts=args.webhook_max_attempts,
        backoff_seconds=tuple(args.webhook_backoff),
        timeout_seconds=args.webhook_timeout,
        allow_http=args.webhook_allow_http,
    )
