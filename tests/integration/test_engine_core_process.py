"""`--engine-process on`: the engine core in its own process, killed (or stopped) under load.

A real `python -m tokenrelay_server.main` (torch engine, dummy tiny model) whose engine core is
SIGKILLed with streaming and unary calls and a job in flight: every call fails UNAVAILABLE within
1 s, health is NOT_SERVING, the server exits non-zero (3), and a restarted server on the same
job store runs the job to the end exactly once. A core that is SIGSTOPped (hung, not dead) is
seen the same way within 1 s, by its missing heartbeat, and the server kills it on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc

from tests.jobs.helpers import submit_request

pytest.importorskip("tokenrelay_engines.torch.runner")

ROOT = Path(__file__).resolve().parents[2]
EXIT_ENGINE_DEAD = 3
START_TIMEOUT_S = 180.0


async def spawn_server(tmp_path: Path, store: str, *extra: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.main", "--engine", "torch", "--engine-process", "on",
        "--load-format", "dummy", "--dummy-shape", "tiny", "--device", "cpu", "--num-threads", "1",
        "--num-kv-blocks", "1024", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
        "--engine-death-grace-seconds", "2", "--jobs-store", store, "--jobs-poll-seconds", "0.05", *extra,
        cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
            assert line, "the server exited before listening"
            if line.startswith("tokenrelay listening on "):
                return proc, line.rsplit(" ", 1)[1].strip()
    except BaseException:
        proc.kill()
        await proc.wait()
        raise


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(p) for p in (task / "children").read_text().split()]
    return out


def params(max_tokens: int) -> gen.GenerationParams:
    return gen.GenerationParams(text="hello", sampling=gen.SamplingParams(temperature=0.0),
                                stopping=gen.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))


async def running_streams(stub, count: int) -> list:
    """`count` long GenerateStream calls, each running: its first token arrived."""
    streams = [stub.GenerateStream(tg.GenerateStreamRequest(params=params(1500))) for _ in range(count)]
    for call in streams:
        async for event in call:
            if event.WhichOneof("event") == "delta" and event.delta.token_ids:
                break
    return streams


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the core's pid")
async def test_sigkilled_engine_core_fails_calls_unavailable_and_jobs_rerun_once(tmp_path: Path) -> None:
    store = f"sqlite://{tmp_path}/jobs.db"
    proc, address = await spawn_server(tmp_path, store)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            jobs = jobs_pb2_grpc.JobsServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            job_id = (await jobs.SubmitJob(submit_request(1500, prompt="job"), timeout=10)).job.job_id
            streams = await running_streams(stub, 3)
            unary = asyncio.ensure_future(stub.Generate(tg.GenerateRequest(params=params(1500))))

            async def job_running() -> None:
                async for ev in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
                    if ev.HasField("delta") and ev.delta.token_ids:
                        return
            await asyncio.wait_for(job_running(), 60)
            assert not unary.done()

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))  # liveness, streamed
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            (core_pid,) = child_pids(proc.pid)
            os.kill(core_pid, signal.SIGKILL)
            killed_at = time.monotonic()

            async def fails(call) -> float:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in call:
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                return time.monotonic() - killed_at

            async def unary_fails() -> float:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await unary
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                return time.monotonic() - killed_at

            waits = await asyncio.wait_for(asyncio.gather(*(fails(c) for c in streams), unary_fails()), 10)
            assert max(waits) < 1.0, waits

            async def not_serving() -> float:
                while (await watch.read()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                    pass
                return time.monotonic() - killed_at
            assert await asyncio.wait_for(not_serving(), 10) < 1.0  # before the server stops
        assert await asyncio.wait_for(proc.wait(), 30) == EXIT_ENGINE_DEAD
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    second, address = await spawn_server(tmp_path, store)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            jobs = jobs_pb2_grpc.JobsServiceStub(channel)

            async def ended() -> jobs_pb2.Job:
                async for ev in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
                    if ev.HasField("ended"):
                        return ev.ended
                raise AssertionError("watch closed without an ended event")
            job = await asyncio.wait_for(ended(), 120)
            assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job
            assert job.attempts == 2  # re-run once after the crash
            assert len(job.result.token_ids) == 1500 == job.completion_tokens
            succeeded = [h for h in job.history if h.state == jobs_pb2.JOB_STATE_SUCCEEDED]
            assert len(succeeded) == 1
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the core's pid")
async def test_a_stopped_engine_core_is_taken_for_dead_within_a_second(tmp_path: Path) -> None:
    proc, address = await spawn_server(tmp_path, f"sqlite://{tmp_path}/jobs.db")
    core_pid = None
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            streams = await running_streams(stub, 2)
            unary = asyncio.ensure_future(stub.Generate(tg.GenerateRequest(params=params(1500))))
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            assert not unary.done()

            (core_pid,) = child_pids(proc.pid)
            os.kill(core_pid, signal.SIGSTOP)  # hung: the process lives, its socket stays open
            stopped_at = time.monotonic()

            async def fails(call) -> float:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    if isinstance(call, asyncio.Future):
                        await call
                    else:
                        async for _ in call:
                            pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
                return time.monotonic() - stopped_at

            waits = await asyncio.wait_for(asyncio.gather(*(fails(c) for c in [*streams, unary])), 10)
            assert max(waits) < 1.0, waits

            async def not_serving() -> float:
                while (await watch.read()).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                    pass
                return time.monotonic() - stopped_at
            assert await asyncio.wait_for(not_serving(), 10) < 1.0
        assert await asyncio.wait_for(proc.wait(), 30) == EXIT_ENGINE_DEAD
        # the server killed (and reaped) the stopped core instead of waiting on it
        assert not Path(f"/proc/{core_pid}").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if core_pid is not None and Path(f"/proc/{core_pid}").exists():
            os.kill(core_pid, signal.SIGKILL)


def socket_fds(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the front ends")
async def test_two_front_ends_share_one_port_over_one_engine_core(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.main", "--engine", "torch", "--engine-process", "on",
        "--api-server-count", "2", "--load-format", "dummy", "--dummy-shape", "tiny", "--device", "cpu",
        "--num-threads", "1", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING",
        "--jobs-store", f"sqlite://{tmp_path}/jobs.db",
        cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    try:
        addresses = set()
        for _ in range(2):  # each front end reports the one shared port
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
            assert line.startswith("tokenrelay listening on "), line
            addresses.add(line.rsplit(" ", 1)[1].strip())
        (address,) = addresses
        children = [pid for pid in child_pids(proc.pid)  # not multiprocessing's resource tracker
                    if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(children) == 3  # the engine core and two front ends
        before = {pid: socket_fds(pid) for pid in children}
        channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(16)]
        try:
            texts = []
            for ch in channels:  # a new TCP connection each: the kernel spreads them
                stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
                reply = await stub.Generate(tg.GenerateRequest(params=params(8)), timeout=60)
                texts.append(reply.result.text)
            assert len(set(texts)) == 1  # greedy: the same answer from either front end
            grown = [pid for pid in children if socket_fds(pid) > before[pid]]
            assert len(grown) == 2, (before, {pid: socket_fds(pid) for pid in children})  # both took connections
        finally:
            for ch in channels:
                await ch.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
                   for pid in children)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def nice_values(pid: int) -> list[int]:
    """The nice value of every thread of `pid` (field 19 of /proc/PID/task/TID/stat)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            out.append(int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the core's threads")
async def test_the_engine_core_runs_above_its_front_end(tmp_path: Path) -> None:
    """--engine-core-priority 5 (the default): every thread of the core is at least 5 nice levels
    above every thread of the front end, however the gap was made (the core raising itself when
    permitted, else the front end lowering itself)."""
    proc, address = await spawn_server(tmp_path, f"sqlite://{tmp_path}/jobs.db")
    try:
        async with grpc.aio.insecure_channel(address) as channel:  # serving: every thread has started
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
            assert (await stub.Generate(tg.GenerateRequest(params=params(4)), timeout=60)).result.token_ids
        (core_pid,) = child_pids(proc.pid)
        core, front = nice_values(core_pid), nice_values(proc.pid)
        assert core and front
        assert max(core) + 5 <= min(front), (core, front)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
