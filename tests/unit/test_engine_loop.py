"""TorchEngine's loop with a fake runner: deterministic tokens, no model, no tensors."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from tokenizers import Tokenizer, decoders, models

from tokenrelay_engines.base import (
    AsyncEngine, EngineDeadError, FinishReason, InvalidRequest, ModelInfo, Request, RequestOutput,
    SamplingParams, StoppingCriteria, TokenLogprob,
)
from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig
from tokenrelay_engines.scheduler.sequence import RunnerOutput, SchedulerOutput
from tokenrelay_engines.torch.engine import TorchEngine
from tokenrelay_engines.torch.streams import OutputSlot

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EOS = 0
WAIT_S = 10.0


def _tokenizer() -> Tokenizer:
    vocab = {"<eos>": EOS} | {ch: i + 1 for i, ch in enumerate(LETTERS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    return tok


class FakeRunner:
    """Token k of a request is letter (prompt[0] + k) mod 26; optional pacing and failure."""

    def __init__(self, config: TorchEngineConfig, num_blocks: int = 32, block_size: int = 4,
                 paced: bool = False, fail_at_step: int | None = None) -> None:
        self.tokenizer = _tokenizer()
        self.model_info = ModelInfo("fake", context_length=64, vocab_size=27, eos_token_ids=(EOS,),
                                    engine="torch", max_logprobs=5, max_stop_strings=2)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.steps = 0
        self.fail_at_step = fail_at_step
        self.pace = threading.Semaphore(0) if paced else None
        self.seen: list[str] = []  # request id of every chunk, in order
        self.seeds: dict[str, int] = {}
        self.hook = None  # called with the SchedulerOutput inside execute

    @staticmethod
    def expected(prompt: list[int], n: int) -> list[int]:
        return [1 + (prompt[0] + k) % 26 for k in range(n)]

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if self.pace is not None and not self.pace.acquire(timeout=WAIT_S):
            raise TimeoutError("test never released this step")
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("boom")
        if self.hook is not None:
            self.hook(out)
        result = RunnerOutput()
        for chunk in out.chunks:
            seq = chunk.seq
            assert len(seq.block_table) * self.block_size >= chunk.end
            self.seen.append(seq.request_id)
            self.seeds[seq.request_id] = seq.seed
            if chunk.sample:
                token = self.expected(seq.request.prompt_token_ids, seq.num_output_tokens + 1)[-1]
                result.token_ids[seq.request_id] = token
                if seq.request.sampling.logprobs is not None:
                    result.logprobs[seq.request_id] = TokenLogprob(token, -0.5)
        return result


def _config(**sched) -> TorchEngineConfig:
    return TorchEngineConfig(model="demo", scheduler=SchedulerConfig(block_size=4, **sched))


async def _engine(prefix_caching: bool = False, **runner_kw) -> tuple[TorchEngine, FakeRunner]:
    holder: list[FakeRunner] = []

    def factory(config: TorchEngineConfig) -> FakeRunner:
        holder.append(FakeRunner(config, **runner_kw))
        return holder[0]

    config = _config(max_model_len=48, enable_prefix_caching=prefix_caching)
    engine = TorchEngine(config, runner_factory=factory)
    await engine.start()
    return engine, holder[0]


@pytest.fixture
async def started():
    engines: list[tuple[TorchEngine, FakeRunner]] = []

    async def make(**kw) -> tuple[TorchEngine, FakeRunner]:
        engines.append(await _engine(**kw))
        return engines[-1]

    yield make
    for engine, runner in engines:
        if runner.pace is not None:
            runner.pace.release(10_000)
        await asyncio.wait_for(engine.shutdown(), WAIT_S)


def _req(rid: str, prompt=(3, 4, 5), max_tokens: int = 5, **kw) -> Request:
    sampling = kw.pop("sampling", SamplingParams())
    stopping = StoppingCriteria(max_tokens=max_tokens, **kw.pop("stopping", {}))
    return Request(rid, list(prompt), sampling, stopping, arrival_time=time.monotonic(), **kw)


async def _collect(stream) -> list[RequestOutput]:
    async def go() -> list[RequestOutput]:
        return [out async for out in stream]
    return await asyncio.wait_for(go(), WAIT_S)


async def _next(stream) -> RequestOutput:
    return await asyncio.wait_for(stream.__anext__(), WAIT_S)


async def test_outputs_stream_with_usage_seed_and_metrics(started) -> None:
    engine, runner = await started()
    assert isinstance(engine, AsyncEngine)
    await engine.check_health()
    assert engine.info().context_length == 48 and engine.info().name == "fake"
    outs = await _collect(engine.add_request(_req("a", max_tokens=6, sampling=SamplingParams(logprobs=1))))
    ids = [t for o in outs for t in o.token_ids]
    assert ids == FakeRunner.expected([3, 4, 5], 6)
    assert "".join(o.text for o in outs) == engine.detokenize(ids) == "defghi"
    final = outs[-1]
    assert final.finished and final.finish_reason is FinishReason.LENGTH
    assert all(not o.finished for o in outs[:-1])
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == 6
    assert outs[0].seed is not None and final.seed == outs[0].seed == runner.seeds["a"]
    assert 0 <= final.seed < 2**63
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert sum(len(o.logprobs) for o in outs) == 6
    assert engine.stats().idle and engine.stats().kv_blocks_total == 32


async def test_explicit_seed_stop_string_and_eos(started) -> None:
    engine, runner = await started()
    # prompt[0] = 25: tokens are y z a b ... ; stop at "ab"
    outs = await _collect(engine.add_request(
        _req("s", prompt=(25,), max_tokens=10, sampling=SamplingParams(seed=7), stopping={"stop": ("ab",)})))
    assert "".join(o.text for o in outs) == "z"
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == "ab"
    assert outs[-1].seed == 7 == runner.seeds["s"]
    # prompt[0] = 26 -> first token 1 + (26 % 26) = "a"; use a stop token id
    outs = await _collect(engine.add_request(_req("t", prompt=(26,), max_tokens=10,
                                                  stopping={"stop_token_ids": (3,)})))
    assert [t for o in outs for t in o.token_ids] == [1, 2, 3]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == 3


async def test_many_concurrent_requests_complete(started) -> None:
    engine, _ = await started(num_blocks=12)  # forces preemption
    reqs = [_req(f"r{i}", prompt=(i % 26 + 1, 2, 3, 4, 5, 6), max_tokens=10) for i in range(12)]
    results = await asyncio.gather(*(_collect(engine.add_request(r)) for r in reqs))
    for req, outs in zip(reqs, results):
        assert [t for o in outs for t in o.token_ids] == FakeRunner.expected(req.prompt_token_ids, 10)
        assert outs[-1].finish_reason is FinishReason.LENGTH
    assert engine.stats().idle and engine.stats().num_preemptions > 0


async def test_abort_frees_blocks_and_ends_with_cancelled(started) -> None:
    engine, runner = await started(paced=True)
    stream = engine.add_request(_req("a", max_tokens=40))
    runner.pace.release(2)
    first = await _next(stream)
    assert first.token_ids and not first.finished
    assert engine.stats().kv_blocks_used > 0
    await engine.abort("a")
    await engine.abort("a")  # idempotent
    runner.pace.release(10)
    rest = await _collect(stream)
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.CANCELLED
    assert engine.stats().idle
    await engine.abort("a")
    await engine.abort("unknown")


async def test_closing_the_iterator_aborts(started) -> None:
    engine, runner = await started(paced=True)
    stream = engine.add_request(_req("gone", max_tokens=40))
    runner.pace.release(1)
    await _next(stream)
    await stream.aclose()
    runner.pace.release(100)
    # commands are applied in order: once "after" runs, "gone" has been aborted
    outs = await _collect(engine.add_request(_req("after", max_tokens=3)))
    assert outs[-1].finish_reason is FinishReason.LENGTH
    first_after = runner.seen.index("after")
    assert "gone" not in runner.seen[first_after:]
    assert engine.stats().idle
    # dropping an unread stream aborts too
    stream = engine.add_request(_req("dropped", max_tokens=40))
    del stream
    outs = await _collect(engine.add_request(_req("after2", max_tokens=2)))
    assert outs[-1].finished and engine.stats().idle
    assert "dropped" not in runner.seen[runner.seen.index("after2"):]


async def test_runner_exception_kills_the_engine(started) -> None:
    engine, runner = await started(fail_at_step=3)
    stream = engine.add_request(_req("a", max_tokens=20))
    outs = await _collect(stream)
    assert outs[-1].finished and outs[-1].finish_reason is FinishReason.ERROR
    assert "boom" in outs[-1].error
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        engine.add_request(_req("b"))


async def test_deadline_finishes_with_deadline(started) -> None:
    engine, runner = await started()
    outs = await _collect(engine.add_request(_req("late", deadline=time.monotonic() - 1)))
    assert outs[-1].finish_reason is FinishReason.DEADLINE and outs[-1].usage.completion_tokens == 0

    def expire_on_third_step(out: SchedulerOutput) -> None:
        if runner.steps == 3:  # the deadline it was admitted with passes now
            for chunk in out.chunks:
                chunk.seq.request.deadline = time.monotonic() - 1

    runner.hook = expire_on_third_step
    outs = await _collect(engine.add_request(_req("mid", max_tokens=30, deadline=time.monotonic() + 600)))
    assert outs[-1].finish_reason is FinishReason.DEADLINE
    assert outs[-1].usage.completion_tokens == 3
    assert engine.stats().idle


async def test_validation(started) -> None:
    engine, _ = await started()
    cases = [
        (_req("v", prompt=(3, 99)), "prompt"),
        (_req("v", prompt=tuple([1] * 48)), "prompt"),
        (_req("v", max_tokens=46), "stopping.max_tokens"),
        (_req("v", sampling=SamplingParams(logprobs=6)), "logprobs"),
        (_req("v", stopping={"stop": ("a", "b", "c")}), "stopping.stop"),
        (_req("v", stopping={"stop_token_ids": (27,)}), "stopping.stop_token_ids"),
    ]
    for req, field in cases:
        with pytest.raises(InvalidRequest) as err:
            engine.add_request(req)
        assert err.value.field == field
    stream = engine.add_request(_req("dup", max_tokens=2))
    with pytest.raises(InvalidRequest):
        engine.add_request(_req("dup"))
    await _collect(stream)
    await _collect(engine.add_request(_req("dup", max_tokens=2)))  # free again once finished
    assert engine.tokenize("abc", add_special_tokens=False) == [1, 2, 3]


async def test_shutdown_cancels_pending(started) -> None:
    engine, runner = await started(paced=True)
    stream = engine.add_request(_req("a", max_tokens=40))
    runner.pace.release(1)
    await _next(stream)
    # the engine thread now waits inside step 2; shutdown() raises its stop flag in the
    # task's first step, and the permit for step 2 is released only after that (FIFO callbacks)
    shutting = asyncio.ensure_future(engine.shutdown())
    asyncio.get_running_loop().call_soon(runner.pace.release, 1)
    outs = await _collect(stream)
    assert outs[-1].finish_reason is FinishReason.CANCELLED
    await asyncio.wait_for(shutting, WAIT_S)
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        engine.add_request(_req("b"))


async def test_prefix_caching_reports_cached_tokens(started) -> None:
    engine, _ = await started(prefix_caching=True)
    prompt = tuple(range(1, 11))
    first = await _collect(engine.add_request(_req("a", prompt=prompt, max_tokens=3)))
    second = await _collect(engine.add_request(_req("b", prompt=prompt, max_tokens=3)))
    assert first[-1].usage.cached_tokens == 0 and second[-1].usage.cached_tokens == 8
    assert [t for o in first for t in o.token_ids] == [t for o in second for t in o.token_ids]
    assert engine.stats().idle


async def test_slot_merges_deltas_for_a_slow_consumer() -> None:
    slot = OutputSlot(asyncio.get_running_loop())

    def produce() -> None:
        for i in range(1000):
            slot.put(RequestOutput("r", token_ids=[i], text="x", logprobs=[TokenLogprob(i, -1.0)],
                                   seed=5 if i == 0 else None))
        slot.put(RequestOutput("r", finished=True, finish_reason=FinishReason.LENGTH, seed=5))

    await asyncio.to_thread(produce)
    out = await asyncio.wait_for(slot.get(), WAIT_S)
    assert out.finished and out.token_ids == list(range(1000)) and out.text == "x" * 1000
    assert len(out.logprobs) == 1000 and out.seed == 5
    slot.put(RequestOutput("r", token_ids=[1]))  # after the final output: ignored
    assert slot._take() is None
