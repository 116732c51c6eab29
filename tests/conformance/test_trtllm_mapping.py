"""Every field of our Request reaches TensorRT-LLM's executor (the test double of its bindings), or is
applied by our layer where the mapping says so (stop strings, stop token ids, deadlines)."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tokenrelay_engines.base import (
    EngineDeadError, FinishReason, InvalidRequest, OutputKind, Request, SamplingParams, StoppingCriteria,
)
from tokenrelay_engines.config import TrtllmEngineConfig
from tokenrelay_engines.trtllm import mapping
from tokenrelay_engines.trtllm.engine import TrtllmEngine

from .test_engine_contract import drain, generate, wait_idle
from .trtllm_double import installed, write_engine_dir

pytestmark = pytest.mark.timeout(60)

# Each field of the request types, and where the test below checks it.
COVERED = {
    "Request": {"request_id", "prompt_token_ids", "sampling", "stopping", "priority", "arrival_time", "deadline",
                "output_kind"},
    "SamplingParams": {"temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                       "frequency_penalty", "seed", "logprobs"},
    "StoppingCriteria": {"max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                         "include_stop_in_output"},
}


def test_every_request_field_is_covered_here() -> None:
    for cls in (Request, SamplingParams, StoppingCriteria):
        assert {f.name for f in dataclasses.fields(cls)} == COVERED[cls.__name__], \
            f"a {cls.__name__} field is new: map it in engines/trtllm/mapping.py and check it here"


def full_request(**stopping) -> Request:
    return Request(
        request_id="map-1", prompt_token_ids=[1, 5, 6, 14, 7, 8, 15],
        sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.2,
                                presence_penalty=0.5, frequency_penalty=-0.25, seed=1234, logprobs=0),
        stopping=StoppingCriteria(**{"max_tokens": 9, "min_tokens": 2, "stop": ("zz",),
                                     "stop_token_ids": (7,), **stopping}),
        priority=-3, arrival_time=time.monotonic())


def test_sampling_and_stopping_fields_reach_the_executor_request() -> None:
    with installed() as tllm:
        req = mapping.build_request(tllm, full_request(), seed=1234, end_id=2)
    assert isinstance(req, tllm.Request)
    assert req.input_token_ids == [1, 5, 6, 14, 7, 8, 15]
    assert req.max_tokens == 9
    assert req.streaming is True and req.return_all_generated_tokens is False
    sc = req.sampling_config
    assert sc.beam_width == 1
    assert (sc.temperature, sc.top_k, sc.min_tokens, sc.seed) == (0.7, 40, 2, 1234)
    for name, want in (("top_p", 0.9), ("min_p", 0.05), ("repetition_penalty", 1.2), ("presence_penalty", 0.5),
                       ("frequency_penalty", -0.25)):
        assert getattr(sc, name) == pytest.approx(want), name
    assert req.output_config.return_log_probs is True
    assert req.output_config.exclude_input_from_output is True
    assert req.output_config.return_generation_logits is False  # NVIDIA/TensorRT-LLM#10810
    assert req.end_id == 2 and req.pad_id == 2
    assert req.stop_words is None  # ours, never the executor's (NVIDIA/TensorRT-LLM#5509)
    assert req.priority == pytest.approx(mapping.executor_priority(-3)) and req.priority > 0.5
    assert req.allotted_time_ms is None  # deadlines are ours (cancel_request)
    with installed() as tllm:  # output_kind: the executor streams either way (stop strings are ours)
        final_only = mapping.build_request(tllm, dataclasses.replace(full_request(), output_kind=OutputKind.FINAL_ONLY),
                                           seed=1234, end_id=2)
    assert final_only.streaming is True


def test_greedy_ignore_eos_and_defaults() -> None:
    request = Request("map-2", [1, 5], sampling=SamplingParams(temperature=0.0),
                      stopping=StoppingCriteria(max_tokens=4, ignore_eos=True))
    with installed() as tllm:
        req = mapping.build_request(tllm, request, seed=7, end_id=2)
    sc = req.sampling_config
    assert sc.top_k == 1 and sc.temperature is None and sc.top_p is None and sc.min_p is None
    assert sc.repetition_penalty is None and sc.presence_penalty is None and sc.min_tokens is None
    assert req.end_id == -1  # ignore_eos: the end id disabled, as TensorRT-LLM's LLM API does
    assert req.output_config.return_log_probs is False
    assert req.priority == mapping.DEFAULT_EXECUTOR_PRIORITY


def test_priority_map_is_strictly_decreasing_inside_the_executors_range() -> None:
    values = [mapping.executor_priority(p) for p in (-10**6, -100, -1, 0, 1, 100, 10**6)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    assert mapping.executor_priority(0) == 0.5


def test_finish_reasons_map() -> None:
    with installed() as tllm:
        fr = tllm.FinishReason
        got = {r: mapping.finish_reason(tllm, r) for r in fr}
    assert got == {fr.END_ID: FinishReason.EOS, fr.LENGTH: FinishReason.LENGTH, fr.STOP_WORDS: FinishReason.STOP,
                   fr.TIMED_OUT: FinishReason.DEADLINE, fr.CANCELLED: FinishReason.CANCELLED,
                   fr.NOT_FINISHED: FinishReason.ERROR}


@pytest.fixture
async def engine() -> AsyncIterator[TrtllmEngine]:
    with tempfile.TemporaryDirectory() as tmp, installed():
        engine = TrtllmEngine(TrtllmEngineConfig(engine_dir=str(write_engine_dir(Path(tmp) / "engine"))))
        await asyncio.wait_for(engine.start(), 30)
        try:
            yield engine
        finally:
            await asyncio.wait_for(engine.shutdown(), 30)


def greedy(engine: TrtllmEngine, rid: str, **stopping) -> Request:
    return Request(rid, engine.tokenize("12+34="), sampling=SamplingParams(temperature=0.0, seed=5),
                   stopping=StoppingCriteria(**{"max_tokens": 12, "ignore_eos": True, **stopping}),
                   arrival_time=time.monotonic())


async def test_the_engine_hands_the_mapped_request_to_the_executor(engine: TrtllmEngine) -> None:
    request = full_request(max_tokens=5, stop=(), stop_token_ids=())
    _, final = await generate(engine, request)
    sent = engine._executor.enqueued[-1]
    assert sent.input_token_ids == request.prompt_token_ids and sent.max_tokens == 5
    assert sent.sampling_config.seed == 1234 and sent.sampling_config.top_k == 40
    assert sent.end_id == engine.info().eos_token_ids[0]
    assert final.seed == 1234
    await wait_idle(engine)


async def test_plain_temperature_sampling_samples(engine: TrtllmEngine) -> None:
    """temperature > 0 with top_k / top_p off must not fall back to the executor's greedy default."""
    outputs = set()
    for seed in range(4):
        request = greedy(engine, f"t{seed}", max_tokens=6)
        request.sampling = SamplingParams(temperature=1.0, seed=seed)
        outputs.add(tuple((await generate(engine, request))[0]))
    assert len(outputs) > 1, "every seed gave the same tokens: greedy, not sampling"
    sent = engine._executor.enqueued[-1].sampling_config
    assert (sent.top_k, sent.top_p, sent.temperature) == (0, 1.0, 1.0)


