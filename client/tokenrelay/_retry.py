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

from tokenrelay.errors import DeadlineExceededError, TokenRelayError, from_rpc_error

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

    def delay_or_raise(self, exc: grpc.RpcError, attempt: int, deadline: Deadline) -> float:
        """`next_delay` for a failed attempt; raises its typed TokenRelayError when not retried."""
        error = from_rpc_error(exc)
        delay = self.next_delay(error, attempt, deadline)
        if delay is None:
            raise error from None
        return delay


@dataclass(slots=True)
class JobWait:
    """The decisions of Client.wait and AsyncClient.wait; each loop only does its own I/O.

    A round gets the job, then watches it while the server has WatchJob. UNIMPLEMENTED
    switches to polling GetJob every `poll_interval`; UNAVAILABLE is retried up to
    `policy.retries` times in a row (an event seen resets that count); a watch that ends
    without the job ending resets the backoff; anything else raises. Never waits past
    `timeout`, raising DeadlineExceededError instead.
    """

    job_id: str
    timeout: float | None
    policy: RetryPolicy
    poll_interval: float
    deadline: Deadline = field(init=False)
    watch_supported: bool = field(default=True, init=False)
    attempt: int = field(default=0, init=False)
    unavailable: int = field(default=0, init=False)  # consecutive UNAVAILABLE failures

    def __post_init__(self) -> None:
        self.deadline = Deadline(self.timeout)

    def event_seen(self) -> None:
        self.unavailable = 0

    def watch_ended(self) -> None:
        self.attempt = 0

    def failed(self, error: TokenRelayError) -> None:
        """Call from the round's `except`: returns to go on waiting, else raises."""
        if error.code == grpc.StatusCode.UNIMPLEMENTED and self.watch_supported:
            self.watch_supported = False
        elif error.code == grpc.StatusCode.DEADLINE_EXCEEDED or self.deadline.expired():
            raise self.timed_out() from None
        elif error.code != grpc.StatusCode.UNAVAILABLE or self.unavailable >= self.policy.retries:
            raise error
        else:
            self.unavailable += 1

    def next_pause(self) -> float:
        """Seconds to sleep before the next round; raises if that would pass the deadline."""
        pause = self.poll_interval if not self.watch_supported else self.policy.backoff(self.attempt)
        self.attempt += 1
        remaining = self.deadline.remaining()
        if remaining is not None and pause >= remaining:
            raise self.timed_out()
        return pause

    def timed_out(self) -> DeadlineExceededError:
        return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"job {self.job_id} did not end within {self.timeout} s")
