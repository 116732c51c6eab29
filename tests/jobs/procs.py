"""Real processes for fault tests and the recovery bench: a restartable redis-server with an
append-only file, and `python -m tokenrelay_server.main` replicas on it.

    redis = RedisProcess(tmp_dir); await redis.start()
    replica = await spawn_replica(redis.url, tmp_dir, "--replica-id", "a")
    await redis.kill(); ...; await redis.start()   # same port, same data dir: acknowledged writes kept
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
            jobs_pb2.JOB_STATE_EXPIRED, jobs_pb2.JOB_STATE_DEAD_LETTER}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class RedisProcess:
    """redis-server on a fixed port with AOF fsync'ed on every write (`appendfsync always`)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 30.0) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: the Redis fault tests need it"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
            "--appendfsync", "always", "--dir", str(self.workdir), "--loglevel", "notice",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert self.proc.stdout is not None

        async def ready() -> None:
            seen = b""
            while b"Ready to accept connections" not in seen:  # redis-server's own readiness line
                chunk = await self.proc.stdout.read(4096)
                assert chunk, f"redis-server exited: {seen[-500:]!r}"
                seen += chunk
        await asyncio.wait_for(ready(), timeout)
        asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        proc = self.proc
        while proc is not None and proc.stdout is not None and await proc.stdout.read(65536):
            pass

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 30)
        self.proc = None


@dataclass(slots=True)
class Replica:
    proc: asyncio.subprocess.Process
    address: str
    channel: grpc.aio.Channel
    stub: jobs_pb2_grpc.JobsServiceStub
    health: health_pb2_grpc.HealthStub
    log: Path

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 30)
        await self.channel.close()

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self.channel.close()


async def spawn_replica(store_url: str, workdir: Path, *extra: str, itl_ms: float = 10.0,
                        python: str = sys.executable, module: str = "tokenrelay_server.main") -> Replica:
    """`python -m tokenrelay_server.main` (synthetic engine) on an ephemeral port; stderr goes to a log file.
    `python` / `module` run another source tree's server (bench/trees.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"replica-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            python, "-m", module, "--engine", "synthetic", "--host", "127.0.0.1", "--port", "0",
            "--synthetic-ttft-ms", "2", "--synthetic-itl-ms", str(itl_ms), "--log-level", "WARNING",
            "--health-check-interval-seconds", "0.5", "--jobs-store", store_url, "--jobs-poll-seconds", "0.05",
            *extra, cwd=str(workdir),
            stdout=asyncio.subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()
            assert line, f"the server exited before listening: {log.read_text()[-2000:]}"
            if line.startswith("tokenrelay listening on "):
                break
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    address = line.rsplit(" ", 1)[1].strip()
    channel = grpc.aio.insecure_channel(address)
    return Replica(proc, address, channel, jobs_pb2_grpc.JobsServiceStub(channel),
                   health_pb2_grpc.HealthStub(channel), log)


async def get(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str) -> jobs_pb2.Job:
    return (await stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10)).job


async def wait_all_ended(stub: jobs_pb2_grpc.JobsServiceStub, job_ids: list[str],
                         timeout: float) -> dict[str, jobs_pb2.Job]:
    """Watch every job until it ends (a bounded wait on the API's own event streams)."""
    async def one(job_id: str) -> jobs_pb2.Job:
        async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
            if ev.HasField("ended"):
                return ev.ended
        raise AssertionError("watch closed without an ended event")
    done = await asyncio.wait_for(asyncio.gather(*(one(j) for j in job_ids)), timeout)
    return dict(zip(job_ids, done))


async def wait_running_with_tokens(stub: jobs_pb2_grpc.JobsServiceStub, job_ids: list[str],
                                   timeout: float) -> None:
    """Until every job runs and has persisted output (watched, bounded)."""
    async def one(job_id: str) -> None:
        async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
            if ev.HasField("delta") and ev.delta.token_ids:
                return
            assert not ev.HasField("ended"), f"job {job_id} ended before the fault"
        raise AssertionError("watch closed")
    await asyncio.wait_for(asyncio.gather(*(one(j) for j in job_ids)), timeout)


async def jobs_readiness(replica: Replica) -> int:
    resp = await replica.health.Check(health_pb2.HealthCheckRequest(service="tokenrelay.v1.JobsService"), timeout=5)
    return resp.status


def finished_once(job: jobs_pb2.Job, max_tokens: int) -> bool:
    ends = [h.state for h in job.history if h.state in TERMINAL]
    return (job.state == jobs_pb2.JOB_STATE_SUCCEEDED and ends == [jobs_pb2.JOB_STATE_SUCCEEDED]
            and len(job.result.token_ids) == max_tokens == job.completion_tokens)


async def queue_jobs(url: str, n: int, max_tokens: int) -> list[str]:
    """Jobs queued in a shared Redis store before any replica runs (as SubmitJob stores them)."""
    from tokenrelay_server.jobs.redis_store import RedisJobStore
    from tests.jobs.helpers import build_job, started_synthetic, submit_request

    engine = await started_synthetic()
    store = RedisJobStore(url)
    await store.open()
    try:
        return [(await store.create(build_job(engine, submit_request(max_tokens, prompt=f"doc {i}"))))[0].job_id
                for i in range(n)]
    finally:
        await store.close()