async def test_logprobs_are_the_sampled_tokens_own(engine: TrtllmEngine) -> None:
    request = greedy(engine, "lp", max_tokens=6)
    request.sampling = SamplingParams(temperature=0.0, logprobs=0)
    outs = await drain(engine.add_request(request))
    ids = [t for o in outs for t in o.token_ids]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == len(ids) == 6
    assert [lp.token_id for lp in lps] == ids and all(lp.logprob < 0 and lp.top == () for lp in lps)
    bad = greedy(engine, "lp-bad")
    bad.sampling = SamplingParams(temperature=0.0, logprobs=1)
    with pytest.raises(InvalidRequest) as caught:
        engine.add_request(bad)
    assert caught.value.field == "logprobs"


async def test_stop_string_is_ours_and_cancels_the_executor_request(engine: TrtllmEngine) -> None:
    outs = await drain(engine.add_request(greedy(engine, "ref")))
    text = "".join(o.text for o in outs)
    stop = text[3:5]
    assert len(stop) == 2 and text.find(stop) == 3, text
    outs = await drain(engine.add_request(greedy(engine, "stop", stop=(stop,))))
    final = outs[-1]
    assert final.finish_reason is FinishReason.STOP and final.stop_reason == stop
    assert "".join(o.text for o in outs) == text[:3]
    outs = await drain(engine.add_request(greedy(engine, "stop-incl", stop=(stop,), include_stop_in_output=True)))
    assert "".join(o.text for o in outs) == text[:5]
    await wait_idle(engine)  # the executor sent its final (CANCELLED) response: KV released
    assert all(r.stop_words is None for r in engine._executor.enqueued)


