"""Cancellation, deadlines and admission control free everything and leave others unaffected."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg

SLOW = {"ttft_ms": 5.0, "itl_ms": 10.0}


def params(text: str, max_tokens: int, **kw) -> gen.GenerationParams:
    return gen.GenerationParams(text=text, sampling=gen.SamplingParams(seed=1),
                                stopping=gen.StoppingCriteria(max_tokens=max_tokens), **kw)


async def run_stream(stub, p: gen.GenerationParams) -> list[tg.GenerateStreamResponse]:
    return [e async for e in stub.GenerateStream(tg.GenerateStreamRequest(params=p), timeout=30)]


def details(err: grpc.aio.AioRpcError) -> dict[str, object]:
    status = rpc_status.from_call(err)
    assert status is not None, "error carries no google.rpc.Status details"
    out: dict[str, object] = {}
    for any_msg in status.details:
        for kind in (error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if any_msg.Is(kind.DESCRIPTOR):
                msg = kind()
                any_msg.Unpack(msg)
                out[kind.__name__] = msg
    return out


async def wait_idle(srv, wait_until) -> None:
    await wait_until(lambda: srv.engine.stats().idle and srv.handle.admission.in_flight == 0, timeout=5)


@pytest.mark.parametrize("synthetic_server", [SLOW], indirect=True)
async def test_cancelled_stream_frees_everything(synthetic_server, text_generation_stub, wait_until):
    others = [asyncio.create_task(run_stream(text_generation_stub, params(f"other {i}", 30))) for i in range(3)]
    victim = text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params("victim", 2000,
                                                                                       request_id="victim")))
    seen = 0
    async for event in victim:
        seen += event.WhichOneof("event") == "delta"
        if seen == 2:
            break
    await wait_until(lambda: synthetic_server.engine.stats().running == 4, timeout=5)
    assert any(rid.startswith("victim#") for rid in synthetic_server.engine._slots)
    victim.cancel()
    # The victim's slot and blocks go within a step while the others keep running.
    await wait_until(lambda: synthetic_server.engine.stats().running <= 3 and not any(
        rid.startswith("victim#") for rid in synthetic_server.engine._slots), timeout=2)
    results = await asyncio.wait_for(asyncio.gather(*others), timeout=30)
    for events in results:
        fin = events[-1].finished
        assert fin.finish_reason == gen.FINISH_REASON_LENGTH and fin.usage.completion_tokens == 30
    await wait_idle(synthetic_server, wait_until)


@pytest.mark.parametrize("synthetic_server", [SLOW], indirect=True)
async def test_expired_deadline_frees_everything(synthetic_server, text_generation_stub, wait_until):
    other = asyncio.ensure_future(text_generation_stub.Generate(tg.GenerateRequest(params=params("other", 40)),
                                                              timeout=30))
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await text_generation_stub.Generate(tg.GenerateRequest(params=params("late", 2000)), timeout=0.3)
    assert unary.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for event in text_generation_stub.GenerateStream(
                tg.GenerateStreamRequest(params=params("late stream", 2000)), timeout=0.3):
            events.append(event)
    assert stream.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert events and events[0].WhichOneof("event") == "started"
    result = (await asyncio.wait_for(other, timeout=30)).result
    assert result.finish_reason == gen.FINISH_REASON_LENGTH and result.usage.completion_tokens == 40
    await wait_idle(synthetic_server, wait_until)


@pytest.mark.parametrize("synthetic_server", [{**SLOW, "max_pending_requests": 2, "retry_after_ms": 750}],
                         indirect=True)
async def test_queue_full_is_resource_exhausted_before_any_token(synthetic_server, text_generation_stub, wait_until):
    blockers = [text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params(f"b{i}", 2000)))
                for i in range(2)]
    for call in blockers:
        first = await asyncio.wait_for(call.read(), timeout=10)
        assert first.WhichOneof("event") == "started"
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await text_generation_stub.Generate(tg.GenerateRequest(params=params("third", 4)), timeout=10)
    assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = details(unary.value)
    assert info["RetryInfo"].retry_delay.ToMilliseconds() == 750
    assert info["ErrorInfo"].reason == "QUEUE_FULL"
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for event in text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params("x", 4)),
                                                               timeout=10):
            events.append(event)
    assert stream.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "RetryInfo" in details(stream.value)
    assert events == []  # refused before the `started` event
    load = await text_generation_stub.GetServerLoad(tg.GetServerLoadRequest(), timeout=10)
    assert (load.queue_depth, load.queue_capacity) == (2, 2)
    for call in blockers:
        call.cancel()
    await wait_idle(synthetic_server, wait_until)
    ok = await text_generation_stub.Generate(tg.GenerateRequest(params=params("after", 4)), timeout=10)
    assert ok.result.usage.completion_tokens == 4


@pytest.mark.parametrize("synthetic_server", [{**SLOW, "max_pending_prompt_tokens": 60}], indirect=True)
async def test_prompt_token_budget(synthetic_server, text_generation_stub, wait_until):
    blocker = text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params("y" * 40, 2000)))
    assert (await asyncio.wait_for(blocker.read(), timeout=10)).WhichOneof("event") == "started"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await text_generation_stub.Generate(tg.GenerateRequest(params=params("z" * 30, 4)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details(err.value)["ErrorInfo"].reason == "PROMPT_TOKENS_FULL"
    small = await text_generation_stub.Generate(tg.GenerateRequest(params=params("z", 4)), timeout=10)
    assert small.result.usage.completion_tokens == 4
    blocker.cancel()
    await wait_idle(synthetic_server, wait_until)


@pytest.mark.parametrize("synthetic_server", [{**SLOW, "max_num_seqs": 2}], indirect=True)
async def test_engine_waiting_queue_and_priority(synthetic_server, text_generation_stub, wait_until):
    """More requests than the batch holds: the rest wait, and all complete."""
    tasks = [asyncio.ensure_future(text_generation_stub.Generate(
        tg.GenerateRequest(params=params(f"q{i}", 5)), timeout=30)) for i in range(6)]
    await wait_until(lambda: synthetic_server.engine.stats().waiting > 0, timeout=5)
    assert synthetic_server.engine.stats().running <= 2
    results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert all(r.result.usage.completion_tokens == 5 for r in results)
    assert all(r.result.timing.queued.ToNanoseconds() >= 0 for r in results)
    await wait_idle(synthetic_server, wait_until)
