"""The job store interface: one abstract class, implemented by SQLite and Redis.

Every method is atomic on its own: a state change, its history entry and its side effects
(queue entry, token deltas) commit together or not at all. Times are unix seconds passed in by
the caller, so tests control the clock.
"""

from __future__ import annotations

import abc
from urllib.parse import urlparse

from tokenrelay_server.jobs.model import Delta, IdempotencyConflict, Job, JobError, JobState, WebhookDelivery


class StoreUnavailable(ConnectionError):
    """The store cannot be reached now (an outage): worth retrying. Stores raise it for their
    client's connection / timeout errors; the API answers UNAVAILABLE, workers retry with backoff."""


class JobStore(abc.ABC):
    """Every method may raise StoreUnavailable while the store is down."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect / create the schema."""

    async def ping(self) -> None:  # noqa: B027 - optional hook
        """Raises StoreUnavailable when the store cannot serve now (the readiness probe)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- the API side -----------------------------------------------------------------------
    @abc.abstractmethod
    async def create(self, job: Job) -> tuple[Job, bool]:
        """Store a new queued job durably. With an idempotency key already bound: returns the
        existing job and False (IdempotencyConflict when its fingerprint differs)."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> Job:
        """Raises JobNotFound."""

    @abc.abstractmethod
    async def list(self, states: frozenset[JobState], page_size: int, page_token: str,
                   tenant: str | None = None) -> tuple[list[Job], str]:
        """Jobs in creation order, filtered by state (empty: all) and by tenant (None: every
        tenant); returns the next page token ("" on the last page). Raises ValueError for a page
        token it did not issue."""

    @abc.abstractmethod
    async def delete(self, job_id: str) -> None:
        """Removes the job and its output. Raises JobNotFound."""

    @abc.abstractmethod
    async def read_deltas(self, job_id: str, from_offset: int = 0) -> list[Delta]:
        """Persisted output deltas that end after token `from_offset`, in order."""

    @abc.abstractmethod
    async def wait_for_update(self, job_id: str, version: int, timeout: float) -> None:
        """Returns once the job's version may be past `version`, or after `timeout` seconds."""

    # -- the worker side --------------------------------------------------------------------
    @abc.abstractmethod
    async def claim(self, replica_id: str, lease: float, now: float) -> Job | None:
        """The next runnable job for `replica_id`, urgent tier first, oldest first; also running
        jobs whose lease expired (their replica died). Starts an attempt (RUNNING, attempts+1).
        Queued jobs past their TTL met on the way are expired."""

    @abc.abstractmethod
    async def recover(self, replica_id: str, now: float) -> int:
        """At startup: jobs this replica was running when it died go back to the queue (the
        attempt counts). Returns how many."""

    @abc.abstractmethod
    async def heartbeat(self, job_id: str, replica_id: str, lease: float, now: float) -> bool:
        """Extends the lease; False when the job is no longer running on this replica."""

    @abc.abstractmethod
    async def append_output(self, job_id: str, replica_id: str, delta: Delta, now: float) -> bool:
        """Persists one delta of a running job owned by `replica_id`; False (nothing written)
        when the job is not ours any more or the offsets do not continue the persisted output.
        Idempotent for the last delta: a retry after a lost reply returns True, writing nothing."""

    @abc.abstractmethod
    async def finish(self, job_id: str, replica_id: str | None, state: JobState, now: float, *,
                     result: bytes | None = None, error: JobError | None = None) -> Job | None:
        """The single terminal transition. With `replica_id`, only if the job runs there; with
        None (cancel), from queued or running. Returns None when the job already ended (or is
        not ours): nothing is written. Raises JobNotFound."""

    @abc.abstractmethod
    async def release(self, job_id: str, replica_id: str, now: float, *, error: JobError | None,
                      count_attempt: bool = True) -> Job | None:
        """An attempt ended without a result: back to the queue, or dead-letter when attempts are
        used up. None when the job is not running on this replica."""

    @abc.abstractmethod
    async def add_webhook_delivery(self, job_id: str, delivery: WebhookDelivery) -> None: ...

    @abc.abstractmethod
    async def sweep(self, now: float) -> tuple[list[Job], int]:
        """Expires queued jobs past their TTL and deletes ended jobs past their retention.
        Returns (expired jobs, number deleted)."""


def check_idempotency(existing: Job, job: Job) -> None:
    if existing.fingerprint != job.fingerprint:
        raise IdempotencyConflict(job.idempotency_key, existing.job_id)


def open_store(url: str, *, notify_poll: float = 0.5) -> JobStore:
    """`sqlite:///abs/path/jobs.db`, `sqlite://relative/jobs.db` or `redis://host:port/db`."""
    scheme = urlparse(url).scheme
    if scheme == "sqlite":
        from tokenrelay_server.jobs.sqlite_store import SqliteJobStore

        path = url[len("sqlite://"):]
        if not path:
            raise ValueError("sqlite jobs store needs a path: sqlite:///path/jobs.db")
        return SqliteJobStore(path, notify_poll=notify_poll)
    if scheme in ("redis", "rediss"):
        from tokenrelay_server.jobs.redis_store import RedisJobStore

        return RedisJobStore(url)
    raise ValueError(f"unknown jobs store {url!r}: use sqlite:///path or redis://host:port/db")
