"""The engine core's step boundary: typed column frames whose size never grows with output length.

A fake runner (deterministic letters, no tensors) drives the real EngineCore and OutputProcessor
through 2,000-token outputs; every step is encoded as the frame the core process would send.
"""

from __future__ import annotations

import asyncio
import threading

import msgspec
import pytest
from tokenizers import Tokenizer, decoders, models

from tokenrelay_engines.base import (
    EngineStats, FinishReason, InvalidRequest, ModelInfo, OutputKind, Request, SamplingParams, StoppingCriteria,
    TokenLogprob,
)
from tokenrelay_engines.config import SchedulerConfig
from tokenrelay_engines.core import engine_core as engine_core_module
from tokenrelay_engines.core.engine_core import EngineCore
from tokenrelay_engines.core.messages import (
    AddRequest, FinishedRequest, FrameEncoder, FrameReader, StepOutputs, command_decoder, core_message_decoder,
)
from tokenrelay_engines.core.output_processor import OutputProcessor, core_request
from tokenrelay_engines.core.validation import RULES, check_request
from tokenrelay_engines.scheduler.sequence import RunnerOutput, SchedulerOutput
from tokenrelay_engines.torch.streams import OutputSlot

LETTERS = "abcdefghijklmnopqrstuvwxyz"
OUTPUT_LEN = 2000


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab={"<eos>": 0} | {ch: i + 1 for i, ch in enumerate(LETTERS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    return tok


class LetterRunner:
    def __init__(self) -> None:
        self.tokenizer = _tokenizer()
        self.model_info = ModelInfo("letters", context_length=4096, vocab_size=27, eos_token_ids=(0,),
                                    engine="torch")
        self.block_size = 16
        self.num_blocks = 2048

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        for chunk in out.chunks:
            if chunk.sample:
                seq = chunk.seq
                token = 1 + (seq.num_output_tokens % 26)
                result.token_ids[seq.request_id] = token
                if seq.request.sampling.logprobs is not None:
                    result.logprobs[seq.request_id] = TokenLogprob(token, -0.25, ((token, -0.25), (1, -2.0)))
        return result


class CountingList(list):
    """A list that counts the items every slice of it copies (while `counting` is set)."""

    counting = False
    copied = 0

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice) and CountingList.counting:
            CountingList.copied += len(got)
        return got


def _request(i: int, logprobs: int | None = 2) -> Request:
    return Request(f"r{i}", [1 + i, 2, 3], SamplingParams(temperature=0.0, seed=i, logprobs=logprobs),
                   StoppingCriteria(max_tokens=OUTPUT_LEN, ignore_eos=True, stop=("zz",)))


@pytest.fixture
def counted_publish(monkeypatch: pytest.MonkeyPatch):
    """Count the items copied out of sequences' token and logprob lists while a step's outputs are built."""
    original = EngineCore._outputs

    def counted(self, runner_out, ended):
        for seq in self._held.values():
            if not isinstance(seq.token_ids, CountingList):
                seq.token_ids = CountingList(seq.token_ids)
                seq.output_logprobs = CountingList(seq.output_logprobs)
        CountingList.counting = True
        try:
            return original(self, runner_out, ended)
        finally:
            CountingList.counting = False
    monkeypatch.setattr(engine_core_module.EngineCore, "_outputs", counted)


async def test_per_step_publish_is_constant_for_2000_token_outputs(counted_publish) -> None:
    core = EngineCore(LetterRunner(), SchedulerConfig(max_num_seqs=8, block_size=16))
    processor = OutputProcessor(core.runner.tokenizer)
    slots = []
    for i in range(8):
        slot = OutputSlot(asyncio.get_running_loop())
        slots.append(slot)
        processor.add(str(i), _request(i), slot)
        core.add(core_request(_request(i), str(i)))
    encoder, decoder = FrameEncoder(), core_message_decoder()
    frame_bytes, column_bytes, copied, delivered_tokens = [], [], [], []
    while core.has_unfinished:
        CountingList.copied = 0
        step = core.step()
        copied.append(CountingList.copied)
        step.stats = core.stats()
        frame = encoder.encode(step)
        frame_bytes.append(len(frame))
        column_bytes.append(len(msgspec.msgpack.encode((step.request_ids, step.token_ids, step.logprobs))))
        step = decoder.decode(bytes(frame[4:]))
        deliveries, aborts = processor.process(step)
        assert not aborts
        delivered_tokens.append(sum(len(out.token_ids) for _, out in deliveries))
        processor.deliver(deliveries)
    assert len(frame_bytes) == OUTPUT_LEN  # one step per token: prefill samples the first
    decode = slice(2, OUTPUT_LEN - 1)  # steady decode steps (the first and last carry timings/finish)
    # Nothing is copied out of the sequences' token or logprob lists: the runner's answer is the delta.
    assert set(copied) == {0}
    assert set(delivered_tokens[decode]) == {8}
    # Bytes of the step's columns: the same at step 10 as at step 1,990 (token ids are all one byte
    # here); the whole frame differs only by the width of the stats' counters.
    assert max(column_bytes[decode]) == min(column_bytes[decode]) == column_bytes[10] == column_bytes[-10]
    assert frame_bytes[OUTPUT_LEN - 10] - frame_bytes[10] <= 4, (frame_bytes[10], frame_bytes[OUTPUT_LEN - 10])
    finals = [slot._pending for slot in slots]
    assert all(f is not None and f.finished and f.finish_reason is FinishReason.LENGTH for f in finals)
    assert all(len(f.token_ids) == OUTPUT_LEN == f.usage.completion_tokens == len(f.logprobs) for f in finals)


def _run_to_end(core: EngineCore, processor: OutputProcessor, per_step: list[int]) -> None:
    while core.has_unfinished:
        deliveries, aborts = processor.process(core.step())
        if aborts:
            processor.process(core.abort(aborts))
        per_step.append(len(deliveries))
        processor.deliver(deliveries)


async def test_final_only_request_gets_one_output_with_the_same_text_and_tokens_as_a_stream() -> None:
    loop = asyncio.get_running_loop()
    results = {}
    for kind in OutputKind:
        core = EngineCore(LetterRunner(), SchedulerConfig(block_size=16))
        processor = OutputProcessor(core.runner.tokenizer)
        slot = OutputSlot(loop)
        request = Request("u", [1, 2], SamplingParams(temperature=0.0, seed=1, logprobs=1),
                          StoppingCriteria(max_tokens=40), output_kind=kind)
        processor.add("u", request, slot)
        core.add(core_request(request, "u"))
        per_step: list[int] = []
        _run_to_end(core, processor, per_step)
        results[kind] = (slot._pending, per_step)
    final, per_step = results[OutputKind.FINAL_ONLY]
    stream, stream_steps = results[OutputKind.DELTA]
    assert per_step.count(1) == 1 and set(per_step) == {0, 1}  # one delivery: the final one
    assert stream_steps.count(1) == 40  # a stream: one per step
    assert final.finished and final.finish_reason is FinishReason.LENGTH
    assert final.text == stream.text == (LETTERS * 2)[:40]
    assert final.token_ids == stream.token_ids and final.logprobs == stream.logprobs and len(final.logprobs) == 40
    assert final.usage == stream.usage and final.seed == stream.seed == 1


def test_commands_round_trip_as_typed_frames() -> None:
    encoder, reader, decoder = FrameEncoder(), FrameReader(), command_decoder()
    request = core_request(_request(3), "7")
    frame = bytes(encoder.encode(AddRequest(request)))
    frames = reader.feed(frame[:5]) + reader.feed(frame[5:] + frame)  # split and glued frames
    decoded = [decoder.decode(f) for f in frames]
    assert [type(d) for d in decoded] == [AddRequest, AddRequest]
    assert decoded[0].request == request and decoded[0].request.stopping.stop == ()  # stop strings stay here
    sent = StepOutputs(["7", "8"], [5, 6], {"8": (-0.5, [(6, -0.5)])},
                       finished=[FinishedRequest("7", FinishReason.EOS)], stats=EngineStats(1, 0, 2, 8))
    step = core_message_decoder().decode(bytes(encoder.encode(sent))[4:])
    assert step == sent and step.stats == EngineStats(1, 0, 2, 8)


def test_a_bad_field_in_a_frame_is_refused_by_the_domain_type() -> None:
    raw = msgspec.msgpack.encode(["add", {"request_id": "1", "prompt_token_ids": [1],
                                          "sampling": {"top_p": 5.0}}])
    with pytest.raises((msgspec.ValidationError, InvalidRequest)):
        command_decoder().decode(raw)


def test_stop_string_is_matched_by_the_front_end_which_asks_the_core_to_abort() -> None:
    core = EngineCore(LetterRunner(), SchedulerConfig(block_size=16))
    processor = OutputProcessor(core.runner.tokenizer)
    loop = asyncio.new_event_loop()
    try:
        slot = OutputSlot(loop)
        request = Request("a", [1], SamplingParams(temperature=0.0, seed=1),
                          StoppingCriteria(max_tokens=50, stop=("de",)))
        processor.add("a", request, slot)
        core.add(core_request(request, "a"))
        aborted: list[str] = []
        while core.has_unfinished and not aborted:
            deliveries, aborted = processor.process(core.step())
            processor.deliver(deliveries)
        assert aborted == ["a"] and core.has_unfinished  # the core still holds it until the abort
        assert core.abort(aborted).finished[0].finish_reason is FinishReason.CANCELLED
        assert not core.has_unfinished and core.stats().kv_blocks_used == 0
        out = slot._pending
        assert out.finished and out.finish_reason is FinishReason.STOP and out.stop_reason == "de"
        assert out.text == "abc" and out.usage.completion_tokens == 5  # a b c d e: "de" completed at e
    finally:
        loop.close()


def test_admission_rules_are_one_table() -> None:
    core = EngineCore(LetterRunner(), SchedulerConfig(block_size=16, num_blocks=4))
    fields = {name for name, _ in RULES}
    assert fields == {"prompt", "stopping.max_tokens", "logprobs", "stopping.stop", "stopping.stop_token_ids"}
    with pytest.raises(InvalidRequest) as err:
        check_request(Request("x", [99], stopping=StoppingCriteria(max_tokens=4)), core.limits)
    assert err.value.field == "prompt"
    with pytest.raises(InvalidRequest) as err:
        check_request(Request("x", [1], stopping=StoppingCriteria(max_tokens=4096)), core.limits)
    assert err.value.field == "stopping.max_tokens"
