"""The synthetic engine honours the AsyncEngine contract (no server involved)."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay_engines.base import (
    AsyncEngine, EngineDeadError, FinishReason, InvalidRequest, OutputKind, Request, SamplingParams,
    StoppingCriteria,
)
from tokenrelay_engines.synthetic import EOS_ID, SyntheticEngine, SyntheticEngineConfig, decode, encode

FAST = SyntheticEngineConfig(ttft_ms=2, itl_ms=1)


def req(rid: str = "r", text: str = "hi", *, seed: int | None = 1, max_tokens: int = 8, **stopping) -> Request:
    return Request(request_id=rid, prompt_token_ids=encode(text), sampling=SamplingParams(seed=seed),
                   stopping=StoppingCriteria(max_tokens=max_tokens, **stopping), arrival_time=time.monotonic())


async def started(config: SyntheticEngineConfig = FAST) -> SyntheticEngine:
    engine = SyntheticEngine(config)
    await engine.start()
    return engine


async def run(engine: SyntheticEngine, request: Request):
    outs = [o async for o in engine.add_request(request)]
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return outs


async def wait_idle(engine: SyntheticEngine, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not engine.stats().idle:
        assert time.monotonic() < end, engine.stats()
        await asyncio.sleep(0.002)


@given(st.text(max_size=50))
def test_tokenizer_round_trips(text):
    assert decode(encode(text), skip_special_tokens=True) == text
    assert decode(encode(text, add_special_tokens=False)) == text


async def test_is_an_async_engine_and_deterministic():
    engine = await started()
    assert isinstance(engine, AsyncEngine)
    a = await run(engine, req("a"))
    b = await run(engine, req("b"))
    other_seed = await run(engine, req("c", seed=2))
    ids = lambda outs: [t for o in outs for t in o.token_ids]  # noqa: E731
    assert ids(a) == ids(b) != ids(other_seed)
    assert len(ids(a)) == 8 and a[-1].finish_reason is FinishReason.LENGTH
    assert "".join(o.text for o in a) == engine.detokenize(ids(a))
    assert a[0].seed == 1 and a[-1].usage.completion_tokens == 8
    m = a[-1].metrics
    assert m.first_token_time - m.first_scheduled_time >= FAST.ttft_ms / 1000 - 1e-3
    await wait_idle(engine)


@pytest.mark.parametrize("itl_ms", [0.0, 1.0])
async def test_final_only_is_one_output_equal_to_the_merged_deltas(itl_ms):
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=itl_ms))
    stream = await run(engine, req("s", max_tokens=12, stop=("zzz",)))
    final_only = req("f", max_tokens=12, stop=("zzz",))
    final_only.output_kind = OutputKind.FINAL_ONLY
    (final,) = await run(engine, final_only)
    assert final.token_ids == [t for o in stream for t in o.token_ids] and len(final.token_ids) == 12
    assert final.text == "".join(o.text for o in stream) and final.seed == 1
    assert final.usage == stream[-1].usage and final.finish_reason is FinishReason.LENGTH
    assert final.metrics.first_token_time - final.metrics.first_scheduled_time >= 1 / 1000 - 1e-3
    await wait_idle(engine)


async def test_picks_and_reports_a_seed():
    engine = await started()
    outs = await run(engine, req(seed=None))
    assert outs[0].seed is not None and outs[-1].seed == outs[0].seed


async def test_stop_string_held_back_never_leaks():
    engine = await started()
    base = "".join(o.text for o in await run(engine, req(max_tokens=30)))
    stop = base.split(" ")[6][:3]
    outs = await run(engine, req(max_tokens=30, stop=(stop,)))
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop
    assert text == base[:base.index(stop)] and stop not in text
    incl = await run(engine, req(max_tokens=30, stop=(stop,), include_stop_in_output=True))
    assert "".join(o.text for o in incl) == base[:base.index(stop) + len(stop)]


async def test_eos_min_tokens_and_ignore_eos():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=1, eos_rate=1.0))
    outs = await run(engine, req(max_tokens=10))
    assert [t for o in outs for t in o.token_ids] == [EOS_ID] and outs[-1].finish_reason is FinishReason.EOS
    outs = await run(engine, req(max_tokens=10, ignore_eos=True))
    assert outs[-1].finish_reason is FinishReason.LENGTH and EOS_ID not in [t for o in outs for t in o.token_ids]
    outs = await run(engine, req(max_tokens=10, min_tokens=4))
    assert outs[-1].usage.completion_tokens == 4 and outs[-1].finish_reason is FinishReason.EOS


async def test_logprobs():
    engine = await started()
    outs = await run(engine, Request("lp", encode("x"), sampling=SamplingParams(seed=3, logprobs=4),
                                     stopping=StoppingCriteria(max_tokens=5)))
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 5 and all(len(lp.top) == 4 and lp.top[0] == (lp.token_id, lp.logprob) for lp in lps)
    assert all(lp.logprob <= 0 for lp in lps)


async def test_abort_is_idempotent_and_frees_the_slot():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=5))
    stream = engine.add_request(req("long", max_tokens=1000))
    first = await anext(stream)
    assert first.token_ids and engine.stats().running == 1 and engine.stats().kv_blocks_used >= 1
    await engine.abort("long")
    await engine.abort("long")
    await engine.abort("never-existed")
    rest = [o async for o in stream]
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.CANCELLED
    assert engine.stats().idle


async def test_closing_the_iterator_aborts():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=5))
    stream = engine.add_request(req("c", max_tokens=1000))
    await anext(stream)
    await stream.aclose()
    assert engine.stats().idle


async def test_deadline_finishes_with_deadline():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=5))
    r = req("d", max_tokens=1000)
    r.deadline = time.monotonic() + 0.05
    outs = await asyncio.wait_for(run(engine, r), timeout=10)
    assert outs[-1].finish_reason is FinishReason.DEADLINE and engine.stats().idle


async def test_batch_limit_and_priority():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=2, max_num_seqs=1))
    first = engine.add_request(req("first", max_tokens=5))
    late_low = engine.add_request(Request("low", encode("x"), stopping=StoppingCriteria(max_tokens=2), priority=5))
    high = engine.add_request(Request("high", encode("x"), stopping=StoppingCriteria(max_tokens=2), priority=-5))
    assert engine.stats().running == 1 and engine.stats().waiting == 2
    done_order = []

    async def drain(name, stream):
        async for out in stream:
            if out.finished:
                done_order.append(name)

    await asyncio.wait_for(asyncio.gather(drain("first", first), drain("low", late_low), drain("high", high)), timeout=10)
    assert done_order == ["first", "high", "low"]
    await wait_idle(engine)


async def test_rejects_bad_requests():
    engine = await started(SyntheticEngineConfig(context_length=32))
    with pytest.raises(InvalidRequest) as err:
        engine.add_request(req("big", max_tokens=40))
    assert err.value.field == "stopping.max_tokens"
    with pytest.raises(InvalidRequest):
        engine.add_request(Request("bad", [10**6]))
    stream = engine.add_request(req("dup", max_tokens=20))
    with pytest.raises(InvalidRequest):
        engine.add_request(req("dup"))
    await stream.aclose()


async def test_kill_and_shutdown():
    engine = await started(SyntheticEngineConfig(ttft_ms=1, itl_ms=5))
    stream = engine.add_request(req("k", max_tokens=1000))
    await engine.check_health()
    engine.kill("boom")
    outs = [o async for o in stream]
    assert outs[-1].finish_reason is FinishReason.ERROR and outs[-1].error == "boom"
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        engine.add_request(req("after"))
    other = await started()
    stream = other.add_request(req("s", max_tokens=1000))
    await other.shutdown()
    assert [o async for o in stream][-1].finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineDeadError):
        await other.check_health()


async def test_closing_an_unread_iterator_aborts():
    engine = await started()
    stream = engine.add_request(req("unread", max_tokens=1000))
    assert not engine.stats().idle
    await stream.aclose()
    assert engine.stats().idle
