"""Hardening against bad input and faults, each against a real server on an ephemeral port.

One test per problem found by trying the server as an attacker would: request ids echoed into
headers before validation, unbounded error trailers, unbounded prompts and stop strings, a stream
ending twice, seeds a JavaScript client cannot hold, idle connections never closed, and engine
death leaving the process up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc, text_generation_pb2_grpc
from tokenrelay.v1 import text_generation_pb2 as tg

from tokenrelay_engines.synthetic import SyntheticEngine
from tokenrelay_server import main as server_main
from tokenrelay_server.limits import InputLimits

REPO = Path(__file__).resolve().parents[2]
TRAILER_BUDGET = 6 * 1024  # "no error trailer exceeds a few KiB"
JS_SAFE_INTEGER = 2 ** 53


def violations(err: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    out = []
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def trailer_bytes(err: grpc.aio.AioRpcError) -> int:
    return sum(len(k) + len(v) for k, v in err.trailing_metadata() or ()) + len(err.details() or "")


def params(text: str = "hello", max_tokens: int = 4, **kw) -> gen.GenerationParams:
    return gen.GenerationParams(text=text, stopping=gen.StoppingCriteria(max_tokens=max_tokens), **kw)


async def run_to_end(call) -> None:
    """Await a unary call, or read a stream to its end."""
    if isinstance(call, grpc.aio.UnaryStreamCall):
        async for _ in call:
            pass
    else:
        await call


@pytest.fixture
def stub(channel) -> text_generation_pb2_grpc.TextGenerationServiceStub:
    return text_generation_pb2_grpc.TextGenerationServiceStub(channel)


# -- 1. request ids are validated before anything echoes them --------------------------------

@pytest.mark.parametrize("bad_id", ["é", "a\nb", "\x00", "a b", "x" * 129])
async def test_bad_request_id_is_invalid_argument_not_internal(stub, bad_id):
    for call in (stub.Generate(tg.GenerateRequest(params=params(request_id=bad_id)), timeout=10),
                 stub.GenerateStream(tg.GenerateStreamRequest(params=params(request_id=bad_id)), timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run_to_end(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert [f for f, _ in violations(err.value)] == ["params.request_id"]
        assert ("x-request-id", bad_id) not in tuple(await call.initial_metadata() or ())
        assert ("x-request-id", bad_id) not in tuple(await call.trailing_metadata() or ())


async def test_bad_x_request_id_header_is_invalid_argument(stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=params()), metadata=(("x-request-id", "r" * 500),), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(err.value)] == ["metadata[x-request-id]"]
    call = stub.Generate(tg.GenerateRequest(params=params()), metadata=(("x-request-id", "ok-123"),), timeout=10)
    assert (await call).result.request_id == "ok-123"
    assert ("x-request-id", "ok-123") in tuple(await call.trailing_metadata())


async def test_a_failed_call_names_its_request_id_in_the_error_trailers(stub):
    """A call that fails after its id was resolved still echoes it, next to the status details,
    so a client's error says which request failed (tokenrelay.errors reads it from there)."""
    from tokenrelay.errors import from_rpc_error

    bad = params(max_tokens=10 ** 9)
    for call in (stub.Generate(tg.GenerateRequest(params=bad), metadata=(("x-request-id", "fail-1"),), timeout=10),
                 stub.GenerateStream(tg.GenerateStreamRequest(params=bad), metadata=(("x-request-id", "fail-1"),),
                                     timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await run_to_end(call)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations(err.value)] == ["params.stopping.max_tokens"]
        assert ("x-request-id", "fail-1") in tuple(err.value.trailing_metadata())
        assert from_rpc_error(err.value).request_id == "fail-1"


# -- 2. error details are bounded ------------------------------------------------------------

async def test_many_bad_stop_token_ids_give_a_bounded_invalid_argument(stub):
    p = params()
    p.stopping.stop_token_ids.extend([10 ** 6 + i for i in range(60)])  # under the count limit
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=p), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 2 <= len(violations(err.value)) <= 12
    assert trailer_bytes(err.value) < TRAILER_BUDGET


