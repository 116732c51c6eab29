"""The front end's side of the step boundary: a step's token columns -> outputs in output slots.

It owns, per request: the incremental detokenizer and stop-string matching (one owner: the
engine core only sees stop token ids and lengths), the seed report, usage and metrics, and the
output slot the caller reads. When a stop string matches before the core finished the request,
`process` returns its id, and the caller sends the core an abort.

Work per step is one pass over the step's columns; per request it is proportional to the
tokens it got, never to the output so far. A request that wants only its final output
(`OutputKind.FINAL_ONLY`, a unary call) and has no stop strings costs one list append per
token: no detokenizer, no output object, no wake-up until it finishes; its text is decoded
once, at the end.
"""

from __future__ import annotations

import dataclasses
import time

from tokenizers import Tokenizer

from tokenrelay_engines.base import (
    FinishReason, OutputKind, Request, RequestMetrics, RequestOutput, TokenLogprob, Usage,
)
from tokenrelay_engines.core.messages import FinishedRequest, StepOutputs
from tokenrelay_engines.detokenizer import IncrementalDetokenizer, decode_output
from tokenrelay_engines.torch.streams import OutputSlot, Throughput, put_all

_NO_TEXT_FOR_LAST = (FinishReason.EOS, FinishReason.STOP)  # ended by a token: it is not text
_NO_TEXT_AT_ALL = (FinishReason.CANCELLED, FinishReason.ERROR)  # nothing pending is released


@dataclasses.dataclass(slots=True, eq=False)
class _RequestState:
    request_id: str  # the caller's id (RequestOutput.request_id)
    slot: OutputSlot
    detokenizer: IncrementalDetokenizer | None  # None: final only, decoded at the end
    prompt_token_ids: list[int]
    seed: int
    min_tokens: int
    want_logprobs: bool
    arrival_time: float
    output_ids: list[int] | None = None  # final only: every token so far
    logprobs: list[TokenLogprob] | None = None  # final only, when asked: every logprob so far
    num_output_tokens: int = 0
    sent_first: bool = False
    plain: bool = False  # a stream past its first output that wants no logprobs: the fast path
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


def core_request(request: Request, core_id: str) -> Request:
    """The request as the engine core sees it: its own id, no stop strings (the front end's)."""
    stopping = request.stopping
    if stopping.stop:
        stopping = dataclasses.replace(stopping, stop=())
    return dataclasses.replace(request, request_id=core_id, stopping=stopping)


