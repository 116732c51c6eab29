"""Process level: real `python -m tokenrelay_server.main` servers, SIGKILLed and restarted on one store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

from tests.jobs.helpers import submit_request
from tests.jobs.procs import TERMINAL, Replica, get, spawn_replica


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Replica]]]:
    """`python -m tokenrelay_server.main` processes (tests.jobs.procs), all killed at the end."""
    procs: list[Replica] = []

    async def start(store_url: str, *extra: str) -> Replica:
        server = await spawn_replica(store_url, tmp_path, *extra)
        procs.append(server)
        return server

    yield start
    for p in procs:
        await p.close()


async def wait_ended(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str, timeout: float = 60.0) -> jobs_pb2.Job:
    async def run() -> jobs_pb2.Job:
        async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
            if ev.HasField("ended"):
                return ev.ended
        raise AssertionError("watch closed without an ended event")
    return await asyncio.wait_for(run(), timeout)


async def watch_until(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str, n: int) -> list[int]:
    """Watch from 0 and disconnect after `n` tokens."""
    ids: list[int] = []
    call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id))
    async for ev in call:
        if ev.HasField("delta"):
            assert ev.delta.token_offset == len(ids)
            ids += ev.delta.token_ids
            if len(ids) >= n:
                call.cancel()
                return ids
    raise AssertionError("the job ended before the watch got its tokens")


async def watch_from(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str, offset: int) -> list[int]:
    ids: list[int] = []
    async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, from_token_offset=offset)):
        if ev.HasField("delta"):
            assert ev.delta.token_offset == offset + len(ids)
            ids += ev.delta.token_ids
        elif ev.HasField("ended"):
            return ids
    raise AssertionError("watch closed without an ended event")


def assert_finished_once(job: jobs_pb2.Job, max_tokens: int) -> None:
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
    ends = [h.state for h in job.history if h.state in TERMINAL]
    assert ends == [jobs_pb2.JOB_STATE_SUCCEEDED]
    assert len(job.result.token_ids) == max_tokens == job.completion_tokens


async def test_sigkill_and_restart_finishes_every_job_exactly_once(spawn, tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path}/jobs.db"
    first = await spawn(store, "--jobs-max-running", "2")
    ids = [(await first.stub.SubmitJob(submit_request(60, prompt=f"doc {i}"))).job.job_id for i in range(5)]
    before = await asyncio.wait_for(watch_until(first.stub, ids[0], 12), 30)
    states = {(await get(first.stub, j)).state for j in ids}
    assert jobs_pb2.JOB_STATE_QUEUED in states  # some still queued when the server dies
    await first.kill()

    second = await spawn(store, "--jobs-max-running", "2")
    rest = await asyncio.wait_for(watch_from(second.stub, ids[0], len(before)), 60)
    ended = [await wait_ended(second.stub, j) for j in ids]
    for job in ended:
        assert_finished_once(job, 60)
    assert ended[0].attempts == 2  # re-run after the crash, from the stored seed
    assert before + rest == list(ended[0].result.token_ids)  # the resumed watch is consistent
    listed = await second.stub.ListJobs(jobs_pb2.ListJobsRequest())
    assert sorted(j.job_id for j in listed.jobs) == sorted(ids)


async def test_two_replicas_on_redis_one_killed(spawn, redis_url: str) -> None:
    redis_url = redis_url.rsplit("/", 1)[0] + "/1"  # a database of its own: the servers use the default keys
    common = ("--jobs-max-running", "2", "--jobs-lease-seconds", "1.5")
    a = await spawn(redis_url, "--replica-id", "replica-a", *common)
    b = await spawn(redis_url, "--replica-id", "replica-b", *common)
    ids = [(await a.stub.SubmitJob(submit_request(80, prompt=f"doc {i}"))).job.job_id for i in range(6)]
    before = await asyncio.wait_for(watch_until(a.stub, ids[0], 5), 30)
    owners_running = [(await get(b.stub, j)) for j in ids]
    assert any(j.state == jobs_pb2.JOB_STATE_RUNNING for j in owners_running)
    # a watch through replica b, live across the takeover, resumed where the watch on a stopped
    live = asyncio.create_task(watch_from(b.stub, ids[0], len(before)))
    await a.kill()
    ended = [await wait_ended(b.stub, j) for j in ids]
    assert before + await asyncio.wait_for(live, 60) == list(ended[0].result.token_ids)
    for job in ended:
        assert_finished_once(job, 80)
        # the persisted deltas, read back through the survivor, match the result
        assert await watch_from(b.stub, job.job_id, 0) == list(job.result.token_ids)
    assert any(job.attempts == 2 for job in ended)  # at least one was taken over from the dead replica
