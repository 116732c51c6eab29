"""Every invalid field gets INVALID_ARGUMENT with a BadRequest field violation naming it."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg

from tokenrelay_engines.synthetic import VOCAB_SIZE

CONTEXT = 256  # the server below runs with this context length


def p(**kw) -> gen.GenerationParams:
    base = gen.GenerationParams(text="valid prompt")
    for key, value in kw.items():
        target, _, name = key.rpartition("__")
        msg = getattr(base, target) if target else base
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return base


CASES = [
    (gen.GenerationParams(), "params.prompt"),
    (gen.GenerationParams(text=""), "params.prompt"),
    (gen.GenerationParams(token_ids=gen.TokenIds()), "params.prompt"),
    (p(stopping__max_tokens=0), "params.stopping.max_tokens"),
    (p(stopping__max_tokens=-5), "params.stopping.max_tokens"),
    (p(stopping__max_tokens=CONTEXT), "params.stopping.max_tokens"),
    (gen.GenerationParams(text="x" * (CONTEXT + 10)), "params.prompt"),
    (p(sampling__top_p=0.0), "params.sampling.top_p"),
    (p(sampling__top_p=1.5), "params.sampling.top_p"),
    (p(sampling__temperature=-0.1), "params.sampling.temperature"),
    (p(sampling__temperature=float("nan")), "params.sampling.temperature"),
    (p(sampling__top_k=-1), "params.sampling.top_k"),
    (p(sampling__min_p=1.5), "params.sampling.min_p"),
    (p(sampling__repetition_penalty=0.0), "params.sampling.repetition_penalty"),
    (p(sampling__presence_penalty=2.5), "params.sampling.presence_penalty"),
    (p(sampling__frequency_penalty=-3.0), "params.sampling.frequency_penalty"),
    (gen.GenerationParams(token_ids=gen.TokenIds(ids=[5, 6, 7, -1])), "params.token_ids.ids[3]"),
    (gen.GenerationParams(token_ids=gen.TokenIds(ids=[VOCAB_SIZE])), "params.token_ids.ids[0]"),
    (p(stopping__stop=[f"s{i}" for i in range(17)]), "params.stopping.stop"),
    (p(stopping__stop=["ok", ""]), "params.stopping.stop[1]"),
    (p(stopping__stop_token_ids=[4, VOCAB_SIZE + 3]), "params.stopping.stop_token_ids[1]"),
    (p(stopping__stop_token_ids=[-2]), "params.stopping.stop_token_ids[0]"),
    (p(logprobs=21), "params.logprobs"),
    (p(logprobs=-1), "params.logprobs"),
    (p(stopping__max_tokens=4, stopping__min_tokens=5), "params.stopping.min_tokens"),
    (p(stopping__min_tokens=-1), "params.stopping.min_tokens"),
    (p(request_id="r" * 129), "params.request_id"),
    (p(priority=101), "params.priority"),
    (p(priority=-101), "params.priority"),
]


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.extend(v.field for v in bad.field_violations)
            assert all(v.description for v in bad.field_violations)
    return fields


@pytest.mark.parametrize("synthetic_server", [{"context_length": CONTEXT}], indirect=True)
@pytest.mark.parametrize(("params", "field"), CASES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(CASES)])
async def test_invalid_field(synthetic_server, text_generation_stub, params, field, wait_until):
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await text_generation_stub.Generate(tg.GenerateRequest(params=params), timeout=10)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(unary.value), unary.value.details()
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for event in text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params), timeout=10):
            events.append(event)
    assert stream.value.code() == grpc.StatusCode.INVALID_ARGUMENT and events == []
    assert field in violations(stream.value)
    assert synthetic_server.handle.admission.in_flight == 0 and synthetic_server.engine.stats().idle


@pytest.mark.parametrize("synthetic_server", [{"context_length": CONTEXT}], indirect=True)
async def test_all_violations_reported_at_once(text_generation_stub):
    bad = p(sampling__top_p=2.0, sampling__temperature=-1.0, stopping__max_tokens=0, priority=500)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await text_generation_stub.Generate(tg.GenerateRequest(params=bad), timeout=10)
    assert set(violations(err.value)) >= {"params.sampling.top_p", "params.sampling.temperature",
                                          "params.stopping.max_tokens", "params.priority"}


@pytest.mark.parametrize("synthetic_server", [{"context_length": CONTEXT}], indirect=True)
async def test_boundaries_are_accepted(text_generation_stub):
    prompt_tokens = len("valid prompt") + 1
    ok = p(stopping__max_tokens=CONTEXT - prompt_tokens, sampling__top_p=1.0, sampling__temperature=0.0,
           sampling__min_p=1.0, logprobs=20, priority=-100, request_id="r" * 128, stopping__min_tokens=3)
    result = (await text_generation_stub.Generate(tg.GenerateRequest(params=ok), timeout=30)).result
    assert result.usage.completion_tokens == CONTEXT - prompt_tokens
    assert len(result.logprobs) == len(result.token_ids)


async def test_detokenize_rejects_unknown_ids(text_generation_stub):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await text_generation_stub.Detokenize(tg.DetokenizeRequest(token_ids=[5, VOCAB_SIZE]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids[1]" in violations(err.value)


async def test_reused_request_id_of_a_running_call_is_served(synthetic_server, text_generation_stub):
    """A client request id is a label for tracing: two calls may share one without clashing."""
    long = p(stopping__max_tokens=3000, request_id="dup")
    first = text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=long))
    started = await first.read()
    assert started.WhichOneof("event") == "started" and started.started.request_id == "dup"
    second = await text_generation_stub.Generate(tg.GenerateRequest(params=p(request_id="dup")), timeout=10)
    assert second.result.request_id == "dup"
    assert second.result.finish_reason != gen.FINISH_REASON_UNSPECIFIED
    first.cancel()
