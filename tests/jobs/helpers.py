"""Shared helpers for the jobs tests: building jobs, bounded waits, a flaky engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from tokenrelay.v1 import generation_pb2, jobs_pb2

from tokenrelay_engines.base import AsyncEngine, FinishReason, Request, RequestOutput, Usage
from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig
from tokenrelay_server.jobs import convert
from tokenrelay_server.jobs.model import Job, JobsConfig, JobState, JobTier, Transition, new_job_id
from tokenrelay_server.jobs.store import JobStore
from tokenrelay_server.limits import InputLimits


def submit_request(max_tokens: int = 8, *, prompt: str = "hello", seed: int | None = None,
                   priority: int = jobs_pb2.JOB_PRIORITY_STANDARD, **kw) -> jobs_pb2.SubmitJobRequest:
    params = generation_pb2.GenerationParams(text=prompt, stopping=generation_pb2.StoppingCriteria(
        max_tokens=max_tokens, ignore_eos=True))
    if seed is not None:
        params.sampling.seed = seed
    return jobs_pb2.SubmitJobRequest(params=params, priority=priority, **kw)


def build_job(engine: AsyncEngine, request: jobs_pb2.SubmitJobRequest, config: JobsConfig | None = None) -> Job:
    return convert.job_from_submit(request, config=config or JobsConfig(), info=engine.info(),
                                   tokenize=engine.tokenize, check_webhook=None, now=time.time(),
                                   limits=InputLimits())


async def wait_job(store: JobStore, job_id: str, predicate: Callable[[Job], bool], timeout: float = 15.0) -> Job:
    """Wait (bounded) until the stored job satisfies `predicate`; woken by the store's updates."""
    deadline = time.monotonic() + timeout
    while True:
        job = await store.get(job_id)
        if predicate(job):
            return job
        left = deadline - time.monotonic()
        assert left > 0, f"job {job_id} never reached the expected condition; last state {job.state}"
        await store.wait_for_update(job_id, job.version, min(left, 0.5))


async def started_synthetic(**kw) -> SyntheticEngine:
    engine = SyntheticEngine(SyntheticEngineConfig(**{"ttft_ms": 2.0, "itl_ms": 1.0, **kw}))
    await engine.start()
    return engine


class FlakyEngine:
    """Wraps an engine: the first `failures` requests end with FinishReason.ERROR."""

    def __init__(self, inner: AsyncEngine, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def add_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        self.calls += 1
        if self.calls <= self.failures:
            return self._fail(request)
        return self.inner.add_request(request)

    async def _fail(self, request: Request) -> AsyncIterator[RequestOutput]:
        yield RequestOutput(request_id=request.request_id, finished=True, finish_reason=FinishReason.ERROR,
                            usage=Usage(len(request.prompt_token_ids), 0), error=f"injected failure {self.calls}")


def make_job(*, tier: JobTier = JobTier.STANDARD, now: float = 1000.0, key: str = "", fingerprint: str = "fp",
             max_attempts: int = 3, queue_ttl: float = 0.0, retention: float = 0.0, max_tokens: int = 8) -> Job:
    return Job(job_id=new_job_id(), tier=tier, params=b"\x01\x02", fingerprint=fingerprint, seed=7,
               max_tokens=max_tokens, idempotency_key=key, max_attempts=max_attempts, queue_ttl=queue_ttl,
               retention=retention, create_time=now, update_time=now,
               history=[Transition(JobState.QUEUED, now)], labels={"team": "a"})
