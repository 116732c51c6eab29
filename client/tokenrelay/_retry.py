"""Retry policy and call deadlines shared by Client and AsyncClient.

Only UNAVAILABLE is retried (the server is down, restarting or draining: the request did not
run), with exponential backoff and jitter, and never past the call's deadline. Streams are
retried only before their first event, so a consumer never sees an event twice.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from tokenrelay.errors import TokenRelayError

Metadata = Sequence[tuple[str, str | bytes]] | Mapping[str, str]
UNSET: Any = object()  # "use the client's default timeout" (None means no deadline)


def merge_metadata(base: Sequence[tuple[str, Any]], extra: Metadata | None
                   ) -> tuple[tuple[str, Any], ...]:
    if extra is None:
        return tuple(base)
    pairs = extra.items() if isinstance(extra, Mapping) else extra
    return (*base, *pairs)


@dataclass(slots=True)
class Deadline:
    """An absolute time.monotonic() deadline for one logical call (all its attempts)."""

    timeout: float | None
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.timeout is not None and not self.timeout >= 0:
            raise ValueError("timeout must be >= 0 seconds (or None for no deadline)")

    def remaining(self) -> float | None:
        if self.timeout is None:
            return None
        return max(0.0, self.start + self.timeout - time.monotonic())

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0


@dataclass(slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits in [cap/2, cap], cap = initial * 2^k."""

    retries: int = 3
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")

    def backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.initial_backoff * (2 ** attempt))
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def next_delay(self, error: TokenRelayError, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up and raise."""
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        delay = self.backoff(attempt)
        if error.retry_delay is not None:
            delay = max(delay, min(error.retry_delay, self.max_backoff))
        remaining = deadline.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay
