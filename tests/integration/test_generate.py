"""Happy paths of every TextGeneration RPC against a real server with the synthetic engine."""

from __future__ import annotations

import asyncio

import grpc
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg

from tokenrelay_engines.synthetic import EOS_ID, VOCAB_SIZE


def params(text: str = "hello relay", *, seed: int = 7, max_tokens: int = 12, **kw) -> gen.GenerationParams:
    return gen.GenerationParams(text=text, sampling=gen.SamplingParams(seed=seed, temperature=0.8),
                                stopping=gen.StoppingCriteria(max_tokens=max_tokens), **kw)


async def collect_stream(stub, p: gen.GenerationParams, **kw) -> list[tg.GenerateStreamResponse]:
    return [event async for event in stub.GenerateStream(tg.GenerateStreamRequest(params=p), timeout=20, **kw)]


def fold_stream(events: list[tg.GenerateStreamResponse]) -> tuple[str, list[int], tg.StreamFinished]:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert set(kinds[1:-1]) <= {"delta"}
    deltas = [e.delta for e in events if e.WhichOneof("event") == "delta"]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], events[-1].finished


async def test_generate_unary(text_generation_stub):
    resp = await text_generation_stub.Generate(tg.GenerateRequest(params=params(request_id="r-1")), timeout=20)
    r = resp.result
    assert r.request_id == "r-1"
    assert r.finish_reason == gen.FINISH_REASON_LENGTH
    assert len(r.token_ids) == 12 and r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len("hello relay") + 1  # bytes + <s>
    assert r.seed == 7
    assert r.text and r.text.startswith(" ")
    assert r.timing.total.ToNanoseconds() >= r.timing.time_to_first_token.ToNanoseconds() > 0
    assert not r.logprobs


