"""The engine contract (`engines.base.AsyncEngine`), checked against every engine in conftest.

Every wait is bounded: outputs are drained under `asyncio.wait_for`, and "the engine is idle
again" is a poll of `stats()` against a deadline. Prompts are tokenized by the engine itself
from short ASCII arithmetic ("12+34="), which every tokenizer here can represent.

Points of the contract these tests pin down beyond base.py's docstrings:
- the final output is the last item: the iterator ends right after it;
- a matched stop token id is part of the output token ids (and counted in usage);
- after shutdown(), add_request raises EngineDeadError or its iterator ends without output.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from tokenrelay_engines.base import (
    AsyncEngine, EngineDeadError, FinishReason, InvalidRequest, Request, RequestOutput, SamplingParams,
    StoppingCriteria,
)

pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0  # any single bounded wait (two busy cores)
TEXT = "12+34="
PROMPTS = ("12+34=", "7+8=", "100+250=", "999+1=")
_request_ids = itertools.count()


# ---- helpers -------------------------------------------------------------------------------

def make_request(engine: AsyncEngine, text: str = TEXT, *, max_tokens: int = 8, temperature: float = 0.0,
                 seed: int | None = None, ignore_eos: bool = True, stop_token_ids: tuple[int, ...] = (),
                 deadline: float | None = None, prompt: list[int] | None = None) -> Request:
    return Request(
        request_id=f"conf-{next(_request_ids)}",
        prompt_token_ids=prompt if prompt is not None else engine.tokenize(text),
        sampling=SamplingParams(temperature=temperature, seed=seed),
        stopping=StoppingCriteria(max_tokens=max_tokens, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids),
        arrival_time=time.monotonic(),
        deadline=deadline,
    )


def long_max_tokens(engine: AsyncEngine, prompt: list[int]) -> int:
    """As many tokens as the context allows (capped): a request still running when we act on it."""
    return min(200, engine.info().context_length - len(prompt))


async def drain(stream) -> list[RequestOutput]:
    async def _all() -> list[RequestOutput]:
        return [out async for out in stream]
    return await asyncio.wait_for(_all(), WAIT_S)


async def next_output(stream) -> RequestOutput:
    return await asyncio.wait_for(anext(stream), WAIT_S)


def check_outputs(request: Request, outs: list[RequestOutput]) -> list[int]:
    """Deltas then exactly one final output with consistent usage, seed and metrics; the ids."""
    assert outs, "the iterator ended without a final output"
    assert all(o.request_id == request.request_id for o in outs)
    assert all(not o.finished for o in outs[:-1]), "an output after the final one"
    final = outs[-1]
    assert final.finished and final.finish_reason is not None, final
    token_ids = [t for o in outs for t in o.token_ids]
    assert final.usage is not None, final
    assert final.usage.prompt_tokens == len(request.prompt_token_ids)
    assert final.usage.completion_tokens == len(token_ids)
    assert final.seed is not None and outs[0].seed is not None
    if request.sampling.seed is not None:
        assert final.seed == outs[0].seed == request.sampling.seed
    m = final.metrics
    assert m is not None, final
    assert m.arrival_time <= m.finished_time
    if m.first_scheduled_time is not None:
        assert m.arrival_time <= m.first_scheduled_time <= m.finished_time
    if token_ids:
        assert m.first_token_time is not None
    if m.first_token_time is not None:
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    return token_ids


async def generate(engine: AsyncEngine, request: Request) -> tuple[list[int], RequestOutput]:
    outs = await drain(engine.add_request(request))
    token_ids = check_outputs(request, outs)
    vocab = engine.info().vocab_size
    assert all(0 <= t < vocab for t in token_ids)
    return token_ids, outs[-1]


async def wait_idle(engine: AsyncEngine, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not (stats := engine.stats()).idle:
        assert time.monotonic() < end, f"engine not idle after {timeout}s: {stats}"
        await asyncio.sleep(0.005)  # poll interval of a bounded condition wait


# ---- lifecycle and metadata ----------------------------------------------------------------

async def test_started_engine_reports_sane_info_and_is_idle(engine: AsyncEngine) -> None:
    assert isinstance(engine, AsyncEngine)
    info = engine.info()
    assert info.name
    assert info.context_length > 0 and info.vocab_size > 0
    assert all(0 <= e < info.vocab_size for e in info.eos_token_ids)
    stats = engine.stats()
    assert stats.idle and stats.kv_blocks_total > 0, stats
    await engine.check_health()


async def test_tokenize_detokenize_round_trip(engine: AsyncEngine) -> None:
    vocab = engine.info().vocab_size
    plain = engine.tokenize(TEXT, add_special_tokens=False)
    assert plain and all(0 <= t < vocab for t in plain)
    assert engine.detokenize(plain) == TEXT
    with_special = engine.tokenize(TEXT)
    assert all(0 <= t < vocab for t in with_special)
    assert engine.detokenize(with_special, skip_special_tokens=True) == TEXT


# ---- generation ----------------------------------------------------------------------------

async def test_request_yields_deltas_then_one_final_output(engine: AsyncEngine) -> None:
    request = make_request(engine, max_tokens=6, temperature=1.0, ignore_eos=False)
    stream = engine.add_request(request)
    outs = await drain(stream)
    check_outputs(request, outs)
    with pytest.raises(StopAsyncIteration):
        await next_output(stream)
    await wait_idle(engine)


async def test_max_tokens_with_ignore_eos_ends_with_length(engine: AsyncEngine) -> None:
    request = make_request(engine, max_tokens=7, ignore_eos=True)
    token_ids, final = await generate(engine, request)
    assert final.finish_reason is FinishReason.LENGTH
    assert len(token_ids) == 7
    await wait_idle(engine)


async def test_stop_token_id_ends_with_stop(engine: AsyncEngine) -> None:
    eos = set(engine.info().eos_token_ids)
    first, _ = await generate(engine, make_request(engine, max_tokens=8))
    # the latest of the first few tokens that appears there for the first time and is no eos
    k = max((i for i in range(min(4, len(first))) if first[i] not in first[:i] and first[i] not in eos),
            default=0)
    stop_id = first[k]
    token_ids, final = await generate(engine, make_request(engine, max_tokens=8, stop_token_ids=(stop_id,)))
    assert final.finish_reason is FinishReason.STOP, final
    assert final.stop_reason == stop_id
    assert token_ids == first[:k + 1]


async def test_same_seed_gives_same_tokens(engine: AsyncEngine) -> None:
    runs = [await generate(engine, make_request(engine, max_tokens=8, temperature=1.0, seed=1234))
            for _ in range(2)]
    (a, fa), (b, fb) = runs
    assert a == b
    assert fa.seed == fb.seed == 1234


async def test_concurrent_greedy_requests_match_solo_runs(engine: AsyncEngine) -> None:
    solo = [(await generate(engine, make_request(engine, text, max_tokens=8)))[0] for text in PROMPTS]
    together = await asyncio.gather(*(generate(engine, make_request(engine, text, max_tokens=8))
                                      for text in PROMPTS))
    assert [ids for ids, _ in together] == solo
    await wait_idle(engine)


# ---- cancellation --------------------------------------------------------------------------

async def test_abort_mid_stream_cancels_and_frees_everything(engine: AsyncEngine) -> None:
    prompt = engine.tokenize(TEXT)
    request = make_request(engine, prompt=prompt, max_tokens=long_max_tokens(engine, prompt))
    stream = engine.add_request(request)
    first = await next_output(stream)
    assert not first.finished, "finished before the test could abort it; raise max_tokens"
    await engine.abort(request.request_id)
    rest = await drain(stream)
    check_outputs(request, [first, *rest])
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    await engine.abort(request.request_id)  # idempotent
    await engine.abort("conf-no-such-request")  # unknown id: no error
    await wait_idle(engine)
    await engine.check_health()


async def test_closing_the_iterator_early_frees_everything(engine: AsyncEngine) -> None:
    prompt = engine.tokenize(TEXT)
    request = make_request(engine, prompt=prompt, max_tokens=long_max_tokens(engine, prompt))
    stream = engine.add_request(request)
    first = await next_output(stream)
    assert not first.finished
    await asyncio.wait_for(stream.aclose(), WAIT_S)
    with pytest.raises(StopAsyncIteration):
        await next_output(stream)
    await wait_idle(engine)
    await engine.abort(request.request_id)  # after close: still no error
    # the engine still serves
    _, final = await generate(engine, make_request(engine, max_tokens=3))
    assert final.finish_reason is FinishReason.LENGTH


# ---- bad input and deadlines ---------------------------------------------------------------

async def test_invalid_requests_raise_invalid_request(engine: AsyncEngine) -> None:
    info = engine.info()
    prompt = engine.tokenize(TEXT)
    bad = [
        make_request(engine, prompt=[*prompt, info.vocab_size]),
        make_request(engine, prompt=[*prompt, -1]),
        make_request(engine, prompt=prompt, max_tokens=info.context_length - len(prompt) + 1),
    ]
    for request in bad:
        with pytest.raises(InvalidRequest) as caught:
            stream = engine.add_request(request)
            await next_output(stream)  # an engine may raise on the first read instead
        assert caught.value.field
    assert engine.stats().idle
    _, final = await generate(engine, make_request(engine, max_tokens=2))
    assert final.finish_reason is FinishReason.LENGTH


async def test_past_deadline_finishes_with_deadline(engine: AsyncEngine) -> None:
    for deadline in (time.monotonic() - 1.0, time.monotonic()):
        request = make_request(engine, max_tokens=16, deadline=deadline)
        _, final = await generate(engine, request)
        assert final.finish_reason is FinishReason.DEADLINE, final
    await wait_idle(engine)


# ---- health and shutdown -------------------------------------------------------------------

async def test_healthy_while_serving(engine: AsyncEngine) -> None:
    await engine.check_health()
    request = make_request(engine, max_tokens=6)
    stream = engine.add_request(request)
    outs = [await next_output(stream)]
    await engine.check_health()
    outs += await drain(stream)
    check_outputs(request, outs)
    await engine.check_health()


async def test_shutdown_cancels_pending_and_refuses_new_requests(engine: AsyncEngine) -> None:
    prompt = engine.tokenize(TEXT)
    request = make_request(engine, prompt=prompt, max_tokens=long_max_tokens(engine, prompt))
    stream = engine.add_request(request)
    first = await next_output(stream)
    assert not first.finished
    await asyncio.wait_for(engine.shutdown(), WAIT_S)
    rest = await drain(stream)
    check_outputs(request, [first, *rest])
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    late = make_request(engine, prompt=prompt, max_tokens=4)
    try:
        stream = engine.add_request(late)
    except EngineDeadError:
        return
    outs = await drain(stream)  # bounded: must end, not hang
    assert not [t for o in outs for t in o.token_ids], "generated after shutdown"
    if outs:
        assert outs[-1].finished and outs[-1].finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR)
