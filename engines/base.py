"""The engine contract: what the server sees of an engine, and the domain types it speaks.

The server only ever talks to an `AsyncEngine`. Protobuf never crosses this line: the server
converts at its edge (`server/convert.py`) into these dataclasses, which validate themselves.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


class InvalidRequest(ValueError):
    """A request field is out of range. `field` names it in the API's dotted form."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(field_name, message)


def _finite(ok: Callable[[float], bool]) -> Callable[[float], bool]:
    return lambda v: math.isfinite(v) and ok(v)


# Every range a sampling field must be in, in one table: SamplingParams checks it (any caller),
# and the proto edge (server/convert.py) checks it first, to report every bad field at once.
SAMPLING_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("temperature", _finite(lambda v: v >= 0), "must be >= 0"),
    ("top_p", _finite(lambda v: 0 < v <= 1), "must be in (0, 1]"),
    ("top_k", lambda v: v >= 0, "must be >= 0 (0 disables)"),
    ("min_p", _finite(lambda v: 0 <= v <= 1), "must be in [0, 1]"),
    ("repetition_penalty", _finite(lambda v: v > 0), "must be > 0"),
    ("presence_penalty", _finite(lambda v: -2 <= v <= 2), "must be in [-2, 2]"),
    ("frequency_penalty", _finite(lambda v: -2 <= v <= 2), "must be in [-2, 2]"),
)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: the engine picks one and reports it
    logprobs: int | None = None  # None: none; n: sampled token + n top alternatives

    def __post_init__(self) -> None:
        for name, ok, rule in SAMPLING_RANGES:
            _require(ok(getattr(self, name)), f"sampling.{name}", rule)
        _require(self.seed is None or 0 <= self.seed < 2**64, "sampling.seed", "must be in [0, 2^64)")
        _require(self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True, frozen=True)
class StoppingCriteria:
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_in_output: bool = False

    def __post_init__(self) -> None:
        _require(self.max_tokens >= 1, "stopping.max_tokens", "must be >= 1")
        _require(0 <= self.min_tokens <= self.max_tokens, "stopping.min_tokens",
                 "must be in [0, max_tokens]")
        _require(all(self.stop), "stopping.stop", "stop strings must be non-empty")


class OutputKind(enum.Enum):
    """What a request's stream yields (the field's RequestOutputKind)."""

    DELTA = "delta"  # one delta per engine step (coalesced while the consumer lags), then the final
    FINAL_ONLY = "final_only"  # the caller wants the whole result only: an engine may yield just the
    #                            final output, carrying every token, the text and logprobs


@dataclass(slots=True)
class Request:
    """One generation request as the engine sees it. The prompt is already tokenized."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    priority: int = 0  # lower runs first
    arrival_time: float = 0.0  # time.monotonic() when the server received it
    deadline: float | None = None  # time.monotonic() after which the engine finishes it (DEADLINE)
    output_kind: OutputKind = OutputKind.DELTA

    def __post_init__(self) -> None:
        _require(bool(self.request_id), "request_id", "must be non-empty")
        _require(len(self.prompt_token_ids) > 0, "prompt", "must not be empty")


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first


@dataclass(slots=True, frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(slots=True, frozen=True)
class RequestMetrics:
    """time.monotonic() stamps; None where the request never got that far."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finished_time: float


@dataclass(slots=True)
class RequestOutput:
    """One delta of a request's output. The last one has `finished` set and carries usage."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new since the previous output
    text: str = ""  # new since the previous output
    logprobs: list[TokenLogprob] | None = None  # one per new token when asked for
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    usage: Usage | None = None
    metrics: RequestMetrics | None = None
    seed: int | None = None  # the seed used; on the first and the final output
    error: str | None = None  # with FinishReason.ERROR


@dataclass(slots=True, frozen=True)
class ModelInfo:
    name: str
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_logprobs: int = 20
    max_stop_strings: int = 16
    engine: str = ""
    supports_logprobs: bool = True
    supports_seed: bool = True
    chat_template: str | None = None  # Jinja2 source; None: chat messages are refused (FAILED_PRECONDITION)
    special_tokens: tuple[tuple[str, str], ...] = ()  # (name, token) the template sees, e.g. ("bos_token", "<s>")


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    tokens_per_second: float = 0.0
    num_preemptions: int = 0

    @property
    def idle(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.kv_blocks_used == 0


class EngineDeadError(RuntimeError):
    """The engine can no longer serve; the server must report NOT_SERVING / UNAVAILABLE."""


@runtime_checkable
class AsyncEngine(Protocol):
    """What the server sees of an engine. All methods are called on the server's event loop."""

    async def start(self) -> None:
        """Load the model and get ready to serve (no warm-up generation: the server runs it)."""

    def add_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Queue `request`; yield deltas, then one final output (finished=True).

        Closing the iterator before the final output aborts the request.
        Raises InvalidRequest (before yielding) for a request this engine cannot serve.
        """

    async def abort(self, request_id: str) -> None:
        """Idempotent: frees everything the request held; its iterator ends with CANCELLED."""

    def info(self) -> ModelInfo: ...

    def stats(self) -> EngineStats: ...

    async def check_health(self) -> None:
        """Raises EngineDeadError if the engine cannot serve."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...

    async def shutdown(self) -> None:
        """Stop the engine loop and free its resources. Pending requests end with CANCELLED."""