async def test_stream_deltas_concatenate_to_unary_result(text_generation_stub):
    p = params("the same seeded request", seed=123, max_tokens=20, logprobs=3)
    unary = (await text_generation_stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
    events = await collect_stream(text_generation_stub, p)
    text, ids, finished = fold_stream(events)
    assert events[0].started.seed == 123
    assert events[0].started.prompt_tokens == unary.usage.prompt_tokens
    assert text == unary.text and ids == list(unary.token_ids)
    assert finished.finish_reason == unary.finish_reason
    assert finished.usage == unary.usage
    stream_lps = [lp for e in events if e.WhichOneof("event") == "delta" for lp in e.delta.logprobs]
    assert stream_lps == list(unary.logprobs)
    assert len(unary.logprobs) == len(unary.token_ids)
    assert all(len(lp.top) == 3 and lp.top[0].token_id == lp.token_id for lp in unary.logprobs)


async def test_seed_determinism_and_server_picked_seed(text_generation_stub):
    p = params(seed=99)
    a = (await text_generation_stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
    b = (await text_generation_stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
    assert a.token_ids == b.token_ids
    unseeded = gen.GenerationParams(text="hello relay", sampling=gen.SamplingParams(temperature=1.0))
    c = (await text_generation_stub.Generate(tg.GenerateRequest(params=unseeded), timeout=20)).result
    # The server picked a seed and reported it: replaying it reproduces the output.
    replay = gen.GenerationParams(text="hello relay", sampling=gen.SamplingParams(temperature=1.0, seed=c.seed))
    d = (await text_generation_stub.Generate(tg.GenerateRequest(params=replay), timeout=20)).result
    assert c.token_ids == d.token_ids


async def test_fifty_concurrent_streams_distinct_and_correct(text_generation_stub):
    ps = [params(f"prompt number {i}", seed=i, max_tokens=16, request_id=f"c-{i}") for i in range(50)]
    results = await asyncio.gather(*(collect_stream(text_generation_stub, p) for p in ps))
    folded = [fold_stream(events) for events in results]
    for i, (events, (text, ids, finished)) in enumerate(zip(results, folded)):
        assert events[0].started.request_id == f"c-{i}"
        assert finished.finish_reason == gen.FINISH_REASON_LENGTH and len(ids) == 16
    assert len({tuple(ids) for _, ids, _ in folded}) == 50
    # Each stream equals its own unary replay (no cross-talk between concurrent requests).
    for i in (0, 17, 49):
        unary = (await text_generation_stub.Generate(tg.GenerateRequest(params=ps[i]), timeout=20)).result
        assert (unary.text, list(unary.token_ids)) == folded[i][:2]


async def test_request_id_from_metadata_and_generated(text_generation_stub):
    """The id is echoed in trailing metadata by every call; a stream sends it in initial metadata too."""
    call = text_generation_stub.Generate(tg.GenerateRequest(params=params()),
                                         metadata=(("x-request-id", "from-header"),), timeout=20)
    assert (await call).result.request_id == "from-header"
    assert ("x-request-id", "from-header") in tuple(await call.trailing_metadata())
    call = text_generation_stub.Generate(tg.GenerateRequest(params=params()), timeout=20)
    rid = (await call).result.request_id
    assert rid and dict(await call.trailing_metadata())["x-request-id"] == rid
    stream = text_generation_stub.GenerateStream(tg.GenerateStreamRequest(params=params(request_id="s-9")), timeout=20)
    assert dict(await stream.initial_metadata())["x-request-id"] == "s-9"
    assert [e async for e in stream][0].started.request_id == "s-9"
    assert dict(await stream.trailing_metadata())["x-request-id"] == "s-9"


async def test_stop_string_is_not_leaked(text_generation_stub):
    base = (await text_generation_stub.Generate(tg.GenerateRequest(params=params(max_tokens=20)), timeout=20)).result
    words = base.text.split(" ")
    stop = " " + words[4][:2]  # starts the 4th generated word
    cut = base.text.index(stop)
    p = params(max_tokens=20)
    p.stopping.stop.append(stop)
    unary = (await text_generation_stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
    assert unary.finish_reason == gen.FINISH_REASON_STOP
    assert unary.matched_stop.stop_string == stop
    assert unary.text == base.text[:cut]
    text, _, finished = fold_stream(await collect_stream(text_generation_stub, p))
    assert text == unary.text and finished.matched_stop.stop_string == stop
    p.stopping.include_stop_in_output = True
    incl = (await text_generation_stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
    assert incl.text == base.text[:cut + len(stop)]


async def test_stop_token_and_eos(synthetic_server_factory):
    srv = await synthetic_server_factory(eos_rate=0.3)
    async with grpc.aio.insecure_channel(srv.address) as ch:
        from tokenrelay.v1 import text_generation_pb2_grpc

        stub = text_generation_pb2_grpc.TextGenerationServiceStub(ch)
        p = params(max_tokens=200, seed=5)
        r = (await stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
        assert r.finish_reason == gen.FINISH_REASON_EOS and r.token_ids[-1] == EOS_ID
        p.stopping.ignore_eos = True
        r2 = (await stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
        assert r2.finish_reason == gen.FINISH_REASON_LENGTH and EOS_ID not in r2.token_ids
        stop_id = r2.token_ids[3]
        p.stopping.stop_token_ids.append(stop_id)
        r3 = (await stub.Generate(tg.GenerateRequest(params=p), timeout=20)).result
        assert r3.finish_reason == gen.FINISH_REASON_STOP and r3.matched_stop.stop_token_id == stop_id
        assert r3.token_ids[-1] == stop_id and len(r3.token_ids) == list(r2.token_ids).index(stop_id) + 1


async def test_tokenize_detokenize_model_info_and_load(text_generation_stub):
    tok = await text_generation_stub.Tokenize(tg.TokenizeRequest(text="héllo"), timeout=10)
    assert len(tok.token_ids) == len("héllo".encode())
    with_bos = await text_generation_stub.Tokenize(tg.TokenizeRequest(text="hi", add_special_tokens=True), timeout=10)
    assert len(with_bos.token_ids) == 3
    detok = await text_generation_stub.Detokenize(tg.DetokenizeRequest(token_ids=tok.token_ids), timeout=10)
    assert detok.text == "héllo"
    skipped = await text_generation_stub.Detokenize(
        tg.DetokenizeRequest(token_ids=with_bos.token_ids, skip_special_tokens=True), timeout=10)
    assert skipped.text == "hi"
    info = await text_generation_stub.GetModelInfo(tg.GetModelInfoRequest(), timeout=10)
    assert info.engine == "synthetic" and info.vocab_size == VOCAB_SIZE
    assert list(info.eos_token_ids) == [EOS_ID] and info.context_length > 0 and info.max_logprobs > 0
    load = await text_generation_stub.GetServerLoad(tg.GetServerLoadRequest(), timeout=10)
    assert load.queue_capacity > 0 and load.kv_blocks_total > 0 and not load.draining
    assert load.running == 0 and load.queue_depth == 0


async def test_token_id_prompt(text_generation_stub):
    ids = (await text_generation_stub.Tokenize(tg.TokenizeRequest(text="hello relay", add_special_tokens=True))).token_ids
    by_ids = gen.GenerationParams(token_ids=gen.TokenIds(ids=ids), sampling=gen.SamplingParams(seed=7, temperature=0.8),
                                  stopping=gen.StoppingCriteria(max_tokens=12))
    a = (await text_generation_stub.Generate(tg.GenerateRequest(params=by_ids), timeout=20)).result
    b = (await text_generation_stub.Generate(tg.GenerateRequest(params=params()), timeout=20)).result
    assert a.token_ids == b.token_ids
