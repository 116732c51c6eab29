"""grpc.health.v1 readiness/liveness through start-up, draining and engine death; SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("tokenrelay.v1.TextGenerationService", "tokenrelay.v1.JobsService")
REPO = Path(__file__).resolve().parents[2]


def params(max_tokens: int, text: str = "drain me") -> gen.GenerationParams:
    return gen.GenerationParams(text=text, sampling=gen.SamplingParams(seed=3),
                                stopping=gen.StoppingCriteria(max_tokens=max_tokens))


async def read_rest(call) -> list[tg.GenerateStreamResponse]:
    events = []
    while (event := await asyncio.wait_for(call.read(), timeout=30)) is not grpc.aio.EOF:
        events.append(event)
    return events


async def statuses(health: health_pb2_grpc.HealthStub) -> dict[str, int]:
    out = {}
    for name in ("", *SERVICES):
        out[name] = (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
    return out


def error_reason(err: grpc.aio.AioRpcError) -> str | None:
    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return None


async def test_not_serving_until_warm_up_then_serving(synthetic_server_factory):
    gate = asyncio.Event()
    engine = SyntheticEngine(SyntheticEngineConfig(ttft_ms=1, itl_ms=1), start_gate=gate)
    srv = await synthetic_server_factory(engine=engine, wait_ready=False)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
        assert await statuses(health) == {"": SERVING, SERVICES[0]: NOT_SERVING, SERVICES[1]: NOT_SERVING}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(err.value) == "NOT_READY"
        gate.set()
        await srv.handle.wait_ready(timeout=10)
        assert await statuses(health) == {"": SERVING, SERVICES[0]: SERVING, SERVICES[1]: SERVING}
        assert (await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)).result.usage.completion_tokens == 2


async def test_health_watch_streams_changes(synthetic_server_factory):
    gate = asyncio.Event()
    srv = await synthetic_server_factory(engine=SyntheticEngine(SyntheticEngineConfig(), start_gate=gate),
                                         wait_ready=False)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]), timeout=10)
        assert (await watch.read()).status == NOT_SERVING
        gate.set()
        assert (await asyncio.wait_for(watch.read(), timeout=10)).status == SERVING
        watch.cancel()


async def test_unknown_service_is_not_found(health_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health_stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("synthetic_server", [{"itl_ms": 5.0}], indirect=True)
async def test_draining_sends_goaway_and_lets_in_flight_finish(synthetic_server, channel, health_stub,
                                                              wait_until):
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
    stream = stub.GenerateStream(tg.GenerateStreamRequest(params=params(60)), timeout=30)
    assert (await stream.read()).WhichOneof("event") == "started"
    drain = asyncio.create_task(synthetic_server.handle.drain(grace=20))
    await wait_until(lambda: synthetic_server.handle.health.draining, timeout=5)  # flips at once
    # GOAWAY: the connection takes no new call and the port no new connection, so clients go
    # to another replica; the call in flight goes on to its end.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    jobs = jobs_pb2_grpc.JobsServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(params=params(2)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(synthetic_server.address) as fresh:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # not listening any more
    events = await read_rest(stream)
    assert events[-1].finished.finish_reason == gen.FINISH_REASON_LENGTH
    assert events[-1].finished.usage.completion_tokens == 60
    assert await asyncio.wait_for(drain, timeout=10) is True


async def test_servicers_refuse_while_draining_with_reason(synthetic_server, channel):
    """A call that reaches a servicer after draining began is told so (ErrorInfo DRAINING)."""
    await synthetic_server.handle.health.set_draining()  # readiness only: the port still listens
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(err.value) == "DRAINING"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs_pb2_grpc.JobsServiceStub(channel).SubmitJob(jobs_pb2.SubmitJobRequest(params=params(2)),
                                                               timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and error_reason(err.value) == "DRAINING"
    assert (await stub.GetServerLoad(tg.GetServerLoadRequest(), timeout=5)).draining


@pytest.mark.parametrize("synthetic_server", [{"health_check_interval_seconds": 0.05}], indirect=True)
async def test_dead_engine_never_looks_healthy(synthetic_server, channel, health_stub, wait_until):
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
    stream = stub.GenerateStream(tg.GenerateStreamRequest(params=params(3000)), timeout=30)
    assert (await stream.read()).WhichOneof("event") == "started"
    synthetic_server.engine.kill("simulated crash")
    with pytest.raises(grpc.aio.AioRpcError) as in_flight:
        await read_rest(stream)
    assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
    assert synthetic_server.handle.health.phase.value == "dead"  # marked at once, not at the next poll
    assert set((await statuses(health_stub)).values()) == {NOT_SERVING}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def _read_listening_line(proc: asyncio.subprocess.Process) -> str:
    line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
    text = line.decode().strip()
    assert text.startswith("tokenrelay listening on "), text
    return text.removeprefix("tokenrelay listening on ")


async def _refused(address: str) -> bool:
    """True once a new connection to `address` is refused (the server stopped listening)."""
    async with grpc.aio.insecure_channel(address) as fresh:
        try:
            await health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


async def test_sigterm_drains_in_flight_calls_and_exits_zero():
    env = {**os.environ, "TOKENRELAY_SYNTHETIC_ITL_MS": "10", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.main", "--engine", "synthetic", "--host", "127.0.0.1", "--port", "0",
        "--drain-grace-seconds", "20", cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        address = await _read_listening_line(proc)
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
        async with grpc.aio.insecure_channel(address) as ch:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert set((await statuses(health)).values()) == {SERVING}
            streams = [stub.GenerateStream(tg.GenerateStreamRequest(params=params(80, f"load {i}")), timeout=60)
                       for i in range(8)]
            for s in streams:  # every call is in flight (started, tokens flowing) before SIGTERM
                assert (await asyncio.wait_for(s.read(), timeout=10)).WhichOneof("event") == "started"
                assert (await asyncio.wait_for(s.read(), timeout=10)).WhichOneof("event") == "delta"
            proc.send_signal(signal.SIGTERM)
            for _ in range(100):  # bounded: GOAWAY and no more listening once the signal is handled
                if await _refused(address):
                    break
            else:
                pytest.fail("the server still took new connections after SIGTERM")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Generate(tg.GenerateRequest(params=params(2)), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for s in streams:
                events = await read_rest(s)
                assert events[-1].finished.finish_reason == gen.FINISH_REASON_LENGTH
                assert events[-1].finished.usage.completion_tokens == 80
            last_call_ended = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
        exit_after = time.monotonic() - last_call_ended
        assert exit_after < 5.0, f"exited {exit_after:.1f}s after the last call (aim: about 1s)"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_flags_and_env_defaults(monkeypatch):
    import argparse

    from tokenrelay_server.main import add_serve_arguments, config_from_args

    monkeypatch.setenv("TOKENRELAY_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("TOKENRELAY_ENGINE", "synthetic")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--port", "0", "--synthetic-ttft-ms", "42", "--block-size", "8"]))
    assert (config.engine, config.port, config.host) == ("synthetic", 0, "0.0.0.0")
    assert config.synthetic.ttft_ms == 42 and config.synthetic.max_num_seqs == 7 and config.synthetic.block_size == 8
    assert config.torch.scheduler.max_num_seqs == 7 and config.torch.scheduler.block_size == 8
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--max-pending-requests", "0"]))


async def test_grace_period_over_cancels_in_flight_calls(synthetic_server, channel, wait_until):
    stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
    stream = stub.GenerateStream(tg.GenerateStreamRequest(params=params(3000)), timeout=30)
    assert (await stream.read()).WhichOneof("event") == "started"
    assert await synthetic_server.handle.drain(grace=0.05) is False  # still in flight when grace ends
    await asyncio.wait_for(synthetic_server.handle.stop(0), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_rest(stream)
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert synthetic_server.engine.stats().idle


@pytest.mark.parametrize("synthetic_server", [{"health_check_interval_seconds": 0.05}], indirect=True)
async def test_watchdog_notices_an_idle_engine_dying(synthetic_server, health_stub, wait_until):
    assert set((await statuses(health_stub)).values()) == {SERVING}
    synthetic_server.engine.kill("died while idle")
    await wait_until(lambda: synthetic_server.handle.health.phase.value == "dead", timeout=5)
    assert set((await statuses(health_stub)).values()) == {NOT_SERVING}


@pytest.mark.parametrize("synthetic_server", [{"itl_ms": 5.0}], indirect=True)
async def test_draining_ends_job_watches_so_they_resume_elsewhere(synthetic_server, channel):
    jobs = jobs_pb2_grpc.JobsServiceStub(channel)
    job = (await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(params=params(3000)), timeout=10)).job
    watch = jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), timeout=60)
    assert (await asyncio.wait_for(watch.read(), timeout=10)) is not grpc.aio.EOF
    drain = asyncio.create_task(synthetic_server.handle.drain(grace=30))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await asyncio.wait_for(watch.read(), timeout=10) is not grpc.aio.EOF:
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await asyncio.wait_for(drain, timeout=10) is True  # not held for the 30 s grace