async def test_every_field_bad_at_once_stays_within_the_trailer_budget(stub):
    p = gen.GenerationParams(token_ids=gen.TokenIds(ids=[-5] * 5000), priority=10 ** 6, logprobs=-1,
                             sampling=gen.SamplingParams(temperature=-1, top_p=7, top_k=-3, min_p=9,
                                                         repetition_penalty=-1, presence_penalty=9,
                                                         frequency_penalty=9),
                             stopping=gen.StoppingCriteria(max_tokens=-1, min_tokens=-4, stop=[""] * 16,
                                                           stop_token_ids=[-1] * 64))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=p), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert found[-1][0] == "..." and "more violations" in found[-1][1]
    assert trailer_bytes(err.value) < TRAILER_BUDGET


async def test_huge_job_id_is_invalid_argument_with_a_small_trailer(channel):
    jobs = jobs_pb2_grpc.JobsServiceStub(channel)
    for call in (jobs.GetJob(jobs_pb2.GetJobRequest(job_id="A" * 10000), timeout=10),
                 jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id="A" * 10000), timeout=10),
                 jobs.DeleteJob(jobs_pb2.DeleteJobRequest(job_id="\x00é"), timeout=10)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations(err.value)] == ["job_id"]
        assert trailer_bytes(err.value) < TRAILER_BUDGET
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.GetJob(jobs_pb2.GetJobRequest(job_id="job_" + "0" * 32), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# -- 3 and 4. prompts and stop strings have byte limits, checked before tokenizing --------------

@pytest.mark.parametrize("synthetic_server", [{}], indirect=True)
async def test_prompt_and_tokenize_text_over_the_byte_limit_are_refused_before_tokenizing(synthetic_server, stub):
    limit = synthetic_server.config.limits.max_prompt_bytes
    calls = []
    engine = synthetic_server.engine
    original = engine.tokenize
    engine.tokenize = lambda text, *a, **kw: calls.append(len(text)) or original(text, *a, **kw)
    over = "é" * (limit // 2 + 1)  # 2 bytes a character: over the limit in bytes, not in characters
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Tokenize(tg.TokenizeRequest(text=over), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations(err.value)] == ["text"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=params(text=over)), timeout=10)
    assert [f for f, _ in violations(err.value)] == ["params.text"]
    assert calls == []  # never tokenized
    ok = await stub.Tokenize(tg.TokenizeRequest(text="a" * limit), timeout=30)
    assert len(ok.token_ids) > 0 and calls == [limit]


async def test_stop_strings_have_length_and_count_limits(stub, channel):
    limits = InputLimits()
    long_stop = params()
    long_stop.stopping.stop.append("s" * (limits.max_stop_string_bytes + 1))
    many_ids = params()
    many_ids.stopping.stop_token_ids.extend([1] * (limits.max_stop_token_ids + 1))
    for p, field in ((long_stop, "params.stopping.stop[0]"), (many_ids, "params.stopping.stop_token_ids")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Generate(tg.GenerateRequest(params=p), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in violations(err.value)] == [field]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs_pb2_grpc.JobsServiceStub(channel).SubmitJob(jobs_pb2.SubmitJobRequest(params=p), timeout=10)
        assert [f for f, _ in violations(err.value)] == [field]


async def test_job_key_and_webhook_url_have_byte_limits(channel):
    jobs = jobs_pb2_grpc.JobsServiceStub(channel)
    limits = InputLimits()
    request = jobs_pb2.SubmitJobRequest(params=params(), idempotency_key="k" * (limits.max_idempotency_key_bytes + 1),
                                        webhook=jobs_pb2.Webhook(url="https://example.com/" + "u" * 3000))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await jobs.SubmitJob(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in violations(err.value)) == ["idempotency_key", "webhook.url"]


# -- 8. a stream ends exactly once -----------------------------------------------------------

@pytest.mark.parametrize("synthetic_server", [{"ttft_ms": 1.0, "itl_ms": 2.0}], indirect=True)
async def test_deadline_streams_end_exactly_once(stub):
    async def one(i: int) -> tuple[str, object]:
        call = stub.GenerateStream(tg.GenerateStreamRequest(params=params(f"deadline {i}", max_tokens=500)),
                                   timeout=0.02 + (i % 10) * 0.01)
        events = []
        try:
            async for event in call:
                events.append(event)
        except grpc.aio.AioRpcError as exc:
            assert not any(e.WhichOneof("event") == "finished" for e in events), \
                f"stream {i} sent `finished` and then {exc.code()}"
            return "status", exc.code()
        finished = [e for e in events if e.WhichOneof("event") == "finished"]
        assert len(finished) == 1 and events[-1] is finished[0]
        assert finished[0].finished.finish_reason == gen.FINISH_REASON_LENGTH
        return "finished", None

    results = await asyncio.gather(*(one(i) for i in range(150)))
    codes = {code for kind, code in results if kind == "status"}
    assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert sum(kind == "status" for kind, _ in results) > 0


# -- 9. server-chosen seeds fit a JavaScript number -----------------------------------------

async def test_server_chosen_seeds_are_below_2_pow_53(stub, channel):
    seeds = []
    for _ in range(20):
        seeds.append((await stub.Generate(tg.GenerateRequest(params=params()), timeout=10)).result.seed)
        stream = stub.GenerateStream(tg.GenerateStreamRequest(params=params()), timeout=10)
        seeds.append((await stream.read()).started.seed)
        stream.cancel()
        job = (await jobs_pb2_grpc.JobsServiceStub(channel).SubmitJob(
            jobs_pb2.SubmitJobRequest(params=params()), timeout=10)).job
        seeds.append(job.seed)
    assert all(0 <= s < JS_SAFE_INTEGER for s in seeds), max(seeds)
    assert len(set(seeds)) > 50  # still random


# -- 11. idle connections are closed ---------------------------------------------------------

async def test_idle_connections_are_closed_by_the_server(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.main", "--engine", "synthetic", "--host", "127.0.0.1", "--port", "0",
        "--max-connection-idle-seconds", "0.5", "--jobs-store", f"sqlite://{tmp_path}/jobs.sqlite", cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        address = line.strip().removeprefix("tokenrelay listening on ")
        # Client keepalive off and idleness off on the client side: only the server can close it.
        async with grpc.aio.insecure_channel(address, options=[("grpc.client_idle_timeout_ms", 3_600_000)]) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert ch.get_state() == grpc.ChannelConnectivity.READY
            state = ch.get_state()
            end = time.monotonic() + 10
            while state == grpc.ChannelConnectivity.READY:  # bounded by the deadline below
                left = end - time.monotonic()
                assert left > 0, "the server never closed the idle connection"
                try:
                    await asyncio.wait_for(ch.wait_for_state_change(state), timeout=left)
                except TimeoutError:
                    pytest.fail("the server never closed the idle connection")
                state = ch.get_state()
            assert state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING,
                             grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)


# -- 7. engine death: refuse everything, NOT_SERVING, exit non-zero --------------------------

async def test_engine_death_makes_the_server_exit_non_zero(tmp_path):
    from tests.integration.conftest import make_server_config
    from tokenrelay_server.jobs.model import JobsConfig

    config = make_server_config(health_check_interval_seconds=0.05,
                                jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/j.sqlite"))
    engine = SyntheticEngine(config.synthetic)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server_main.serve(config, engine, on_ready=ready.set_result))
    try:
        handle = await asyncio.wait_for(ready, timeout=30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            stream = text_generation_pb2_grpc.TextGenerationServiceStub(ch).GenerateStream(
                tg.GenerateStreamRequest(params=params(max_tokens=3000)), timeout=30)
            assert (await stream.read()).WhichOneof("event") == "started"
            engine.kill("simulated device failure")
            with pytest.raises(grpc.aio.AioRpcError) as err:  # the call in flight fails fast ...
                while await stream.read() is not grpc.aio.EOF:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        code = await asyncio.wait_for(asyncio.shield(serving), timeout=15)  # ... and the process ends
        assert code == server_main.EXIT_ENGINE_DEAD
    finally:
        serving.cancel()


async def test_engine_death_exit_can_be_turned_off_for_debugging(tmp_path):
    from tests.integration.conftest import make_server_config

    config = dataclasses.replace(make_server_config(health_check_interval_seconds=0.05, jobs=None),
                                 exit_on_engine_death=False)
    engine = SyntheticEngine(config.synthetic)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    serving = asyncio.create_task(server_main.serve(config, engine, on_ready=ready.set_result))
    try:
        handle = await asyncio.wait_for(ready, timeout=30)
        engine.kill("simulated device failure")
        await asyncio.wait_for(handle.health.dead.wait(), timeout=10)
        done, _ = await asyncio.wait({serving}, timeout=1.0)  # bounded look: it must stay up
        assert not done
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
