"""No CPU-heavy work on the event loop: health answers while the largest allowed inputs are tokenized."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc

pytest.importorskip("tokenrelay_engines.torch.engine")

from tests.engine_mode import engine_process  # noqa: E402
from tokenrelay_server.app import start_server  # noqa: E402
from tokenrelay_server.config import ServerConfig  # noqa: E402
from tests.integration.test_torch_serving import DEMO  # noqa: E402

HEALTH_BUDGET_S = 1.0


async def test_health_answers_within_a_second_while_the_largest_prompts_are_tokenized():
    config = ServerConfig(host="127.0.0.1", port=0, engine="torch", torch=DEMO, engine_process=engine_process())
    handle = await asyncio.wait_for(start_server(config), timeout=240)
    try:
        largest = "123+456=" * (config.limits.max_prompt_bytes // 8)  # exactly the limit, in bytes
        assert len(largest.encode()) == config.limits.max_prompt_bytes
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            heavy = [asyncio.ensure_future(stub.Tokenize(tg.TokenizeRequest(text=largest), timeout=120))
                     for _ in range(2)]
            heavy.append(asyncio.ensure_future(stub.Generate(tg.GenerateRequest(params=gen.GenerationParams(
                text=largest)), timeout=120)))
            latencies, during = [], 0
            for _ in range(50):
                started = time.monotonic()
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.monotonic() - started)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                during += not all(h.done() for h in heavy)
                await asyncio.sleep(0.02)  # pacing of the probe, not synchronisation
            tokenized = await asyncio.wait_for(heavy[0], timeout=120)
            assert len(tokenized.token_ids) > 100_000
            with pytest.raises(grpc.aio.AioRpcError) as err:  # far over the demo model's context
                await asyncio.wait_for(heavy[2], timeout=120)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await asyncio.wait_for(heavy[1], timeout=120)
        assert during >= 10, f"only {during} health checks overlapped the tokenization"
        assert max(latencies) < HEALTH_BUDGET_S, f"slowest health check {max(latencies):.3f}s"
    finally:
        await asyncio.wait_for(handle.stop(0), timeout=60)