async def test_min_tokens_holds_stop_token_ids_back(engine: TrtllmEngine) -> None:
    ref, _ = await generate(engine, greedy(engine, "ref"))
    stop_id = ref[0]
    later = [i for i, t in enumerate(ref) if t == stop_id and i >= 3]
    ids, final = await generate(engine, greedy(engine, "min", stop_token_ids=(stop_id,), min_tokens=3))
    if later:
        assert final.finish_reason is FinishReason.STOP and ids == ref[:later[0] + 1]
    else:
        assert final.finish_reason is FinishReason.LENGTH and ids == ref
    assert engine._executor.enqueued[-1].sampling_config.min_tokens == 3


async def test_deadline_cancels_the_running_request(engine: TrtllmEngine) -> None:
    request = greedy(engine, "late", max_tokens=400)
    request.deadline = time.monotonic() + 0.05
    outs = await drain(engine.add_request(request))
    assert outs[-1].finish_reason is FinishReason.DEADLINE, outs[-1]
    assert outs[-1].usage.completion_tokens == sum(len(o.token_ids) for o in outs) < 400
    await wait_idle(engine)


async def test_priority_orders_the_executors_queue(engine: TrtllmEngine) -> None:
    # Fill the batch (max_batch_size 8), then queue a low and a high priority request.
    blockers = [greedy(engine, f"b{i}", max_tokens=30) for i in range(8)]
    streams = [engine.add_request(r) for r in blockers]
    low, high = greedy(engine, "low", max_tokens=2), greedy(engine, "high", max_tokens=2)
    low.priority, high.priority = 5, -5
    low_out, high_out = engine.add_request(low), engine.add_request(high)
    done: list[str] = []

    async def finish(name: str, stream) -> None:
        await drain(stream)
        done.append(name)

    await asyncio.wait_for(asyncio.gather(finish("low", low_out), finish("high", high_out),
                                          *(drain(s) for s in streams)), 30)
    assert done == ["high", "low"]
    assert engine._executor.enqueued[-1].priority > engine._executor.enqueued[-2].priority


async def test_an_executor_error_response_ends_that_request_with_error(engine: TrtllmEngine) -> None:
    engine._executor._max_input_len = 3  # the executor now rejects this prompt (LlmRequest::validate)
    _, final = await generate(engine, greedy(engine, "rejected"))
    assert final.finish_reason is FinishReason.ERROR and "maximum input length" in final.error
    await engine.check_health()  # one bad request does not kill the engine
    await wait_idle(engine)


async def test_a_failing_executor_kills_the_engine_loudly(engine: TrtllmEngine) -> None:
    stream = engine.add_request(greedy(engine, "victim", max_tokens=400))

    def broken(*args, **kwargs):
        raise RuntimeError("[TensorRT-LLM][ERROR] CUDA error: an illegal memory access was encountered")

    engine._executor.await_responses = broken
    outs = await drain(stream)
    assert outs[-1].finish_reason is FinishReason.ERROR and "illegal memory access" in outs[-1].error
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        engine.add_request(greedy(engine, "late"))
