"""Retry policy and call deadlines shared by Client and AsyncClient.

Retried: UNAVAILABLE (the server is down, restarting or draining) and RESOURCE_EXHAUSTED with
a RetryInfo delay (the queue or a tenant quota is full: the request was refused before it ran),
with exponential backoff and jitter, waiting at least the server's RetryInfo delay, never past
the call's deadline. Nothing else is retried. A retried call must be safe to repeat: generation
and reads are; SubmitJob always carries an idempotency key (the client makes one up when the
caller gives none), so a retry returns the job the lost attempt stored; DeleteJob's retry
treats NOT_FOUND as done. Streams are retried only before their first event, so a consumer
never sees an event twice.
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
MetadataPairs = tuple[tuple[str, str | bytes], ...]
UNSET: Any = object()  # "use the client's default timeout" (None means no deadline)


def merge_metadata(base: Sequence[tuple[str, str | bytes]], extra: Metadata | None) -> MetadataPairs:
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


DEFAULT_MAX_RETRIES = 2


@dataclass(slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits in [cap/2, cap], cap = initial * 2^k;
    with a RetryInfo delay d, at least d (jittered up to d * 1.25, at most max_retry_delay)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    max_retry_delay: float = 60.0  # the longest server hint honoured; longer ones are not retried
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")

    @property
    def retries(self) -> int:  # the former name
        return self.max_retries

    def backoff(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.initial_backoff * (2.0 ** attempt))
        return cap / 2 + self.rng.uniform(0, cap / 2)

    @staticmethod
    def retryable(error: TokenRelayError) -> bool:
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return True
        # A full queue or quota says when to come back; RESOURCE_EXHAUSTED without a hint is
        # e.g. a message over grpc's size limit, which a retry cannot fix.
        return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None

    def next_delay(self, error: TokenRelayError, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before retry number `attempt + 1`, or None to give up and raise."""
        if not self.retryable(error) or attempt >= self.max_retries:
            return None
        delay = self.backoff(attempt)
        hint = error.retry_delay
        if hint is not None:
            if hint > self.max_retry_delay:
                return None
            delay = max(delay, hint * (1 + self.rng.uniform(0, 0.25)))
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
    switches to polling GetJob every `poll_interval`; retryable failures are retried up to
    `policy.max_retries` times in a row (an event seen resets that count); a watch that ends
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
    unavailable: int = field(default=0, init=False)  # consecutive retryable failures
    hint: float | None = field(default=None, init=False)  # the last failure's RetryInfo delay

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
        elif not RetryPolicy.retryable(error) or self.unavailable >= self.policy.max_retries:
            raise error
        else:
            self.unavailable += 1
            self.hint = error.retry_delay

    def next_pause(self) -> float:
        """Seconds to sleep before the next round; raises if that would pass the deadline."""
        pause = self.poll_interval if not self.watch_supported else self.policy.backoff(self.attempt)
        if self.hint is not None:
            pause, self.hint = max(pause, self.hint), None
        self.attempt += 1
        remaining = self.deadline.remaining()
        if remaining is not None and pause >= remaining:
            raise self.timed_out()
        return pause

    def timed_out(self) -> DeadlineExceededError:
        return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                     f"job {self.job_id} did not end within {self.timeout} s")
