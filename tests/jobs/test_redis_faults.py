"""Replicas on one Redis store, as real processes: a replica SIGKILLed with 8 running jobs, and
redis-server itself killed for 5 s mid-run (restarted on its port and append-only file)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from tokenrelay.v1 import jobs_pb2

from tests.jobs.helpers import submit_request
from tests.jobs.procs import (
    RedisProcess, Replica, finished_once, get, jobs_readiness, queue_jobs, spawn_replica, wait_all_ended,
    wait_running_with_tokens,
)

LEASE = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis")
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for r in started:
        await r.close()


def common(max_running: int = 8) -> tuple[str, ...]:
    return ("--jobs-max-running", str(max_running), "--jobs-lease-seconds", str(LEASE))


def log_problems(replica: Replica) -> list[str]:
    text = replica.log.read_text(errors="replace")
    return [line for line in text.splitlines()
            if "never retrieved" in line or "unexpected error in handler" in line]


async def test_a_dead_replicas_running_jobs_resume_within_one_lease(redis, replicas, tmp_path: Path) -> None:
    # 8 queued jobs are claimed by the victim at once, so their leases (and heartbeats) run in
    # step and lapse together when it dies; the victim generates slowly (its jobs are surely still
    # running when it dies), the survivor fast
    ids = await queue_jobs(redis.url, 8, 600)
    victim = await spawn_replica(redis.url, tmp_path / "a", "--replica-id", "a", *common(), itl_ms=25.0)
    replicas.append(victim)
    await wait_running_with_tokens(victim.stub, ids, 60)
    survivor = await spawn_replica(redis.url, tmp_path / "b", "--replica-id", "b", *common(),
                                   "--jobs-poll-seconds", "0.5", itl_ms=1.0)  # the default poll period
    replicas.append(survivor)
    running = [await get(survivor.stub, j) for j in ids]
    assert all(j.state == jobs_pb2.JOB_STATE_RUNNING for j in running), "the victim must die with 8 running jobs"
    await victim.kill()
    killed = time.monotonic()
    ended = await wait_all_ended(survivor.stub, ids, LEASE + 60)
    took = time.monotonic() - killed
    print(f"8 jobs of a dead replica finished {took:.1f}s after the kill (lease {LEASE}s)")
    for job in ended.values():
        assert finished_once(job, 600), job
        assert job.attempts == 2  # one cut off by the kill, one on the survivor
    assert took <= LEASE + 10, f"8 jobs took {took:.1f}s after the kill (lease {LEASE}s)"
    assert log_problems(survivor) == []


async def _outage_calls(replicas: list[Replica], stop: asyncio.Event, codes: list[grpc.StatusCode],
                        acknowledged: list[str], not_serving: set[int]) -> None:
    """Every Jobs RPC, on every replica, until `stop`: record each status and readiness."""
    n = 0
    while not stop.is_set():
        for i, r in enumerate(replicas):
            n += 1
            calls = [
                ("submit", r.stub.SubmitJob(submit_request(300, prompt=f"outage {n}"), timeout=5)),
                ("get", r.stub.GetJob(jobs_pb2.GetJobRequest(job_id="job_unknown"), timeout=5)),
                ("list", r.stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5)),
                ("cancel", r.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id="job_unknown"), timeout=5)),
            ]
            for name, call in calls:
                try:
                    resp = await call
                    codes.append(grpc.StatusCode.OK)
                    if name == "submit":
                        acknowledged.append(resp.job.job_id)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
            try:
                async for _ in r.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="job_unknown"), timeout=5):
                    pass
            except grpc.aio.AioRpcError as err:
                codes.append(err.code())
            if await jobs_readiness(r) == NOT_SERVING:
                not_serving.add(i)
        await asyncio.sleep(0.05)  # pacing of the probe loop, not a synchronisation


async def test_a_redis_outage_is_unavailable_and_every_job_finishes_once(redis, replicas, tmp_path: Path) -> None:
    for name in ("a", "b"):
        replicas.append(await spawn_replica(redis.url, tmp_path / name, "--replica-id", name, *common(),
                                            itl_ms=10.0))
    a, b = replicas
    ids = [(await (a if i % 2 else b).stub.SubmitJob(submit_request(300, prompt=f"doc {i}"))).job.job_id
           for i in range(16)]
    await wait_running_with_tokens(a.stub, ids[:4], 60)  # mid-run
    for r in replicas:
        assert await jobs_readiness(r) == SERVING

    await redis.kill()
    stop, codes, acknowledged, not_serving = asyncio.Event(), [], [], set()
    probe = asyncio.create_task(_outage_calls(replicas, stop, codes, acknowledged, not_serving))
    outage_end = time.monotonic() + 5.0
    while time.monotonic() < outage_end and not probe.done():  # the outage lasts 5 s of wall time
        await asyncio.wait({probe}, timeout=outage_end - time.monotonic())
    stop.set()
    await asyncio.wait_for(probe, 30)
    await redis.start()
    restarted, restarted_wall = time.monotonic(), time.time()

    assert codes, "no call was made during the outage"
    assert grpc.StatusCode.INTERNAL not in codes and grpc.StatusCode.UNKNOWN not in codes, codes
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}, set(codes)
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert not_serving == {0, 1}, "Jobs readiness must be NOT_SERVING on both replicas during the outage"

    every = ids + acknowledged
    ended = await wait_all_ended(a.stub, every, LEASE + 90)
    took = time.monotonic() - restarted
    print(f"{len(every)} jobs finished {took:.1f}s after a 5 s Redis outage (lease {LEASE}s)")
    for job in ended.values():
        assert finished_once(job, 300), job
        # an attempt starts at once when the store is back (or its job is resumed): none waits
        # out a second lease
        starts = [h.time.ToNanoseconds() / 1e9 for h in job.history if h.state == jobs_pb2.JOB_STATE_RUNNING]
        assert max(starts) <= restarted_wall + LEASE + 1.5, f"an attempt waited a second lease: {job.history}"
    assert took <= LEASE + 10, f"{len(every)} jobs took {took:.1f}s after the outage"
    deadline = time.monotonic() + 20
    while {await jobs_readiness(r) for r in replicas} != {SERVING}:
        assert time.monotonic() < deadline, "Jobs readiness did not come back after the outage"
        await asyncio.sleep(0.1)  # polling a probe with a bound
    for r in replicas:
        assert log_problems(r) == [], log_problems(r)
