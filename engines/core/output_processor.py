"""The front end's side of the step boundary: token-id updates -> text deltas in output slots.

It owns, per request: the incremental detokenizer and stop-string matching (one owner: the
engine core only sees stop token ids and lengths), the seed report, usage and metrics, and the
output slot the caller reads. When a stop string matches before the core finished the request,
`process` returns its id, and the caller sends the core an abort.

Work per update is proportional to the tokens it carries, never to the output so far.
"""

from __future__ import annotations

import dataclasses
import time

from tokenizers import Tokenizer

from tokenrelay_engines.base import FinishReason, Request, RequestMetrics, RequestOutput, TokenLogprob, Usage
from tokenrelay_engines.core.messages import RequestUpdate
from tokenrelay_engines.detokenizer import IncrementalDetokenizer
from tokenrelay_engines.torch.streams import OutputSlot, Throughput, put_all

_NO_TEXT_FOR_LAST = (FinishReason.EOS, FinishReason.STOP)  # ended by a token: it is not text


@dataclasses.dataclass(slots=True, eq=False)
class _RequestState:
    request_id: str  # the caller's id (RequestOutput.request_id)
    slot: OutputSlot
    detokenizer: IncrementalDetokenizer
    seed: int
    num_prompt_tokens: int
    min_tokens: int
    want_logprobs: bool
    arrival_time: float
    num_output_tokens: int = 0
    sent_first: bool = False
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
        detok = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids, stopping.stop,
                                       stopping.include_stop_in_output)
        self._states[core_id] = _RequestState(
            request.request_id, slot, detok, request.sampling.seed, len(request.prompt_token_ids),
            stopping.min_tokens, request.sampling.logprobs is not None,
            request.arrival_time or time.monotonic())

    def remove(self, core_id: str) -> None:
        """The caller stopped reading: forget the request (its core abort is the caller's)."""
        self._states.pop(core_id, None)

    def process(self, updates: list[RequestUpdate], num_new_tokens: int = 0
                ) -> tuple[list[tuple[OutputSlot, RequestOutput]], list[str]]:
        """One delta per update, and the core ids a stop string finished (to abort in the core).

        The caller aborts those in the core first, then `deliver`s the deltas, so that whoever
        reads a final output sees the request's KV blocks freed already.
        """
        aborts: list[str] = []
        deliveries: list[tuple[OutputSlot, RequestOutput]] = []
        now = time.monotonic()
        if num_new_tokens:
            self.throughput.record(now, num_new_tokens)
        for update in updates:
            state = self._states.get(update.request_id)
            if state is None:
                continue  # finished here already (stop string) or closed by its caller
            out = self._delta(state, update, now)
            deliveries.append((state.slot, out))
            if out.finished:
                del self._states[update.request_id]
                if update.finish_reason is None:
                    aborts.append(update.request_id)
        return deliveries, aborts

    @staticmethod
    def deliver(deliveries: list[tuple[OutputSlot, RequestOutput]]) -> None:
        put_all(deliveries)  # one wake-up of the event loop per step

    def _delta(self, state: _RequestState, update: RequestUpdate, now: float) -> RequestOutput:
        ids = update.token_ids
        reason, stop_reason = update.finish_reason, update.stop_token_id
        detok = state.detokenizer
        accepted = len(ids)
        last_is_text = reason not in _NO_TEXT_FOR_LAST
        for i, token in enumerate(ids):
            if i == accepted - 1 and not last_is_text:
                break
            matched = detok.append(token, state.num_output_tokens + i + 1 > state.min_tokens)
            if matched is not None:
                accepted, reason, stop_reason = i + 1, FinishReason.STOP, matched
                break
        if accepted < len(ids):
            ids = ids[:accepted]
        state.num_output_tokens += accepted
        if update.first_scheduled_time is not None:
            state.first_scheduled_time = update.first_scheduled_time
            state.num_cached_tokens = update.num_cached_tokens
        if update.first_token_time is not None:
            state.first_token_time = update.first_token_time
        elif accepted and state.first_token_time is None:
            state.first_token_time = now
        finished = reason is not None
        if finished and reason not in (FinishReason.CANCELLED, FinishReason.ERROR):
            detok.finish()
        out = RequestOutput(state.request_id, token_ids=ids, text=detok.take_text())
        if state.want_logprobs and update.logprobs is not None:
            out.logprobs = [TokenLogprob(t, lp, tuple((a, b) for a, b in top))
                            for t, lp, top in update.logprobs[:accepted]]
        elif state.want_logprobs:
            out.logprobs = []
        if not state.sent_first or finished:
            out.seed = state.seed
            state.sent_first = True
        if finished:
            out.finished = True
            out.finish_reason = reason
            out.stop_reason = stop_reason
            out.usage = Usage(state.num_prompt_tokens, state.num_output_tokens, state.num_cached_tokens)
            out.metrics = RequestMetrics(state.arrival_time, state.first_scheduled_time, state.first_token_time, now)
        return out

    def finish_all(self, reason: FinishReason, error: str | None = None) -> None:
        """Shutdown (CANCELLED) or engine death (ERROR): every open request gets its final output."""
        now = time.monotonic()
        for state in self._states.values():
            state.slot.put(RequestOutput(
                state.request_id, finished=True, finish_reason=reason, seed=state.seed, error=error,
                usage=Usage(state.num_prompt_tokens, state.num_output_tokens),
                metrics=RequestMetrics(state.arrival_time, state.first_scheduled_time, state.first_token_time, now)))
        self._states.clear()
