"""Coalescing: a stream sends whatever tokens arrived since its last message, so a consumer that
lags gets fewer, larger messages (never one per token) with the same text and token ids."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc

NUM_TOKENS = 2000
# A small HTTP/2 window and no BDP probing: a client that stops reading pushes back on the
# server within a few messages (the default window would let ~3,000 small messages through).
SLOW_CLIENT = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _params() -> gen.GenerationParams:
    return gen.GenerationParams(text="coalesce me", sampling=gen.SamplingParams(temperature=0.0),
                                stopping=gen.StoppingCriteria(max_tokens=NUM_TOKENS, ignore_eos=True))


@pytest.mark.parametrize("synthetic_server", [{"ttft_ms": 0.0, "itl_ms": 0.2}], indirect=True)
async def test_a_slow_consumer_gets_fewer_messages_than_tokens_and_the_same_text(synthetic_server, wait_until):
    engine = synthetic_server.engine
    async with grpc.aio.insecure_channel(synthetic_server.address) as fast:
        whole = (await text_generation_pb2_grpc.TextGenerationServiceStub(fast).Generate(
            tg.GenerateRequest(params=_params()), timeout=60)).result
    assert len(whole.token_ids) == NUM_TOKENS
    async with grpc.aio.insecure_channel(synthetic_server.address, options=SLOW_CLIENT) as slow:
        call = text_generation_pb2_grpc.TextGenerationServiceStub(slow).GenerateStream(
            tg.GenerateStreamRequest(params=_params()), timeout=60)
        assert (await asyncio.wait_for(call.read(), timeout=10)).WhichOneof("event") == "started"
        # The consumer lags: it reads nothing more until the engine has produced every token.
        await wait_until(lambda: engine.stats().running == 0 and engine.stats().waiting == 0, timeout=30)
        deltas, finished = [], None
        while (msg := await asyncio.wait_for(call.read(), timeout=30)) is not grpc.aio.EOF:
            if msg.HasField("delta"):
                deltas.append(msg.delta)
            else:
                finished = msg.finished
    assert finished is not None and finished.usage.completion_tokens == NUM_TOKENS
    assert [t for d in deltas for t in d.token_ids] == list(whole.token_ids)
    assert "".join(d.text for d in deltas) == whole.text
    print(f"{len(deltas)} delta messages for {NUM_TOKENS} tokens")
    assert len(deltas) < NUM_TOKENS // 4, f"{len(deltas)} messages for {NUM_TOKENS} tokens"
