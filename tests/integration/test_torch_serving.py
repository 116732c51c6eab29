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

pytest.importorskip("tokenrelay_engines.torch.engine")
pytest.importorskip("tokenrelay_engines.torch.runner")

from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig  # noqa: E402
from tests.engine_mode import engine_process  # noqa: E402
from tokenrelay_server.app import start_server  # noqa: E402
from tokenrelay_server.config import ServerConfig  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parents[2] / "engines" / "torch" / "demo_model"
HAVE_DEMO = (DEMO_DIR / "config.json").exists()
needs_demo = pytest.mark.skipif(not HAVE_DEMO, reason="the embedded demo model has not landed yet")
DEMO = TorchEngineConfig(model="demo", scheduler=SchedulerConfig(max_num_seqs=64))
DUMMY_TINY = TorchEngineConfig(load_format="dummy", dummy_shape="tiny",
                               scheduler=SchedulerConfig(max_num_seqs=16, num_blocks=256))


@pytest.fixture
async def torch_stub(request: pytest.FixtureRequest):
    engine_config = getattr(request, "param", DEMO)
    config = ServerConfig(host="127.0.0.1", port=0, engine="torch", torch=engine_config,
                          engine_process=engine_process())
    handle = await asyncio.wait_for(start_server(config), timeout=240)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            yield text_generation_pb2_grpc.TextGenerationServiceStub(ch), handle
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


@pytest.mark.parametrize("torch_stub", [pytest.param(DUMMY_TINY, id="dummy-tiny")], indirect=True)
async def test_torch_info_tokenize_and_load(torch_stub):
    stub, handle = torch_stub
    info = await stub.GetModelInfo(tg.GetModelInfoRequest(), timeout=30)
    assert info.engine == "torch" and info.vocab_size > 0 and info.context_length > 0
    ids = list((await stub.Tokenize(tg.TokenizeRequest(text="hello"), timeout=30)).token_ids)
    assert ids and all(0 <= t < info.vocab_size for t in ids)
    assert (await stub.Detokenize(tg.DetokenizeRequest(token_ids=ids), timeout=30)).text == "hello"
    load = await stub.GetServerLoad(tg.GetServerLoadRequest(), timeout=30)
    assert load.kv_blocks_total == 256 and load.running == 0 and not load.draining


@pytest.mark.parametrize("torch_stub", [pytest.param(DUMMY_TINY, id="dummy-tiny")], indirect=True)
async def test_torch_cancel_and_deadline_free_kv_while_others_finish(torch_stub, wait_until):
    """On the reference engine: a cancelled stream and an expired deadline give their KV blocks
    back while a request running beside them completes in full."""
    stub, handle = torch_stub

    def p(max_tokens: int) -> gen.GenerationParams:
        return gen.GenerationParams(text="abc", sampling=gen.SamplingParams(temperature=0.0),
                                    stopping=gen.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True))

    other = asyncio.ensure_future(stub.Generate(tg.GenerateRequest(params=p(64)), timeout=120))
    victim = stub.GenerateStream(tg.GenerateStreamRequest(params=p(400)), timeout=120)
    deltas = 0
    async for event in victim:
        deltas += event.WhichOneof("event") == "delta"
        if deltas == 2:
            break
    assert handle.engine.stats().kv_blocks_used > 0
    victim.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Generate(tg.GenerateRequest(params=p(500)), timeout=0.2)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    result = (await asyncio.wait_for(other, timeout=120)).result
    assert result.finish_reason == gen.FINISH_REASON_LENGTH and result.usage.completion_tokens == 64
    # the cancelled and expired calls leave admission when their handlers unwind, which may come
    # just after the engine went idle: wait (bounded) for both
    await wait_until(lambda: handle.engine.stats().idle and handle.admission.in_flight == 0, timeout=10)


@needs_demo
async def test_demo_prompt_longer_than_context_is_invalid_argument(torch_stub):
    stub, _ = torch_stub
    info = await stub.GetModelInfo(tg.GetModelInfoRequest(), timeout=30)
    p = gen.GenerationParams(text="1" * info.context_length)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Generate(tg.GenerateRequest(params=p), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.prompt" in err.value.details()


@needs_demo
async def test_demo_fifty_concurrent_streams_are_correct_and_distinct(torch_stub):
    stub, _ = torch_stub
    rng = random.Random(99)
    pairs = [(rng.randint(0, 999), rng.randint(0, 999)) for _ in range(50)]

    async def stream(a: int, b: int) -> str:
        p = gen.GenerationParams(text=f"{a}+{b}=", sampling=gen.SamplingParams(temperature=0.0),
                                 stopping=gen.StoppingCriteria(max_tokens=6))
        events = [e async for e in stub.GenerateStream(tg.GenerateStreamRequest(params=p), timeout=120)]
        assert events[-1].finished.finish_reason == gen.FINISH_REASON_EOS
        return "".join(e.delta.text for e in events if e.WhichOneof("event") == "delta")

    texts = await asyncio.wait_for(asyncio.gather(*(stream(a, b) for a, b in pairs)), timeout=180)
    assert texts == [str(a + b) for a, b in pairs]  # each stream got its own answer, in full