class OutputProcessor:
    """Single-threaded: every method is called from one thread (the engine thread in-process,
    the event loop in front of an engine-core process)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}  # by core id
        self.throughput = Throughput()

    def __len__(self) -> int:
        return len(self._states)

    def add(self, core_id: str, request: Request, slot: OutputSlot) -> None:
        assert request.sampling.seed is not None
        stopping = request.stopping
        want_logprobs = request.sampling.logprobs is not None
        final_only = request.output_kind is OutputKind.FINAL_ONLY and not stopping.stop
        detok = None if final_only else IncrementalDetokenizer(
            self._tokenizer, request.prompt_token_ids, stopping.stop, stopping.include_stop_in_output)
        self._states[core_id] = _RequestState(
            request.request_id, slot, detok, request.prompt_token_ids, request.sampling.seed,
            stopping.min_tokens, want_logprobs, request.arrival_time or time.monotonic(),
            output_ids=[] if final_only else None, logprobs=[] if final_only and want_logprobs else None)

    def remove(self, core_id: str) -> None:
        """The caller stopped reading: forget the request (its core abort is the caller's)."""
        self._states.pop(core_id, None)

    def process(self, step: StepOutputs) -> tuple[list[tuple[OutputSlot, RequestOutput]], list[str]]:
        """The step's outputs, and the core ids a stop string finished (to abort in the core).

        The caller aborts those in the core first, then `deliver`s the outputs, so that whoever
        reads a final output sees the request's KV blocks freed already.
        """
        states = self._states
        aborts: list[str] = []
        deliveries: list[tuple[OutputSlot, RequestOutput]] = []
        now = time.monotonic()
        if step.token_ids:
            self.throughput.record(now, len(step.token_ids))
        for started in step.started:
            state = states.get(started.request_id)
            if state is not None:
                state.num_cached_tokens = started.num_cached_tokens
                state.first_scheduled_time = started.first_scheduled_time
                state.first_token_time = started.first_token_time
        finals = {f.request_id: f for f in step.finished} if step.finished else None
        logprobs = step.logprobs
        for rid, token in zip(step.request_ids, step.token_ids):
            state = states.get(rid)
            if state is None:
                continue  # finished here already (stop string) or closed by its caller
            final = finals.pop(rid, None) if finals else None
            if final is None:
                if state.output_ids is not None:  # final only: keep the token
                    state.output_ids.append(token)
                    state.num_output_tokens += 1
                    if state.logprobs is not None:
                        state.logprobs.append(self._logprob(token, logprobs.get(rid)))
                    continue
                detok = state.detokenizer
                if state.plain and detok is not None:  # a stream's steady state: a token and its text
                    state.num_output_tokens += 1
                    if detok.append(token, state.num_output_tokens > state.min_tokens) is None:
                        deliveries.append((state.slot, RequestOutput(state.request_id, [token], detok.take_text())))
                        continue
                    state.num_output_tokens -= 1  # a stop string matched: the full path below
            out = self._output(state, [token], logprobs.get(rid) if state.want_logprobs else None, final, now)
            deliveries.append((state.slot, out))
            if out.finished:
                del states[rid]
                if final is None:
                    aborts.append(rid)
        if finals:  # finished with no token in this step
            for rid, final in finals.items():
                state = states.pop(rid, None)
                if state is not None:
                    deliveries.append((state.slot, self._output(state, [], None, final, now)))
        return deliveries, aborts

    @staticmethod
    def deliver(deliveries: list[tuple[OutputSlot, RequestOutput]]) -> None:
        put_all(deliveries)  # one wake-up of the event loop per step

    @staticmethod
    def _logprob(token: int, entry: tuple[float, list[tuple[int, float]]] | None) -> TokenLogprob:
        if entry is None:
            return TokenLogprob(token, 0.0)
        return TokenLogprob(token, entry[0], tuple((a, b) for a, b in entry[1]))

    def _output(self, state: _RequestState, ids: list[int],
                logprob: tuple[float, list[tuple[int, float]]] | None,
                final: FinishedRequest | None, now: float) -> RequestOutput:
        """This step's output of one request: its token (if any), and its end (if it ended)."""
        reason = final.finish_reason if final is not None else None
        stop_reason: str | int | None = final.stop_token_id if final is not None else None
        detok = state.detokenizer
        if detok is None:  # final only: everything at once
            text = self._final_text(state, ids, reason)
            ids = state.output_ids + ids  # type: ignore[operator]
            accepted = len(ids)
            state.num_output_tokens = accepted
        else:
            accepted = len(ids)
            if ids and reason not in _NO_TEXT_FOR_LAST:
                matched = detok.append(ids[0], state.num_output_tokens + 1 > state.min_tokens)
                if matched is not None:
                    reason, stop_reason = FinishReason.STOP, matched
            state.num_output_tokens += accepted
            if reason is not None and reason not in _NO_TEXT_AT_ALL:
                detok.finish()
            text = detok.take_text()
        if accepted and state.first_token_time is None:
            state.first_token_time = now
        out = RequestOutput(state.request_id, token_ids=ids, text=text)
        if state.want_logprobs:
            if state.logprobs is not None:  # final only
                if ids and len(state.logprobs) < accepted:
                    state.logprobs.append(self._logprob(ids[-1], logprob))
                out.logprobs = state.logprobs
            else:
                out.logprobs = [self._logprob(ids[0], logprob)] if ids else []
        if not state.sent_first or reason is not None:
            out.seed = state.seed
            state.sent_first = True
            state.plain = detok is not None and not state.want_logprobs
        if reason is not None:
            if final is not None:
                state.num_cached_tokens = final.num_cached_tokens
                state.first_scheduled_time = final.first_scheduled_time or state.first_scheduled_time
                state.first_token_time = final.first_token_time or state.first_token_time
            out.finished = True
            out.finish_reason = reason
            out.stop_reason = stop_reason
            out.usage = Usage(len(state.prompt_token_ids), state.num_output_tokens, state.num_cached_tokens)
            out.metrics = RequestMetrics(state.arrival_time, state.first_scheduled_time, state.first_token_time, now)
        return out

    def _final_text(self, state: _RequestState, ids: list[int], reason: FinishReason | None) -> str:
        tokens = state.output_ids + ids  # type: ignore[operator]
        if tokens and reason in _NO_TEXT_FOR_LAST:
            tokens = tokens[:-1]
        return decode_output(self._tokenizer, state.prompt_token_ids, tokens) if tokens else ""

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        """Shutdown (CANCELLED) or engine death (ERROR): every open request gets its final output."""
        now = time.monotonic()
        for state in self._states.values():
            out = RequestOutput(
                state.request_id, finished=True, finish_reason=reason, seed=state.seed, error=error,
                usage=Usage(len(state.prompt_token_ids), state.num_output_tokens),
                metrics=RequestMetrics(state.arrival_time, state.first_scheduled_time, state.first_token_time, now))
            if state.output_ids:  # final only: the tokens it got before the end
                out.token_ids = list(state.output_ids)
                out.logprobs = state.logprobs
            state.slot.put(out)
        self._states.clear()
