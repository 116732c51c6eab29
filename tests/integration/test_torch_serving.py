"""The embedded demo model (a tiny Llama that adds integers) served through the real server."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc

pytest.importorskip("engines.torch.engine")
pytest.importorskip("engines.torch.runner")

from engines.config import SchedulerConfig, TorchEngineConfig  # noqa: E402
from server.app import start_server  # noqa: E402
from server.config import ServerConfig  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parents[2] / "engines" / "torch" / "demo_model"
HAVE_DEMO = (DEMO_DIR / "config.json").exists()
needs_demo = pytest.mark.skipif(not HAVE_DEMO, reason="the embedded demo model has not landed yet")
DEMO = TorchEngineConfig(scheduler=SchedulerConfig(max_num_seqs=64))
DUMMY_TINY = TorchEngineConfig(load_format="dummy", dummy_shape="tiny",
                               scheduler=SchedulerConfig(max_num_seqs=16, num_blocks=256))


@pytest.fixture
async def torch_stub(request: pytest.FixtureRequest):
    engine_config = getattr(request, "param", DEMO)
    config = ServerConfig(host="127.0.0.1", port=0, engine="torch", torch=engine_config)
    handle = await asyncio.wait_for(start_server(config), timeout=240)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            yield text_generation_pb2_grpc.TextGenerationStub(ch), handle
    finally:
        await asyncio.wait_for(handle.stop(0), timeout=60)


async def _room(stub, prompt: str) -> int:
    info = await stub.GetModelInfo(tg.GetModelInfoRequest(), timeout=30)
    prompt_len = len((await stub.Tokenize(tg.TokenizeRequest(text=prompt, add_special_tokens=True))).token_ids)
    return info.context_length - prompt_len


@needs_demo
async def test_demo_model_adds_correctly_under_concurrency(torch_stub):
    stub, handle = torch_stub
    rng = random.Random(1234)
    pairs = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(200)]
    max_tokens = min(6, await _room(stub, "999+999="))

    async def ask(a: int, b: int) -> gen.GenerationResult:
        p = gen.GenerationParams(text=f"{a}+{b}=", sampling=gen.SamplingParams(temperature=0.0),
                                 stopping=gen.StoppingCriteria(max_tokens=max_tokens))
        return (await stub.Generate(tg.GenerateRequest(params=p), timeout=240)).result

    results = await asyncio.wait_for(asyncio.gather(*(ask(a, b) for a, b in pairs)), timeout=280)
    wrong = [(a, b, r.text) for (a, b), r in zip(pairs, results) if r.text.strip() != str(a + b)]
    assert not wrong, f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"
    assert all(r.finish_reason == gen.FINISH_REASON_EOS for r in results)


@pytest.mark.parametrize("torch_stub", [
    pytest.param(DEMO, id="demo", marks=needs_demo),
    pytest.param(DUMMY_TINY, id="dummy-tiny"),
], indirect=True)
async def test_torch_stream_equals_unary_for_seeded_sampling(torch_stub):
    stub, _ = torch_stub
    prompt = "12+34="
    p = gen.GenerationParams(text=prompt, sampling=gen.SamplingParams(temperature=1.0, seed=42),
                             stopping=gen.StoppingCriteria(max_tokens=min(8, await _room(stub, prompt)),
                                                           ignore_eos=True),
                             logprobs=2)
    unary = (await stub.Generate(tg.GenerateRequest(params=p), timeout=120)).result
    events = [e async for e in stub.GenerateStream(tg.GenerateStreamRequest(params=p), timeout=120)]
    assert events[0].WhichOneof("event") == "started" and events[-1].WhichOneof("event") == "finished"
    deltas = [e.delta for e in events[1:-1]]
    assert "".join(d.text for d in deltas) == unary.text
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids)
    assert [lp for d in deltas for lp in d.logprobs] == list(unary.logprobs)
    assert events[-1].finished.usage == unary.usage and unary.seed == 42
