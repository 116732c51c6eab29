"""Job domain rules: transitions, tiers, serialization, config and flags."""

from __future__ import annotations

import argparse

import pytest

from tokenrelay_server.jobs.component import add_jobs_arguments, jobs_config_from_args
from tokenrelay_server.jobs.model import (
    IllegalTransition, Job, JobError, JobsConfig, JobState, JobTier, WebhookDelivery, claim_job, new_job_id,
    requeue_or_dead_letter, transition,
)

from tests.jobs.helpers import make_job


def test_job_ids_carry_128_random_bits() -> None:
    ids = {new_job_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == len("job_") + 32 for i in ids)


def test_tier_priorities_sit_above_interactive_requests() -> None:
    assert [t.base_priority for t in (JobTier.URGENT, JobTier.STANDARD, JobTier.BULK)] == [1000, 2000, 3000]
    job = make_job(tier=JobTier.BULK)
    job.priority = -100
    assert job.engine_priority == 2900 > 100


def test_ended_jobs_do_not_move() -> None:
    job = make_job()
    transition(job, JobState.CANCELLED, 5.0)
    for state in JobState:
        with pytest.raises(IllegalTransition):
            transition(job, state, 6.0)
    assert job.end_time == 5.0 and [t.state for t in job.history] == [JobState.QUEUED, JobState.CANCELLED]


def test_attempts_and_dead_letter() -> None:
    job = make_job(max_attempts=2)
    assert claim_job(job, "r", 10.0, 1.0) and job.attempts == 1 and job.lease_until == 11.0
    requeue_or_dead_letter(job, JobError(13, "x"), 2.0)
    assert job.state is JobState.QUEUED and job.owner == ""
    assert claim_job(job, "r", 10.0, 3.0) and job.attempts == 2
    requeue_or_dead_letter(job, JobError(13, "y"), 4.0)
    assert job.state is JobState.DEAD_LETTER and job.last_error == JobError(13, "y")
    assert not claim_job(job, "r", 10.0, 5.0)


def test_interrupted_attempts_count() -> None:
    job = make_job(max_attempts=1)
    assert claim_job(job, "dead", 1.0, 1.0)
    assert not claim_job(job, "other", 1.0, 10.0)  # the one attempt was cut off
    assert job.state is JobState.DEAD_LETTER and job.last_error is not None


def test_roundtrip_through_dict() -> None:
    job = make_job(key="k", queue_ttl=5.0, retention=9.0)
    job.webhook_deliveries.append(WebhookDelivery(1, 2.0, 500, "boom"))
    job.result = b"\x00\xff"
    assert Job.from_dict(job.to_dict()) == job


def test_invalid_jobs_and_config_are_refused() -> None:
    with pytest.raises(ValueError):
        make_job(max_attempts=0)
    with pytest.raises(ValueError):
        JobsConfig(store_url="postgres://x")
    with pytest.raises(ValueError):
        JobsConfig(max_running=0)


def test_flags_build_a_typed_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENRELAY_JOBS_STORE", raising=False)
    parser = argparse.ArgumentParser()
    add_jobs_arguments(parser)
    args = parser.parse_args(["--jobs-store", "redis://127.0.0.1:6379/2", "--jobs-max-running", "3",
                              "--jobs-queue-ttl-seconds", "60", "--jobs-retention-seconds", "120",
                              "--jobs-max-attempts", "4", "--jobs-lease-seconds", "9", "--replica-id", "r7"])
    config = jobs_config_from_args(args)
    assert (config.store_url, config.max_running, config.queue_ttl, config.retention, config.max_attempts,
            config.lease, config.replica_id) == ("redis://127.0.0.1:6379/2", 3, 60.0, 120.0, 4, 9.0, "r7")
    defaults = jobs_config_from_args(parser.parse_args([]))
    assert defaults.store_url.startswith("sqlite://") and defaults.replica_id.startswith("local-")
    with pytest.raises(ValueError):
        jobs_config_from_args(parser.parse_args(["--jobs-max-running", "0"]))
