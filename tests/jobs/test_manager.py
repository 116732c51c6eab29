"""The job worker against a real engine (synthetic) and both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from tokenrelay.v1 import generation_pb2, jobs_pb2

from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria
from tokenrelay_server.jobs import convert
from tokenrelay_server.jobs.manager import JobManager
from tokenrelay_server.jobs.model import Delta, Job, JobsConfig, JobState, Transition, merge_deltas
from tokenrelay_server.jobs.store import JobStore

from tests.jobs.helpers import FlakyEngine, build_job, started_synthetic, submit_request, wait_job

FAST = dict(poll_interval=0.05, sweep_interval=0.05, lease=5.0, stop_grace=0.0)


@contextlib.asynccontextmanager
async def running(manager: JobManager) -> AsyncIterator[JobManager]:
    await manager.start()
    try:
        yield manager
    finally:
        await manager.stop(0)


def result_of(job: Job) -> generation_pb2.GenerationResult:
    assert job.result is not None
    return generation_pb2.GenerationResult.FromString(job.result)


async def direct_tokens(engine, job: Job) -> list[int]:
    params = convert.job_params(job)
    req = Request(request_id=f"direct-{job.job_id}", prompt_token_ids=engine.tokenize(params.text),
                  sampling=SamplingParams(seed=job.seed),
                  stopping=StoppingCriteria(max_tokens=job.max_tokens, ignore_eos=True))
    ids: list[int] = []
    async for out in engine.add_request(req):
        ids += out.token_ids
    return ids


async def test_job_runs_to_success_with_persisted_output(store: JobStore) -> None:
    engine = await started_synthetic()
    manager = JobManager(JobsConfig(**FAST), store, engine)
    async with running(manager):
        job, created = await manager.submit(build_job(engine, submit_request(12)))
        assert created and job.seed > 0
        done = await wait_job(store, job.job_id, lambda j: j.state.terminal)
    assert done.state is JobState.SUCCEEDED and done.attempts == 1
    assert [t.state for t in done.history] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    result = result_of(done)
    assert len(result.token_ids) == 12 == done.completion_tokens
    assert result.seed == done.seed
    ids, text = merge_deltas(await store.read_deltas(done.job_id))
    assert ids == list(result.token_ids) and text == result.text
    assert ids == await direct_tokens(engine, done)  # the stored seed reproduces the output


async def test_tiers_claim_urgent_then_standard_then_bulk(store: JobStore) -> None:
    engine = await started_synthetic()
    manager = JobManager(JobsConfig(max_running=1, **FAST), store, engine)
    jobs = {}
    for name, tier in (("bulk", jobs_pb2.JOB_PRIORITY_BULK), ("standard", jobs_pb2.JOB_PRIORITY_STANDARD),
                       ("urgent", jobs_pb2.JOB_PRIORITY_URGENT)):
        jobs[name] = (await manager.submit(build_job(engine, submit_request(3, priority=tier))))[0]
    async with running(manager):
        done = {n: await wait_job(store, j.job_id, lambda x: x.state.terminal) for n, j in jobs.items()}
    started = {n: next(t.time for t in j.history if t.state is JobState.RUNNING) for n, j in done.items()}
    assert started["urgent"] <= started["standard"] <= started["bulk"]
    assert all(j.state is JobState.SUCCEEDED for j in done.values())


async def test_engine_priority_of_jobs_is_above_interactive(store: JobStore) -> None:
    engine = await started_synthetic()
    job = build_job(engine, submit_request(3, priority=jobs_pb2.JOB_PRIORITY_BULK))
    req = convert.engine_request(job, info=engine.info(), tokenize=engine.tokenize, arrival_time=0.0)
    assert req.priority == 3000 and req.sampling.seed == job.seed


async def test_failures_retry_then_succeed(store: JobStore) -> None:
    engine = FlakyEngine(await started_synthetic(), failures=1)
    manager = JobManager(JobsConfig(max_attempts=3, **FAST), store, engine)
    async with running(manager):
        job, _ = await manager.submit(build_job(engine, submit_request(4)))
        done = await wait_job(store, job.job_id, lambda j: j.state.terminal)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    assert done.last_error is not None and "injected failure 1" in done.last_error.message
    assert [t.state for t in done.history].count(JobState.QUEUED) == 2


async def test_failures_exhaust_attempts_into_dead_letter(store: JobStore) -> None:
    engine = FlakyEngine(await started_synthetic(), failures=100)
    config = JobsConfig(max_attempts=2, **FAST)
    manager = JobManager(config, store, engine)
    async with running(manager):
        job, _ = await manager.submit(build_job(engine, submit_request(4), config))
        done = await wait_job(store, job.job_id, lambda j: j.state.terminal)
    assert done.state is JobState.DEAD_LETTER and done.attempts == 2
    assert done.last_error is not None and "injected failure 2" in done.last_error.message
    page, _ = await store.list(frozenset({JobState.DEAD_LETTER}), 10, "")
    assert [j.job_id for j in page] == [job.job_id]


async def test_cancel_running_job_keeps_partial_output(store: JobStore) -> None:
    engine = await started_synthetic(itl_ms=20.0)
    manager = JobManager(JobsConfig(**FAST), store, engine)
    async with running(manager):
        job, _ = await manager.submit(build_job(engine, submit_request(500)))
        await wait_job(store, job.job_id, lambda j: j.completion_tokens >= 3)
        cancelled = await manager.cancel(job.job_id)
        assert cancelled.state is JobState.CANCELLED
        again = await manager.cancel(job.job_id)  # idempotent on an ended job
        assert again.state is JobState.CANCELLED and again.version == cancelled.version
    result = result_of(cancelled)
    assert result.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    ids, _ = merge_deltas(await store.read_deltas(job.job_id))
    assert len(result.token_ids) >= 3 and list(result.token_ids) == ids[:len(result.token_ids)]
    assert engine.stats().running == 0  # the engine request was aborted


async def test_cancel_queued_job(store: JobStore) -> None:
    engine = await started_synthetic()
    manager = JobManager(JobsConfig(**FAST), store, engine)  # not started: the job stays queued
    job, _ = await manager.submit(build_job(engine, submit_request(4)))
    cancelled = await manager.cancel(job.job_id)
    assert cancelled.state is JobState.CANCELLED and cancelled.result is None


async def test_queue_ttl_expires_a_job_that_never_started(store: JobStore) -> None:
    engine = await started_synthetic(itl_ms=20.0)
    manager = JobManager(JobsConfig(max_running=1, **FAST), store, engine)
    async with running(manager):
        blocker, _ = await manager.submit(build_job(engine, submit_request(500)))
        await wait_job(store, blocker.job_id, lambda j: j.state is JobState.RUNNING)
        req = submit_request(4)
        req.queue_ttl.FromMilliseconds(100)
        job, _ = await manager.submit(build_job(engine, req))
        expired = await wait_job(store, job.job_id, lambda j: j.state.terminal)
        await manager.cancel(blocker.job_id)
    assert expired.state is JobState.EXPIRED and expired.attempts == 0


async def crash(manager: JobManager) -> None:
    """What SIGKILL leaves behind: tasks gone, nothing released, the store as it was."""
    tasks = [*manager._loops, *(a.task for a in manager._running.values() if a.task is not None)]
    for t in tasks:
        t.cancel()
    done, pending = await asyncio.wait(tasks, timeout=5)
    for t in pending:
        t.print_stack()
    assert not pending


async def test_rerun_after_crash_finishes_once_without_duplicate_tokens(store: JobStore) -> None:
    engine = await started_synthetic(itl_ms=10.0)
    config = JobsConfig(replica_id="r-1", **FAST)
    first = JobManager(config, store, engine)
    await first.start()
    job, _ = await first.submit(build_job(engine, submit_request(60)))
    await wait_job(store, job.job_id, lambda j: j.completion_tokens >= 5)
    await crash(first)
    for rid in list(engine._slots):
        await engine.abort(rid)
    half = await store.get(job.job_id)
    assert half.state is JobState.RUNNING and 5 <= half.completion_tokens < 60
    second = JobManager(config, store, engine)  # the restarted replica
    async with running(second):
        done = await wait_job(store, job.job_id, lambda j: j.state.terminal)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    assert [t.state for t in done.history].count(JobState.SUCCEEDED) == 1
    ids, text = merge_deltas(await store.read_deltas(job.job_id))
    assert ids == list(result_of(done).token_ids) == await direct_tokens(engine, done)
    assert text == result_of(done).text


async def test_graceful_stop_gives_the_job_back_without_counting_the_attempt(store: JobStore) -> None:
    engine = await started_synthetic(itl_ms=20.0)
    config = JobsConfig(max_attempts=1, **FAST)
    first = JobManager(config, store, engine)
    await first.start()
    job, _ = await first.submit(build_job(engine, submit_request(40), config))
    await wait_job(store, job.job_id, lambda j: j.completion_tokens >= 2)
    await first.stop(0)
    back = await store.get(job.job_id)
    assert back.state is JobState.QUEUED and back.attempts == 0
    async with running(JobManager(JobsConfig(max_attempts=1, **{**FAST, "stop_grace": 5.0}), store,
                                  await started_synthetic())):
        done = await wait_job(store, job.job_id, lambda j: j.state.terminal)
    assert done.state is JobState.SUCCEEDED and len(result_of(done).token_ids) == 40


async def collect(manager: JobManager, job_id: str, from_offset: int, stop_after: int | None = None):
    """Watch events; with `stop_after`, disconnect once that many tokens arrived."""
    states: list[JobState] = []
    ids: list[int] = []
    offset = from_offset
    ended = None
    agen = manager.watch(job_id, from_offset)
    try:
        async for ev in agen:
            if isinstance(ev, Transition):
                states.append(ev.state)
            elif isinstance(ev, Delta):
                assert ev.offset == offset, "deltas must be contiguous"
                ids += ev.token_ids
                offset += len(ev.token_ids)
                if stop_after is not None and len(ids) >= stop_after:
                    break
            else:
                ended = ev
    finally:
        await agen.aclose()
    return states, ids, ended


async def test_watch_cut_off_and_resumed_equals_one_watch(store: JobStore) -> None:
    engine = await started_synthetic(itl_ms=5.0)
    manager = JobManager(JobsConfig(**FAST), store, engine)
    async with running(manager):
        job, _ = await manager.submit(build_job(engine, submit_request(80)))
        whole = asyncio.create_task(collect(manager, job.job_id, 0))
        states, first_part, ended = await asyncio.wait_for(collect(manager, job.job_id, 0, stop_after=10), 20)
        assert ended is None and 10 <= len(first_part) < 80
        _, rest, ended = await asyncio.wait_for(collect(manager, job.job_id, len(first_part)), 20)
        all_states, all_ids, all_ended = await asyncio.wait_for(whole, 20)
    assert first_part + rest == all_ids == list(result_of(ended).token_ids)
    assert ended.state is JobState.SUCCEEDED and all_ended.job_id == job.job_id
    assert all_states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    # after the end, a watch from any offset replays the persisted tail
    _, tail, _ = await collect(manager, job.job_id, 77)
    assert tail == all_ids[77:]
