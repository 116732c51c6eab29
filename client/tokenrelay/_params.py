"""Keyword options -> tokenrelay.v1 request messages (shared by Client and AsyncClient)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf import duration_pb2

from tokenrelay.v1 import generation_pb2, jobs_pb2

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed")
STOPPING_OPTIONS = ("max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                    "include_stop_in_output")
OTHER_OPTIONS = ("logprobs", "priority", "request_id")
GENERATION_OPTIONS = frozenset(SAMPLING_OPTIONS + STOPPING_OPTIONS + OTHER_OPTIONS)


@dataclass(slots=True, frozen=True)
class GenerationOptions:
    """Every per-request option of Generate / GenerateStream / SubmitJob; None: server default.

    The client methods take these as keyword parameters of the same names (pick() gathers them).
    """

    max_tokens: int | None = None
    min_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    include_stop_in_output: bool = False
    logprobs: int | bool | None = None  # True: the sampled token's logprob only (0 alternatives)
    priority: int | None = None
    request_id: str | None = None

    @classmethod
    def pick(cls, values: Mapping[str, Any]) -> GenerationOptions:
        """The options among a method's arguments (its locals())."""
        return cls(**{name: values[name] for name in GENERATION_OPTIONS if name in values})

    def apply(self, params: generation_pb2.GenerationParams) -> None:
        for name in SAMPLING_OPTIONS:
            value = getattr(self, name)
            if value is not None:
                setattr(params.sampling, name, value)
        stopping = params.stopping
        if self.max_tokens is not None:
            stopping.max_tokens = self.max_tokens
        if self.min_tokens is not None:
            stopping.min_tokens = self.min_tokens
        if self.stop is not None:
            stopping.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        if self.stop_token_ids is not None:
            stopping.stop_token_ids.extend(self.stop_token_ids)
        stopping.ignore_eos = bool(self.ignore_eos)
        stopping.include_stop_in_output = bool(self.include_stop_in_output)
        if self.logprobs is not None and self.logprobs is not False:
            params.logprobs = 0 if self.logprobs is True else int(self.logprobs)
        if self.priority is not None:
            params.priority = self.priority
        if self.request_id:
            params.request_id = self.request_id


JOB_PRIORITIES = {
    "urgent": jobs_pb2.JOB_PRIORITY_URGENT,
    "standard": jobs_pb2.JOB_PRIORITY_STANDARD,
    "bulk": jobs_pb2.JOB_PRIORITY_BULK,
}

TERMINAL_JOB_STATES = frozenset({
    jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
    jobs_pb2.JOB_STATE_EXPIRED, jobs_pb2.JOB_STATE_DEAD_LETTER,
})


ChatMessageLike = Mapping[str, str] | tuple[str, str] | generation_pb2.ChatMessage


def chat_messages(messages: Sequence[ChatMessageLike] | generation_pb2.ChatMessages
                  ) -> generation_pb2.ChatMessages:
    """Chat messages from {"role": ..., "content": ...} mappings, (role, content) pairs or protos."""
    if isinstance(messages, generation_pb2.ChatMessages):
        return messages
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a sequence of {'role': ..., 'content': ...} mappings")
    out = generation_pb2.ChatMessages()
    for message in messages:
        if isinstance(message, generation_pb2.ChatMessage):
            out.messages.append(message)
        elif isinstance(message, Mapping):
            out.messages.add(role=message["role"], content=message["content"])
        elif isinstance(message, tuple) and len(message) == 2:
            out.messages.add(role=message[0], content=message[1])
        else:
            raise TypeError(f"a chat message must be a mapping with role and content, not {message!r}")
    return out


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, generation_pb2.ChatMessages) or (
        isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
        and all(isinstance(m, (Mapping, tuple, generation_pb2.ChatMessage)) for m in prompt))


Prompt = str | Sequence[int] | Sequence[ChatMessageLike]


def generation_params(prompt: Prompt | generation_pb2.ChatMessages,
                      options: GenerationOptions | Mapping[str, Any]) -> generation_pb2.GenerationParams:
    """Build GenerationParams from a prompt (text, token ids or chat messages, the latter rendered
    by the server's chat template) and the options (a mapping: unknown names raise TypeError)."""
    if not isinstance(options, GenerationOptions):
        unknown = set(options) - GENERATION_OPTIONS
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}; "
                            f"expected some of {', '.join(sorted(GENERATION_OPTIONS))}")
        options = GenerationOptions(**options)
    params = generation_pb2.GenerationParams()
    if isinstance(prompt, str):
        params.text = prompt
    elif _is_chat(prompt):
        params.messages.CopyFrom(chat_messages(prompt))  # type: ignore[arg-type]
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        params.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
    else:
        raise TypeError("prompt must be a str, a sequence of int token ids, or chat messages")
    options.apply(params)
    return params


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    if seconds < 0:
        raise ValueError("durations must be >= 0 seconds")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def job_priority(value: str | int | None) -> jobs_pb2.JobPriority:
    """A JobPriority (or its value) or a name: "urgent", "standard", "bulk"."""
    if value is None:
        return jobs_pb2.JOB_PRIORITY_UNSPECIFIED
    if isinstance(value, str):
        try:
            return JOB_PRIORITIES[value.strip().lower()]
        except KeyError:
            raise ValueError(f"job priority must be one of {sorted(JOB_PRIORITIES)}, not {value!r}"
                             ) from None
    return cast("jobs_pb2.JobPriority", int(value))


def submit_request(prompt: Prompt, *, idempotency_key: str,
                   job_priority_value: str | int | None = None, queue_ttl: float | None = None,
                   result_retention: float | None = None, max_attempts: int | None = None,
                   webhook_url: str | None = None, labels: Mapping[str, str] | None = None,
                   options: GenerationOptions | Mapping[str, Any]) -> jobs_pb2.SubmitJobRequest:
    request = jobs_pb2.SubmitJobRequest(
        params=generation_params(prompt, options),
        priority=job_priority(job_priority_value),
        idempotency_key=idempotency_key,
        queue_ttl=_duration(queue_ttl),
        result_retention=_duration(result_retention),
        labels=dict(labels or {}),
    )
    if max_attempts is not None:
        request.max_attempts = max_attempts
    if webhook_url:
        request.webhook.url = webhook_url
    return request


def job_states(states: Sequence[str | int] | None) -> list[jobs_pb2.JobState]:
    """Job states by JobState, value or name ("succeeded", "JOB_STATE_SUCCEEDED")."""
    result: list[jobs_pb2.JobState] = []
    for state in states or ():
        if isinstance(state, str):
            name = state.strip().upper()
            name = name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name
            try:
                result.append(cast("jobs_pb2.JobState", jobs_pb2.JobState.Value(name)))
            except ValueError:
                raise ValueError(f"unknown job state {state!r}") from None
        else:
            result.append(cast("jobs_pb2.JobState", int(state)))
    return result
