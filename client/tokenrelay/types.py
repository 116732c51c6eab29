"""The client's result types: small frozen dataclasses and enums, no protobuf.

Enums are `IntEnum`s with the wire values of tokenrelay.v1, so they compare equal to the
generated constants, and `str()` gives the short lower-case name:

    >>> str(FinishReason.EOS), str(JobState.SUCCEEDED)
    ('eos', 'succeeded')

Durations are float seconds, times are timezone-aware `datetime`s (None when unset). Each
result keeps the message it came from in `.proto` (not shown in repr), for code that needs a
field this module does not surface or wants protobuf JSON. For code written against the former
protobuf results, an attribute a result does not have is read from `.proto` at run time
(`event.WhichOneof(...)`, `json_format.MessageToJson(result)`); type checkers do not see that
fallback, so typed code uses the fields above or `.proto` explicitly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tokenrelay.v1 import generation_pb2, jobs_pb2, text_generation_pb2

__all__ = [
    "FinishReason", "JobState", "JobPriority", "Usage", "Timing", "TopLogprob", "TokenLogprob",
    "GenerationResult", "StreamStarted", "StreamDelta", "StreamFinished", "JobError",
    "StateTransition", "Job", "SubmitResult", "JobPage", "JobEvent", "ModelInfo", "ServerLoad",
]


class _ProtoFallback:
    """Run-time fallback of attribute reads to `self.proto` (hidden from type checkers)."""

    __slots__ = ()

    if not TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any:
            if name.startswith("_") or name == "proto":
                raise AttributeError(name)
            proto = self.proto
            if proto is None:
                raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
            return getattr(proto, name)


class _ShortNameEnum(enum.IntEnum):
    """An IntEnum whose str() is its lower-case name ("eos"); repr stays FinishReason.EOS."""

    def __str__(self) -> str:
        return self.name.lower()

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    @classmethod
    def parse(cls, value: str | int) -> Any:
        """A member from its value or name ("succeeded", "SUCCEEDED", "JOB_STATE_SUCCEEDED")."""
        if isinstance(value, str):
            name = value.strip().upper()
            for prefix in ("FINISH_REASON_", "JOB_STATE_", "JOB_PRIORITY_"):
                name = name.removeprefix(prefix)
            try:
                return cls[name]
            except KeyError:
                choices = ", ".join(str(m) for m in cls)
                raise ValueError(f"unknown {cls.__name__} {value!r}; expected one of {choices}") from None
        return cls(int(value))


class FinishReason(_ShortNameEnum):
    """Why a generation ended (tokenrelay.v1.FinishReason)."""

    UNSPECIFIED = 0
    EOS = 1  # the model produced an end-of-sequence token
    LENGTH = 2  # max_tokens reached, or the context is full
    STOP = 3  # a stop string or stop token id matched (see matched_stop)
    CANCELLED = 4
    DEADLINE = 5
    ERROR = 6


class JobState(_ShortNameEnum):
    """A durable job's state (tokenrelay.v1.JobState)."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    EXPIRED = 6  # not started before its queue TTL passed
    DEAD_LETTER = 7  # failed max_attempts times

    @property
    def ended(self) -> bool:
        return self in _ENDED


_ENDED = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED,
                    JobState.DEAD_LETTER})


class JobPriority(_ShortNameEnum):
    """A job's tier (tokenrelay.v1.JobPriority); UNSPECIFIED is treated as STANDARD."""

    UNSPECIFIED = 0
    URGENT = 1
    STANDARD = 2
    BULK = 3


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __str__(self) -> str:
        return (f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"
                + (f" ({self.cached_tokens} cached)" if self.cached_tokens else ""))


@dataclass(slots=True, frozen=True)
class Timing:
    """Server-side times in seconds, from the request's arrival; None when not reported."""

    queued: float | None = None  # until first scheduled
    time_to_first_token: float | None = None
    total: float | None = None  # until the final token

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f} ms"
        return (f"queued {ms(self.queued)}, first token {ms(self.time_to_first_token)}, "
                f"total {ms(self.total)}")


@dataclass(slots=True, frozen=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()  # most likely alternatives, most likely first


@dataclass(slots=True, frozen=True)
class GenerationResult(_ProtoFallback):
    """One whole generation (Generate, a folded stream, or a job's result)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage
    timing: Timing = field(default_factory=Timing)
    request_id: str = ""
    matched_stop: str | int | None = None  # the stop string or stop token id, when reason is STOP
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token when logprobs were asked for
    seed: int = 0  # the seed the sampler used
    proto: generation_pb2.GenerationResult | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class StreamStarted(_ProtoFallback):
    request_id: str
    prompt_tokens: int
    seed: int
    proto: text_generation_pb2.StreamStarted | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class StreamDelta(_ProtoFallback):
    """New output since the previous delta; deltas concatenate to the whole result."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    proto: text_generation_pb2.StreamDelta | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class StreamFinished(_ProtoFallback):
    finish_reason: FinishReason
    usage: Usage
    timing: Timing = field(default_factory=Timing)
    matched_stop: str | int | None = None
    proto: text_generation_pb2.StreamFinished | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class JobError:
    code: str  # the gRPC status code name, e.g. "INTERNAL"
    message: str


@dataclass(slots=True, frozen=True)
class StateTransition:
    state: JobState
    time: datetime | None


@dataclass(slots=True, frozen=True)
class Job(_ProtoFallback):
    """A durable job as the server last reported it."""

    job_id: str
    state: JobState
    priority: JobPriority = JobPriority.UNSPECIFIED
    completion_tokens: int = 0  # generated so far, out of max_tokens
    max_tokens: int = 0
    result: GenerationResult | None = None  # set once ended with output
    last_error: JobError | None = None
    attempts: int = 0
    max_attempts: int = 0
    idempotency_key: str = ""
    seed: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None
    expire_time: datetime | None = None  # when a queued job expires / an ended one is deleted
    history: tuple[StateTransition, ...] = ()
    proto: jobs_pb2.Job | None = field(default=None, repr=False, compare=False)

    @property
    def ended(self) -> bool:
        return self.state.ended


@dataclass(slots=True, frozen=True)
class SubmitResult(_ProtoFallback):
    job: Job
    created: bool  # False when the idempotency key matched an existing job
    proto: jobs_pb2.SubmitJobResponse | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class JobPage(_ProtoFallback):
    jobs: tuple[Job, ...]
    next_page_token: str = ""  # pass as page_token for the next page; "" on the last
    proto: jobs_pb2.ListJobsResponse | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class JobEvent(_ProtoFallback):
    """One WatchJob event: a state change, new output (a delta), or the ended job."""

    kind: Literal["state_change", "delta", "ended"]
    state: JobState | None = None  # state_change (and ended: the final state)
    time: datetime | None = None  # state_change
    token_offset: int = 0  # delta: index of token_ids[0] in the job's output
    token_ids: tuple[int, ...] = ()
    text: str = ""
    job: Job | None = None  # ended
    proto: jobs_pb2.WatchJobResponse | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class ModelInfo(_ProtoFallback):
    model_name: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_logprobs: int
    max_stop_strings: int
    engine: str
    proto: text_generation_pb2.GetModelInfoResponse | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True, frozen=True)
class ServerLoad(_ProtoFallback):
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_second: float
    queue_depth: int
    queue_capacity: int
    draining: bool
    proto: text_generation_pb2.GetServerLoadResponse | None = field(default=None, repr=False, compare=False)
