"""The one place protobuf meets domain types (generation.proto, text_generation.proto).

Inbound: `request_from_params` validates every field of a GenerationParams and builds an
engine `Request`, reporting all bad fields at once (`InvalidRequests`, field paths as in the
API: "params.sampling.top_p", "params.token_ids.ids[3]"). Outbound: `ResultAccumulator`
folds RequestOutput deltas into a GenerationResult; `stream_*` build GenerateStream events.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable

from google.protobuf import duration_pb2
from tokenrelay.v1 import generation_pb2, text_generation_pb2

from tokenrelay_engines.base import (
    EngineStats, FinishReason, InvalidRequest, ModelInfo, Request, RequestMetrics, RequestOutput,
    SAMPLING_RANGES, SamplingParams, StoppingCriteria, TokenLogprob, Usage,
)
from tokenrelay_server.chat import ChatEncoder, chat_prompt
from tokenrelay_server.errors import InvalidRequests
from tokenrelay_server.limits import InputLimits

MAX_ID_VIOLATIONS = 8  # per list of token ids: enough to show the pattern, bounded
PRIORITY_RANGE = (-100, 100)
DEFAULT_MAX_TOKENS = 16

_FINISH_REASONS = {
    FinishReason.EOS: generation_pb2.FINISH_REASON_EOS,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: generation_pb2.FINISH_REASON_DEADLINE,
    FinishReason.ERROR: generation_pb2.FINISH_REASON_ERROR,
}


def _sampling(p: generation_pb2.GenerationParams, info: ModelInfo, bad: list[tuple[str, str]]) -> dict:
    s = p.sampling
    for name, ok, rule in SAMPLING_RANGES:  # the domain type's own table: every bad field at once
        if s.HasField(name) and not ok(getattr(s, name)):
            bad.append((f"params.sampling.{name}", f"{rule}, got {getattr(s, name)}"))
    if p.HasField("logprobs"):
        if not info.supports_logprobs:
            bad.append(("params.logprobs", "this model does not support logprobs"))
        elif not 0 <= p.logprobs <= info.max_logprobs:
            bad.append(("params.logprobs", f"must be in [0, {info.max_logprobs}], got {p.logprobs}"))
    kwargs = {name: getattr(s, name) for name in (
        "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty") if s.HasField(name)}
    # The server picks the seed when unset, so it can report it before the first token.
    kwargs["seed"] = s.seed if s.HasField("seed") else new_seed()
    if p.HasField("logprobs"):
        kwargs["logprobs"] = p.logprobs
    return kwargs


def new_seed() -> int:
    """A server-chosen sampling seed, in [0, 2^53)."""
    return secrets.randbits(53)


def check_token_ids(bad: list[tuple[str, str]], field: str, ids, vocab_size: int) -> None:
    """Each id must be in [0, vocab_size); at most MAX_ID_VIOLATIONS of them are named."""
    named = 0
    for i, tid in enumerate(ids):
        if not 0 <= tid < vocab_size:
            if named == MAX_ID_VIOLATIONS:
                bad.append((field, "more token ids are out of range"))
                return
            bad.append((f"{field}[{i}]", f"token id {tid} outside [0, {vocab_size})"))
            named += 1


def _prompt(p: generation_pb2.GenerationParams, info: ModelInfo, tokenize: Callable[[str], list[int]],
            limits: InputLimits, bad: list[tuple[str, str]], encode_chat: ChatEncoder | None = None) -> list[int]:
    kind = p.WhichOneof("prompt")
    if kind is None:
        bad.append(("params.prompt", "a prompt is required: set text, token_ids or messages"))
        return []
    if kind == "messages":
        return chat_prompt([(m.role, m.content) for m in p.messages.messages], bad, encode_chat,
                           limits.max_prompt_bytes)
    if kind == "text":
        if not p.text:
            bad.append(("params.prompt", "the prompt text must not be empty"))
            return []
        return tokenize(p.text) if limits.check_text(bad, "params.text", p.text) else []
    ids = p.token_ids.ids
    if not ids:
        bad.append(("params.prompt", "token_ids must not be empty"))
    if not limits.check_token_ids(bad, "params.token_ids.ids", len(ids)):
        return []
    check_token_ids(bad, "params.token_ids.ids", ids, info.vocab_size)
    return list(ids)


def _stopping(p: generation_pb2.GenerationParams, info: ModelInfo, num_prompt: int, limits: InputLimits,
              bad: list[tuple[str, str]]) -> dict:
    st = p.stopping
    room = info.context_length - num_prompt
    if num_prompt >= info.context_length:
        bad.append(("params.prompt", f"prompt has {num_prompt} tokens; the context holds "
                                     f"{info.context_length} (prompt + at least 1 output token)"))
    if st.HasField("max_tokens"):
        max_tokens = st.max_tokens
        if max_tokens < 1:
            bad.append(("params.stopping.max_tokens", f"must be >= 1, got {max_tokens}"))
        elif room >= 1 and max_tokens > room:
            bad.append(("params.stopping.max_tokens", f"prompt ({num_prompt}) + max_tokens ({max_tokens}) "
                                                      f"exceeds the context length {info.context_length}"))
    else:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
    min_tokens = st.min_tokens if st.HasField("min_tokens") else 0
    if min_tokens < 0 or (max_tokens >= 1 and min_tokens > max_tokens):
        bad.append(("params.stopping.min_tokens", f"must be in [0, max_tokens={max_tokens}], got {min_tokens}"))
    if len(st.stop) > info.max_stop_strings:
        bad.append(("params.stopping.stop", f"at most {info.max_stop_strings} stop strings, got {len(st.stop)}"))
    if limits.check_stop(bad, "params.stopping", st.stop, st.stop_token_ids):
        for i, s in enumerate(st.stop):
            if not s:
                bad.append((f"params.stopping.stop[{i}]", "stop strings must not be empty"))
        check_token_ids(bad, "params.stopping.stop_token_ids", st.stop_token_ids, info.vocab_size)
    return dict(max_tokens=max_tokens, min_tokens=min_tokens, stop=tuple(st.stop),
                stop_token_ids=tuple(st.stop_token_ids), ignore_eos=st.ignore_eos,
                include_stop_in_output=st.include_stop_in_output)


REQUEST_ID_METADATA = "x-request-id"
_ID_PREFIX = secrets.token_hex(8)  # generated ids: this process's random prefix and a call counter
_ID_COUNTER = itertools.count()


def request_id_from(params: generation_pb2.GenerationParams, metadata, limits: InputLimits) -> str:
    """The call's request id: params.request_id, else `x-request-id` metadata, else a new one.

    Validated (length, visible ASCII) before anything echoes it; raises InvalidRequests.
    """
    field, value = "params.request_id", params.request_id
    if not value:
        field = f"metadata[{REQUEST_ID_METADATA}]"
        value = next((v for k, v in metadata or () if k == REQUEST_ID_METADATA and v), "")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if not value:
            return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"
    bad: list[tuple[str, str]] = []
    if not limits.check_request_id(bad, field, value):
        raise InvalidRequests(bad)
    return value


def request_from_params(params: generation_pb2.GenerationParams, *, request_id: str, info: ModelInfo,
                        tokenize: Callable[[str], list[int]], arrival_time: float,
                        deadline: float | None, limits: InputLimits,
                        encode_chat: ChatEncoder | None = None) -> Request:
    """Validate `params` and build the engine Request; raises InvalidRequests naming every bad field.

    Byte and length limits are checked before `tokenize` is called: text over the limit is
    never tokenized. A chat-messages prompt is rendered and tokenized by `encode_chat`
    (server.chat.ChatPrompts.encode); without one it is refused with FAILED_PRECONDITION.
    """
    bad: list[tuple[str, str]] = []
    if params.request_id:
        limits.check_request_id(bad, "params.request_id", params.request_id)
    if not PRIORITY_RANGE[0] <= params.priority <= PRIORITY_RANGE[1]:
        bad.append(("params.priority", f"must be in [{PRIORITY_RANGE[0]}, {PRIORITY_RANGE[1]}], got {params.priority}"))
    sampling = _sampling(params, info, bad)
    prompt_ids = _prompt(params, info, tokenize, limits, bad, encode_chat)
    stopping = _stopping(params, info, len(prompt_ids), limits, bad)
    if bad:
        raise InvalidRequests(bad)
    try:
        return Request(request_id=request_id, prompt_token_ids=prompt_ids,
                       sampling=SamplingParams(**sampling), stopping=StoppingCriteria(**stopping),
                       priority=params.priority, arrival_time=arrival_time, deadline=deadline)
    except InvalidRequest as exc:  # a rule the checks above missed: still name the field
        raise InvalidRequests([(with_params_prefix(exc.field), exc.description)]) from exc


def with_params_prefix(field: str) -> str:
    """An engine-side field name ("stopping.max_tokens") as the API path ("params.stopping.max_tokens")."""
    if field.startswith("params"):
        return field
    if field == "prompt_token_ids" or field.startswith("prompt_token_ids["):
        return "params.token_ids.ids" + field[len("prompt_token_ids"):]
    return f"params.{field}"


# -- outbound -------------------------------------------------------------------------------

def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return _FINISH_REASONS.get(reason, generation_pb2.FINISH_REASON_UNSPECIFIED) if reason else 0


def _set_duration(d: duration_pb2.Duration, seconds: float) -> None:
    d.FromNanoseconds(max(0, round(seconds * 1e9)))


def timing_from_metrics(m: RequestMetrics | None) -> generation_pb2.Timing:
    t = generation_pb2.Timing()
    if m is None:
        return t
    if m.first_scheduled_time is not None:
        _set_duration(t.queued, m.first_scheduled_time - m.arrival_time)
    if m.first_token_time is not None:
        _set_duration(t.time_to_first_token, m.first_token_time - m.arrival_time)
    _set_duration(t.total, m.finished_time - m.arrival_time)
    return t


def usage_to_proto(u: Usage | None) -> generation_pb2.Usage:
    if u is None:
        return generation_pb2.Usage()
    return generation_pb2.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                                cached_tokens=u.cached_tokens)


def matched_stop_to_proto(stop_reason: str | int | None) -> generation_pb2.MatchedStop | None:
    if isinstance(stop_reason, str):
        return generation_pb2.MatchedStop(stop_string=stop_reason)
    if isinstance(stop_reason, int):
        return generation_pb2.MatchedStop(stop_token_id=stop_reason)
    return None


def logprobs_to_proto(lps: list[TokenLogprob] | None) -> list[generation_pb2.TokenLogprob]:
    return [generation_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top=[generation_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps or ()]


class ResultAccumulator:
    """Folds an engine's RequestOutput deltas into one GenerationResult."""

    def __init__(self, request_id: str, *, seed: int | None = None, want_logprobs: bool = False) -> None:
        self.request_id = request_id
        self.seed = seed
        self.want_logprobs = want_logprobs
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.final: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.text_parts.append(out.text)
        self.token_ids.extend(out.token_ids)
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
        if out.seed is not None:
            self.seed = out.seed
        if out.finished:
            self.final = out

    @property
    def finished(self) -> bool:
        return self.final is not None

    def result(self) -> generation_pb2.GenerationResult:
        r = generation_pb2.GenerationResult(request_id=self.request_id, text="".join(self.text_parts),
                                            token_ids=self.token_ids, seed=self.seed or 0)
        if self.want_logprobs:
            r.logprobs.extend(logprobs_to_proto(self.logprobs))
        f = self.final
        if f is not None:
            r.finish_reason = finish_reason_to_proto(f.finish_reason)
            stop = matched_stop_to_proto(f.stop_reason)
            if stop is not None:
                r.matched_stop.CopyFrom(stop)
            r.usage.CopyFrom(usage_to_proto(f.usage))
            r.timing.CopyFrom(timing_from_metrics(f.metrics))
        return r


