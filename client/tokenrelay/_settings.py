"""Client settings: constructor arguments first, then TOKENRELAY_* environment variables, then
defaults. Resolved once when a Client / AsyncClient is built.

| argument | environment variable | default |
| --- | --- | --- |
| target | TOKENRELAY_TARGET | localhost:50051 |
| timeout | TOKENRELAY_TIMEOUT (seconds; "none" for no deadline) | 600 s |
| max_retries | TOKENRELAY_MAX_RETRIES | 2 |
| api_key | TOKENRELAY_API_KEY | none |
| tls | TOKENRELAY_TLS (1/true/yes) | off (on when any TLS file or server name is set) |
| ca_cert | TOKENRELAY_CA_CERT (PEM file) | system roots |
| client_cert, client_key | TOKENRELAY_CLIENT_CERT, TOKENRELAY_CLIENT_KEY (PEM files, mTLS) | none |
| server_name | TOKENRELAY_SERVER_NAME | the target's host |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenrelay._retry import DEFAULT_MAX_RETRIES, UNSET, RetryPolicy
from tokenrelay._security import ChannelSecurity, PemSource

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT = 600.0  # seconds, for a whole call including its retries
ENV_PREFIX = "TOKENRELAY_"


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(ENV_PREFIX + name, "").strip()
    return value or None


def _env_bool(env: Mapping[str, str], name: str) -> bool:
    value = _env(env, name)
    if value is None:
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_PREFIX}{name}={value!r}: expected 1/true/yes or 0/false/no")


def _env_number(env: Mapping[str, str], name: str, kind: type[float] | type[int], low: float) -> Any:
    """The variable as a number >= low (> 0 for timeouts); None when unset."""
    value = _env(env, name)
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number < low or (kind is float and number == 0):
        raise ValueError(f"{ENV_PREFIX}{name}={value!r}: expected a {kind.__name__} "
                         f"{'> 0' if kind is float else f'>= {low}'}")
    return number


@dataclass(slots=True, frozen=True)
class ClientSettings:
    target: str
    timeout: float | None
    retry: RetryPolicy
    security: ChannelSecurity

    @classmethod
    def resolve(cls, *, target: str | None, timeout: Any, max_retries: int | None,
                tls: bool | None, ca_cert: PemSource, client_cert: PemSource,
                client_key: PemSource, server_name: str | None, api_key: str | None,
                env: Mapping[str, str] | None = None) -> ClientSettings:
        """`timeout` is UNSET when not given (None means no deadline)."""
        env = os.environ if env is None else env
        if timeout is UNSET:
            raw = _env(env, "TIMEOUT")
            timeout = None if raw is not None and raw.lower() == "none" else (
                _env_number(env, "TIMEOUT", float, 0) if raw is not None else DEFAULT_TIMEOUT)
        if timeout is not None and not timeout > 0:
            raise ValueError("timeout must be > 0 seconds or None")
        if max_retries is None:
            max_retries = _env_number(env, "MAX_RETRIES", int, 0)
        retry = RetryPolicy(max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries)
        security = ChannelSecurity(
            tls=_env_bool(env, "TLS") if tls is None else tls,
            ca_cert=ca_cert if ca_cert is not None else _env(env, "CA_CERT"),
            client_cert=client_cert if client_cert is not None else _env(env, "CLIENT_CERT"),
            client_key=client_key if client_key is not None else _env(env, "CLIENT_KEY"),
            server_name=server_name if server_name is not None else _env(env, "SERVER_NAME"),
            api_key=api_key if api_key is not None else _env(env, "API_KEY"))
        return cls(target or _env(env, "TARGET") or DEFAULT_TARGET, timeout, retry, security)
