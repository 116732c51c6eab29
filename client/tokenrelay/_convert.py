"""tokenrelay.v1 response messages -> the client's result types (tokenrelay.types).

The one place where responses stop being protobuf; requests are built in _params.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from tokenrelay.types import (
    FinishReason,
    GenerationResult,
    Job,
    JobError,
    JobEvent,
    JobPage,
    JobPriority,
    JobState,
    ModelInfo,
    ServerLoad,
    StateTransition,
    StreamDelta,
    StreamFinished,
    StreamStarted,
    SubmitResult,
    Timing,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tokenrelay.v1 import generation_pb2, jobs_pb2, text_generation_pb2

_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _enum(kind: type[FinishReason] | type[JobState] | type[JobPriority], value: int) -> int:
    try:
        return kind(value)
    except ValueError:  # a value added to the proto after this client was built
        return kind(0)


def finish_reason(value: int) -> FinishReason:
    return FinishReason(_enum(FinishReason, value))


def job_state(value: int) -> JobState:
    return JobState(_enum(JobState, value))


def _seconds(message: Message, name: str) -> float | None:
    if not message.HasField(name):
        return None
    duration: duration_pb2.Duration = getattr(message, name)
    return duration.seconds + duration.nanos / 1e9


def _time(message: Message, name: str) -> datetime | None:
    if not message.HasField(name):
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, name)
    return datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, tz=timezone.utc)


def usage(message: generation_pb2.Usage) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens, message.cached_tokens)


def timing(message: generation_pb2.Timing) -> Timing:
    return Timing(_seconds(message, "queued"), _seconds(message, "time_to_first_token"),
                  _seconds(message, "total"))


def logprobs(items: Iterable[generation_pb2.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(lp.token_id, lp.logprob,
                              tuple(TopLogprob(t.token_id, t.logprob) for t in lp.top))
                 for lp in items)


def matched_stop(message: generation_pb2.MatchedStop) -> str | int | None:
    kind = message.WhichOneof("stop")
    if kind == "stop_string":
        return message.stop_string
    if kind == "stop_token_id":
        return message.stop_token_id
    return None


def generation_result(message: generation_pb2.GenerationResult) -> GenerationResult:
    return GenerationResult(
        text=message.text, token_ids=tuple(message.token_ids),
        finish_reason=finish_reason(message.finish_reason), usage=usage(message.usage),
        timing=timing(message.timing), request_id=message.request_id,
        matched_stop=matched_stop(message.matched_stop), logprobs=logprobs(message.logprobs),
        seed=message.seed, proto=message)


def stream_started(message: text_generation_pb2.StreamStarted) -> StreamStarted:
    return StreamStarted(message.request_id, message.prompt_tokens, message.seed, proto=message)


def stream_delta(message: text_generation_pb2.StreamDelta) -> StreamDelta:
    return StreamDelta(message.text, tuple(message.token_ids), logprobs(message.logprobs),
                       proto=message)


def stream_finished(message: text_generation_pb2.StreamFinished) -> StreamFinished:
    return StreamFinished(finish_reason(message.finish_reason), usage(message.usage),
                          timing(message.timing), matched_stop(message.matched_stop), proto=message)


def job(message: jobs_pb2.Job) -> Job:
    error = None
    if message.HasField("last_error") and (message.last_error.code or message.last_error.message):
        error = JobError(_CODE_NAMES.get(message.last_error.code, str(message.last_error.code)),
                         message.last_error.message)
    return Job(
        job_id=message.job_id, state=job_state(message.state),
        priority=JobPriority(_enum(JobPriority, message.priority)),
        completion_tokens=message.completion_tokens, max_tokens=message.max_tokens,
        result=generation_result(message.result) if message.HasField("result") else None,
        last_error=error, attempts=message.attempts, max_attempts=message.max_attempts,
        idempotency_key=message.idempotency_key, seed=message.seed, labels=dict(message.labels),
        create_time=_time(message, "create_time"), update_time=_time(message, "update_time"),
        expire_time=_time(message, "expire_time"),
        history=tuple(StateTransition(job_state(h.state), _time(h, "time")) for h in message.history),
        proto=message)


def submit_result(message: jobs_pb2.SubmitJobResponse) -> SubmitResult:
    return SubmitResult(job(message.job), message.created, proto=message)


def job_page(message: jobs_pb2.ListJobsResponse) -> JobPage:
    return JobPage(tuple(job(j) for j in message.jobs), message.next_page_token, proto=message)


def job_event(message: jobs_pb2.WatchJobResponse) -> JobEvent:
    kind = message.WhichOneof("event")
    if kind == "state_change":
        change = message.state_change
        return JobEvent("state_change", state=job_state(change.state), time=_time(change, "time"),
                        proto=message)
    if kind == "delta":
        delta = message.delta
        return JobEvent("delta", token_offset=delta.token_offset, token_ids=tuple(delta.token_ids),
                        text=delta.text, proto=message)
    ended = job(message.ended)
    return JobEvent("ended", state=ended.state, job=ended, proto=message)


def model_info(message: text_generation_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(message.model_name, message.context_length, message.vocab_size,
                     tuple(message.eos_token_ids), message.max_logprobs, message.max_stop_strings,
                     message.engine, proto=message)


def server_load(message: text_generation_pb2.GetServerLoadResponse) -> ServerLoad:
    return ServerLoad(message.running, message.waiting, message.kv_blocks_used,
                      message.kv_blocks_total, message.tokens_per_second, message.queue_depth,
                      message.queue_capacity, message.draining, proto=message)
