"""Domain types of durable jobs: Job, its states and tiers, and the legal transitions.

Stores persist these; the manager and the servicer change them only through the transition
functions here, so both stores share one state machine. The request and the result are kept
as opaque wire bytes (`GenerationParams` / `GenerationResult`): only `server.jobs.convert`
interprets them, protobuf stays out of everything else.
"""

from __future__ import annotations

import base64
import enum
import secrets
from dataclasses import dataclass, field

from tokenrelay_server.jobs.webhook_config import WebhookConfig


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DEAD_LETTER = "dead_letter"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


# state -> states it may move to
_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.EXPIRED,
                                JobState.FAILED, JobState.DEAD_LETTER}),
    JobState.RUNNING: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED,
                                 JobState.FAILED, JobState.CANCELLED, JobState.DEAD_LETTER}),
}


class JobTier(enum.Enum):
    """Priority tier; the engine priority of a job is `base_priority + params.priority`."""

    URGENT = "urgent"
    STANDARD = "standard"
    BULK = "bulk"

    @property
    def base_priority(self) -> int:
        return {JobTier.URGENT: 1000, JobTier.STANDARD: 2000, JobTier.BULK: 3000}[self]

    @property
    def rank(self) -> int:
        """Claim order: urgent (0) before standard (1) before bulk (2)."""
        return {JobTier.URGENT: 0, JobTier.STANDARD: 1, JobTier.BULK: 2}[self]


TIERS_IN_CLAIM_ORDER = (JobTier.URGENT, JobTier.STANDARD, JobTier.BULK)


