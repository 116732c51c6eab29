"""The store-side changes of a job: each takes the job (or, for a delta or a heartbeat, only
its Progress) as read inside a store transaction, changes it, and returns False when nothing
may be written. Both stores apply the same rules through these functions."""

from __future__ import annotations

from tokenrelay_server.jobs.model import (
    Delta, Job, JobError, JobState, Progress, WebhookDelivery, queue_expired, requeue_or_dead_letter, transition,
)


def owned_by(job: Job | Progress, replica_id: str) -> bool:
    return job.state is JobState.RUNNING and job.owner == replica_id


def taken_over_by(job: Job, replica_id: str, now: float) -> bool:
    """May `replica_id` claim this running job? Only once its lease lapsed, and never its own: a
    replica still running the job (its heartbeats could not reach the store for a while) must not
    start it twice; its own jobs from before a restart are recovered at start-up."""
    return job.state is JobState.RUNNING and job.lease_until < now and job.owner != replica_id


def extend_lease(job: Job | Progress, replica_id: str, lease: float, now: float) -> bool:
    """A heartbeat: the lease of a job running on `replica_id` runs on."""
    if not owned_by(job, replica_id):
        return False
    job.lease_until = now + lease
    return True


def add_output(job: Job | Progress, replica_id: str, delta: Delta, now: float) -> bool:
    """Count one persisted delta; False when the job is not ours or `delta` does not continue
    the persisted output."""
    if (not owned_by(job, replica_id) or delta.offset != job.completion_tokens
            or delta.text_offset != job.text_chars):
        return False
    job.completion_tokens += len(delta.token_ids)
    job.text_chars += len(delta.text)
    job.update_time = now
    job.version += 1
    return True


def delta_persisted(job: Job | Progress, replica_id: str, delta: Delta) -> bool:
    """`delta` is the last output persisted: a write retried after its reply was lost (the store
    went down after committing it). The retry succeeds without writing it twice."""
    return (owned_by(job, replica_id) and bool(delta.token_ids or delta.text)
            and delta.offset + len(delta.token_ids) == job.completion_tokens
            and delta.text_offset + len(delta.text) == job.text_chars)


def finish_job(job: Job, replica_id: str | None, state: JobState, now: float, *,
               result: bytes | None = None, error: JobError | None = None) -> bool:
    """The terminal transition; with `replica_id`, only while the job runs there."""
    if job.state.terminal or (replica_id is not None and not owned_by(job, replica_id)):
        return False
    transition(job, state, now)
    job.result = result if result is not None else job.result
    job.last_error = error if error is not None else job.last_error
    return True


def release_job(job: Job, replica_id: str, error: JobError | None, now: float, *,
                count_attempt: bool = True) -> bool:
    """An attempt on `replica_id` ended without a result (see requeue_or_dead_letter)."""
    if not owned_by(job, replica_id):
        return False
    requeue_or_dead_letter(job, error, now, count_attempt=count_attempt)
    return True


def recover_job(job: Job, replica_id: str, now: float) -> bool:
    """At startup: a job `replica_id` was running when it died goes back (the attempt counts)."""
    return release_job(job, replica_id, JobError(14, "replica restarted during the attempt"), now)


def record_delivery(job: Job, delivery: WebhookDelivery) -> bool:
    job.webhook_deliveries.append(delivery)
    job.version += 1
    return True


def expire_job(job: Job, now: float) -> bool:
    """A queued job past its queue TTL expires."""
    if not queue_expired(job, now):
        return False
    transition(job, JobState.EXPIRED, now)
    return True
