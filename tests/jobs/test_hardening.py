"""Jobs API promises under stress, over real grpc.aio servers: watch order, the x-request-id
header, engine death, submits during start-up (issue 7)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

from tokenrelay_engines.synthetic import SyntheticEngine
from tokenrelay_server.app import start_server
from tokenrelay_server.health import JOBS_SERVICE
from tokenrelay_server.jobs.model import JobsConfig

from tests.integration.conftest import make_server_config
from tests.jobs.helpers import started_synthetic, submit_request
from tests.jobs.test_grpc import wait_ended

TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
            jobs_pb2.JOB_STATE_EXPIRED, jobs_pb2.JOB_STATE_DEAD_LETTER}


async def _live_watch(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str) -> list[jobs_pb2.WatchJobResponse]:
    return [ev async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id))]


async def test_watch_sends_every_delta_before_the_terminal_state(jobs_server) -> None:
    srv = await jobs_server(engine=await started_synthetic(itl_ms=2.0))
    jobs = [(await srv.stub.SubmitJob(submit_request(40, prompt=f"p{i}"))).job for i in range(6)]
    watches = await asyncio.wait_for(asyncio.gather(*(_live_watch(srv.stub, j.job_id) for j in jobs)), 60)
    for events in watches:
        kinds = [ev.WhichOneof("event") for ev in events]
        assert kinds[-1] == "ended"
        ends = [i for i, ev in enumerate(events)
                if ev.HasField("state_change") and ev.state_change.state in TERMINAL]
        assert len(ends) == 1, kinds
        assert "delta" not in kinds[ends[0]:], f"a delta after the terminal state: {kinds}"
        tokens = [t for ev in events if ev.HasField("delta") for t in ev.delta.token_ids]
        assert tokens == list(events[-1].ended.result.token_ids) and len(tokens) == 40


async def test_submit_reads_the_request_id_from_metadata(jobs_server) -> None:
    srv = await jobs_server()
    resp = await srv.stub.SubmitJob(submit_request(3), metadata=(("x-request-id", "trace-42"),))
    assert resp.created and resp.job.params.request_id == "trace-42"
    ended = await wait_ended(srv.stub, resp.job.job_id)
    assert ended.result.request_id == "trace-42"
    # the body decides: params.request_id wins over the header
    body = submit_request(3)
    body.params.request_id = "from-body"
    own = await srv.stub.SubmitJob(body, metadata=(("x-request-id", "from-header"),))
    assert own.job.params.request_id == "from-body"
    # a retry with a fresh header is still the same request for its idempotency key
    first = await srv.stub.SubmitJob(submit_request(3, idempotency_key="k"), metadata=(("x-request-id", "a1"),))
    again = await srv.stub.SubmitJob(submit_request(3, idempotency_key="k"), metadata=(("x-request-id", "a2"),))
    assert first.created and not again.created and again.job.job_id == first.job.job_id
    # validated like params.request_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.SubmitJob(submit_request(3), metadata=(("x-request-id", "r" * 300),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _wait_health(health: health_pb2_grpc.HealthStub, service: str, status: int, timeout: float = 20.0) -> None:
    """Bounded: the health Watch stream reports each change."""
    async def run() -> None:
        async for resp in health.Watch(health_pb2.HealthCheckRequest(service=service)):
            if resp.status == status:
                return
    await asyncio.wait_for(run(), timeout)


async def test_submit_is_refused_once_the_engine_is_dead(tmp_path: Path) -> None:
    engine_config = make_server_config().synthetic
    engine = SyntheticEngine(engine_config)
    config = make_server_config(health_check_interval_seconds=0.05,
                                jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/jobs.db", poll_interval=0.05))
    handle = await start_server(config, engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            stub, health = jobs_pb2_grpc.JobsServiceStub(ch), health_pb2_grpc.HealthStub(ch)
            ok = await stub.SubmitJob(submit_request(2))
            assert ok.created
            engine.kill("injected engine failure")
            await _wait_health(health, "", health_pb2.HealthCheckResponse.NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitJob(submit_request(2))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            listed = await stub.ListJobs(jobs_pb2.ListJobsRequest())
            assert [j.job_id for j in listed.jobs] == [ok.job.job_id]  # nothing was accepted
    finally:
        await asyncio.wait_for(handle.stop(0), 30)


async def test_jobs_submitted_during_torch_start_up_are_accepted_and_run(tmp_path: Path) -> None:
    torch_engine = pytest.importorskip("tokenrelay_engines.torch.engine")
    from tokenrelay_engines.config import TorchEngineConfig
    from tokenrelay_engines.torch.runner import ModelRunner

    gate = threading.Event()

    def gated_runner(config: TorchEngineConfig) -> ModelRunner:
        assert gate.wait(120), "the test never opened the start-up gate"
        return ModelRunner(config)

    torch_config = TorchEngineConfig()  # the embedded demo model
    engine = torch_engine.TorchEngine(torch_config, runner_factory=gated_runner)
    config = make_server_config(jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/jobs.db", poll_interval=0.05))
    handle = await start_server(config, engine, wait_ready=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            stub, health = jobs_pb2_grpc.JobsServiceStub(ch), health_pb2_grpc.HealthStub(ch)
            ready = await health.Check(health_pb2.HealthCheckRequest(service=JOBS_SERVICE))
            assert ready.status == health_pb2.HealthCheckResponse.NOT_SERVING  # still starting
            async def submit_now() -> jobs_pb2.SubmitJobResponse:
                return await stub.SubmitJob(submit_request(3, prompt="1+2="), timeout=180)

            submit = asyncio.create_task(submit_now())
            done, _ = await asyncio.wait({submit}, timeout=1.0)
            assert not done, f"a submit during start-up must not fail: {submit.exception() if done else ''}"
            gate.set()
            resp = await asyncio.wait_for(submit, 180)
            assert resp.created
            ended = await wait_ended(stub, resp.job.job_id, timeout=180)
            assert ended.state == jobs_pb2.JOB_STATE_SUCCEEDED and len(ended.result.token_ids) == 3
    finally:
        gate.set()
        await asyncio.wait_for(handle.stop(0), 60)