class JobNotFound(KeyError):
    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class IdempotencyConflict(ValueError):
    """The idempotency key is already bound to a job made from a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} is already used by job {job_id} with a different request")
        self.key = key
        self.job_id = job_id


class IllegalTransition(ValueError):
    pass


def new_job_id() -> str:
    return "job_" + secrets.token_hex(16)  # 128 random bits


@dataclass(slots=True, frozen=True)
class Transition:
    state: JobState
    time: float  # unix seconds


@dataclass(slots=True, frozen=True)
class JobError:
    code: int  # a google.rpc.Code value
    message: str


@dataclass(slots=True, frozen=True)
class WebhookDelivery:
    attempt: int
    time: float
    http_status: int
    error: str


@dataclass(slots=True, frozen=True)
class Delta:
    """Output tokens [offset, offset + len(token_ids)) and the text they added."""

    offset: int
    token_ids: tuple[int, ...]
    text: str
    text_offset: int = 0  # length of the output text before this delta

    def __post_init__(self) -> None:
        if self.offset < 0 or self.text_offset < 0:
            raise ValueError("delta offsets must be >= 0")


@dataclass(slots=True)
class Progress:
    """The part of a job that changes while it runs (per output delta, per heartbeat).

    Stores keep it beside the job document (a row of its own / a hash field), so persisting a
    delta or a heartbeat writes these few fields and never the document (params included).
    `state` and `owner` change only with the document; they are here so ownership can be
    checked without reading it.
    """

    state: JobState
    owner: str
    lease_until: float
    completion_tokens: int
    text_chars: int
    update_time: float
    version: int

    def to_list(self) -> list:
        return [self.state.value, self.owner, self.lease_until, self.completion_tokens, self.text_chars,
                self.update_time, self.version]

    @classmethod
    def from_list(cls, v: list) -> Progress:
        return cls(JobState(v[0]), v[1], v[2], v[3], v[4], v[5], v[6])


@dataclass(slots=True)
class Job:
    job_id: str
    tier: JobTier
    params: bytes  # GenerationParams wire bytes, seed filled in
    fingerprint: str  # of the submitted request, for idempotency
    seed: int
    max_tokens: int
    priority: int = 0  # params.priority, within the tier
    idempotency_key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    webhook_url: str = ""
    queue_ttl: float = 0.0  # seconds; 0: never expires in the queue
    retention: float = 0.0  # seconds after the end; 0: kept forever
    max_attempts: int = 1
    state: JobState = JobState.QUEUED
    history: list[Transition] = field(default_factory=list)
    create_time: float = 0.0
    update_time: float = 0.0
    end_time: float | None = None
    attempts: int = 0
    completion_tokens: int = 0  # persisted output tokens
    text_chars: int = 0  # persisted output text length
    result: bytes | None = None  # GenerationResult wire bytes
    last_error: JobError | None = None
    webhook_deliveries: list[WebhookDelivery] = field(default_factory=list)
    owner: str = ""  # replica running it
    lease_until: float = 0.0  # unix seconds
    version: int = 0  # bumped on every change (watchers wait on it)
    tenant: str = ""  # who submitted it ("" without authentication); others see NOT_FOUND
    trace_parent: str = ""  # W3C traceparent of the submitting call; attempts link to it

    def __post_init__(self) -> None:
        if not self.job_id:
            raise ValueError("job_id must be non-empty")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.queue_ttl < 0 or self.retention < 0:
            raise ValueError("queue_ttl and retention must be >= 0")
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")

    @property
    def idempotency_scope(self) -> str:
        """The stored idempotency key: per tenant ("" when the job has no key)."""
        if not self.idempotency_key or not self.tenant:
            return self.idempotency_key
        return f"{self.tenant}\x1f{self.idempotency_key}"

    @property
    def engine_priority(self) -> int:
        return self.tier.base_priority + self.priority

    @property
    def queue_deadline(self) -> float | None:
        return self.create_time + self.queue_ttl if self.queue_ttl > 0 else None

    @property
    def delete_time(self) -> float | None:
        if self.end_time is None or self.retention <= 0:
            return None
        return self.end_time + self.retention

    @property
    def expire_time(self) -> float | None:
        """When a queued job expires, or when an ended job is deleted."""
        return self.delete_time if self.state.terminal else self.queue_deadline

    # -- serialization: stores keep one JSON document per job, written on state changes, and
    # its Progress beside it, written on every delta and heartbeat ---------------------------
    @property
    def progress(self) -> Progress:
        return Progress(self.state, self.owner, self.lease_until, self.completion_tokens, self.text_chars,
                        self.update_time, self.version)

    def apply(self, progress: Progress) -> None:
        """Overlay the stored progress on a job read from its (older) document."""
        self.state, self.owner, self.lease_until = progress.state, progress.owner, progress.lease_until
        self.completion_tokens, self.text_chars = progress.completion_tokens, progress.text_chars
        self.update_time, self.version = progress.update_time, progress.version

    def to_dict(self) -> dict:
        return {
            "job_id": self.job_id, "tier": self.tier.value,
            "params": base64.b64encode(self.params).decode(), "fingerprint": self.fingerprint,
            "seed": self.seed, "max_tokens": self.max_tokens, "priority": self.priority,
            "idempotency_key": self.idempotency_key, "labels": self.labels,
            "webhook_url": self.webhook_url, "queue_ttl": self.queue_ttl, "retention": self.retention,
            "max_attempts": self.max_attempts, "state": self.state.value,
            "history": [[t.state.value, t.time] for t in self.history],
            "create_time": self.create_time, "update_time": self.update_time, "end_time": self.end_time,
            "attempts": self.attempts, "completion_tokens": self.completion_tokens,
            "text_chars": self.text_chars,
            "result": None if self.result is None else base64.b64encode(self.result).decode(),
            "last_error": None if self.last_error is None else [self.last_error.code, self.last_error.message],
            "webhook_deliveries": [[d.attempt, d.time, d.http_status, d.error] for d in self.webhook_deliveries],
            "owner": self.owner, "lease_until": self.lease_until, "version": self.version,
            "tenant": self.tenant, "trace_parent": self.trace_parent,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Job:
        return cls(
            job_id=d["job_id"], tier=JobTier(d["tier"]), params=base64.b64decode(d["params"]),
            fingerprint=d["fingerprint"], seed=d["seed"], max_tokens=d["max_tokens"],
            priority=d["priority"], idempotency_key=d["idempotency_key"], labels=dict(d["labels"]),
            webhook_url=d["webhook_url"], queue_ttl=d["queue_ttl"], retention=d["retention"],
            max_attempts=d["max_attempts"], state=JobState(d["state"]),
            history=[Transition(JobState(s), t) for s, t in d["history"]],
            create_time=d["create_time"], update_time=d["update_time"], end_time=d["end_time"],
            attempts=d["attempts"], completion_tokens=d["completion_tokens"], text_chars=d["text_chars"],
            result=None if d["result"] is None else base64.b64decode(d["result"]),
            last_error=None if d["last_error"] is None else JobError(*d["last_error"]),
            webhook_deliveries=[WebhookDelivery(*w) for w in d["webhook_deliveries"]],
            owner=d["owner"], lease_until=d["lease_until"], version=d["version"],
            tenant=d.get("tenant", ""), trace_parent=d.get("trace_parent", ""),
        )


def transition(job: Job, state: JobState, now: float) -> None:
    """Move `job` to `state`, recording the time; raises IllegalTransition from an ended job."""
    allowed = _TRANSITIONS.get(job.state, frozenset())
    if state not in allowed:
        raise IllegalTransition(f"job {job.job_id}: {job.state.value} -> {state.value}")
    job.state = state
    job.history.append(Transition(state, now))
    job.update_time = now
    job.version += 1
    if state.terminal:
        job.end_time = now
        job.owner = ""
        job.lease_until = 0.0


def start_attempt(job: Job, replica_id: str, lease: float, now: float) -> None:
    """A replica claimed the job: a new attempt begins (also for a job taken from a dead replica)."""
    transition(job, JobState.RUNNING, now)
    job.attempts += 1
    job.owner = replica_id
    job.lease_until = now + lease


def queue_expired(job: Job, now: float) -> bool:
    """A queued job that never started within its queue TTL."""
    deadline = job.queue_deadline
    return (job.state is JobState.QUEUED and deadline is not None and now >= deadline
            and not any(t.state is JobState.RUNNING for t in job.history))


def requeue_or_dead_letter(job: Job, error: JobError | None, now: float, *, count_attempt: bool = True) -> None:
    """A running attempt ended without a result: queue the job again, or dead-letter it when
    its attempts are used up. `count_attempt=False` (a graceful stop) gives the attempt back."""
    if error is not None:
        job.last_error = error
    if not count_attempt:
        job.attempts = max(0, job.attempts - 1)
    if job.attempts >= job.max_attempts:
        transition(job, JobState.DEAD_LETTER, now)
    else:
        transition(job, JobState.QUEUED, now)
        job.owner = ""
        job.lease_until = 0.0


def claim_job(job: Job, replica_id: str, lease: float, now: float) -> bool:
    """Start an attempt on a claimed job; False when the job is not runnable (it ended, expired,
    or ran out of attempts: the job is updated accordingly)."""
    if job.state.terminal:
        return False
    if queue_expired(job, now):
        transition(job, JobState.EXPIRED, now)
        return False
    if job.attempts >= job.max_attempts:  # earlier attempts were cut off (replica lost)
        job.last_error = job.last_error or JobError(14, f"{job.attempts} attempts interrupted (replica lost)")
        transition(job, JobState.DEAD_LETTER, now)
        return False
    start_attempt(job, replica_id, lease, now)
    return True


def retention_over(job: Job, now: float) -> bool:
    delete_time = job.delete_time
    return job.state.terminal and delete_time is not None and now >= delete_time


def merge_deltas(deltas: list[Delta], from_offset: int = 0) -> tuple[list[int], str]:
    """The output token ids from `from_offset` on, and the text of the deltas wholly after it."""
    ids: list[int] = []
    text: list[str] = []
    for d in deltas:
        end = d.offset + len(d.token_ids)
        if end <= from_offset:
            continue
        ids.extend(d.token_ids[max(0, from_offset - d.offset):])
        if d.offset >= from_offset:
            text.append(d.text)
    return ids, "".join(text)


@dataclass(slots=True, frozen=True)
class JobsConfig:
    """Typed jobs configuration, built once from flags (`server.jobs.component`)."""

    store_url: str = "sqlite://tokenrelay-jobs.sqlite"  # relative: the working dir
    max_running: int = 8  # jobs in the engine at once, per replica
    queue_ttl: float = 24 * 3600.0  # default per job, seconds; 0: never
    retention: float = 7 * 24 * 3600.0  # default per job, seconds; 0: forever
    max_attempts: int = 3  # default per job
    lease: float = 30.0  # seconds a claim lasts without a heartbeat
    replica_id: str = ""  # "" : a random one per process
    poll_interval: float = 0.5  # seconds between claim attempts when idle (a submit wakes it at once)
    sweep_interval: float = 1.0  # seconds between TTL / retention sweeps
    stop_grace: float = 5.0  # seconds running jobs get to finish on stop before going back
    store_check_interval: float = 1.0  # seconds between store pings (Jobs readiness follows the store)
    webhook: WebhookConfig | None = None  # None or no secret: webhooks refused at submit

    def __post_init__(self) -> None:
        if not (self.store_url.startswith("sqlite://") or self.store_url.startswith("redis://")
                or self.store_url.startswith("rediss://")):
            raise ValueError(f"jobs store must be sqlite:///path or redis://host:port/db, not {self.store_url!r}")
        if self.max_running < 1:
            raise ValueError("jobs max running must be >= 1")
        if self.queue_ttl < 0 or self.retention < 0:
            raise ValueError("jobs queue ttl and retention must be >= 0")
        if self.max_attempts < 1:
            raise ValueError("jobs max attempts must be >= 1")
        if (self.lease <= 0 or self.poll_interval <= 0 or self.sweep_interval <= 0 or self.stop_grace < 0
                or self.store_check_interval <= 0):
            raise ValueError("jobs lease, poll, sweep and store check intervals must be > 0, stop grace >= 0")