def stream_started(request_id: str, request: Request) -> text_generation_pb2.GenerateStreamResponse:
    return text_generation_pb2.GenerateStreamResponse(started=text_generation_pb2.StreamStarted(
        request_id=request_id, prompt_tokens=len(request.prompt_token_ids),
        seed=request.sampling.seed or 0))


def stream_delta(out: RequestOutput) -> text_generation_pb2.GenerateStreamResponse | None:
    """The delta event for `out`, or None when it carries nothing new."""
    if not out.token_ids and not out.text and not out.logprobs:
        return None
    return text_generation_pb2.GenerateStreamResponse(delta=text_generation_pb2.StreamDelta(
        text=out.text, token_ids=out.token_ids, logprobs=logprobs_to_proto(out.logprobs)))


def stream_finished(out: RequestOutput) -> text_generation_pb2.GenerateStreamResponse:
    fin = text_generation_pb2.StreamFinished(finish_reason=finish_reason_to_proto(out.finish_reason),
                                             usage=usage_to_proto(out.usage), timing=timing_from_metrics(out.metrics))
    stop = matched_stop_to_proto(out.stop_reason)
    if stop is not None:
        fin.matched_stop.CopyFrom(stop)
    return text_generation_pb2.GenerateStreamResponse(finished=fin)


def model_info_to_proto(info: ModelInfo) -> text_generation_pb2.GetModelInfoResponse:
    return text_generation_pb2.GetModelInfoResponse(
        model_name=info.name, context_length=info.context_length, vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids), max_logprobs=info.max_logprobs,
        max_stop_strings=info.max_stop_strings, engine=info.engine)


def server_load_to_proto(stats: EngineStats, *, queue_depth: int, queue_capacity: int,
                         draining: bool) -> text_generation_pb2.GetServerLoadResponse:
    return text_generation_pb2.GetServerLoadResponse(
        running=stats.running, waiting=stats.waiting, kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total, tokens_per_second=stats.tokens_per_second,
        queue_depth=queue_depth, queue_capacity=queue_capacity, draining=draining)
