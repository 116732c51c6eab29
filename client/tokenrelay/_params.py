"""Keyword options -> tokenrelay.v1 request messages (shared by Client and AsyncClient)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2

from tokenrelay.v1 import generation_pb2, jobs_pb2

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed")
STOPPING_OPTIONS = ("max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos",
                    "include_stop_in_output")
OTHER_OPTIONS = ("logprobs", "priority", "request_id")
GENERATION_OPTIONS = frozenset(SAMPLING_OPTIONS + STOPPING_OPTIONS + OTHER_OPTIONS)

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


def generation_params(prompt: str | Sequence[int] | Sequence[ChatMessageLike] | generation_pb2.ChatMessages,
                      options: Mapping[str, Any]) -> generation_pb2.GenerationParams:
    """Build GenerationParams. Unknown options raise TypeError; None means "server default".

    The prompt is text, token ids, or chat messages (rendered by the server's chat template).
    """
    unknown = set(options) - GENERATION_OPTIONS
    if unknown:
        raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}; "
                        f"expected some of {', '.join(sorted(GENERATION_OPTIONS))}")
    params = generation_pb2.GenerationParams()
    if isinstance(prompt, str):
        params.text = prompt
    elif _is_chat(prompt):
        params.messages.CopyFrom(chat_messages(prompt))
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
        params.token_ids.ids.extend(prompt)
    else:
        raise TypeError("prompt must be a str, a sequence of int token ids, or chat messages")
    for name in SAMPLING_OPTIONS:
        if options.get(name) is not None:
            setattr(params.sampling, name, options[name])
    stopping = params.stopping
    for name in ("max_tokens", "min_tokens"):
        if options.get(name) is not None:
            setattr(stopping, name, options[name])
    stop = options.get("stop")
    if stop is not None:
        stopping.stop.extend([stop] if isinstance(stop, str) else stop)
    if options.get("stop_token_ids") is not None:
        stopping.stop_token_ids.extend(options["stop_token_ids"])
    stopping.ignore_eos = bool(options.get("ignore_eos", False))
    stopping.include_stop_in_output = bool(options.get("include_stop_in_output", False))
    if options.get("logprobs") is not None:
        logprobs = options["logprobs"]
        params.logprobs = 0 if logprobs is True else int(logprobs)
    if options.get("priority") is not None:
        params.priority = options["priority"]
    if options.get("request_id"):
        params.request_id = options["request_id"]
    return params


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    if seconds < 0:
        raise ValueError("durations must be >= 0 seconds")
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def job_priority(value: str | int | None) -> int:
    if value is None:
        return jobs_pb2.JOB_PRIORITY_UNSPECIFIED
    if isinstance(value, str):
        try:
            return JOB_PRIORITIES[value.lower()]
        except KeyError:
            raise ValueError(f"job priority must be one of {sorted(JOB_PRIORITIES)}, not {value!r}"
                             ) from None
    return int(value)


def submit_request(prompt: str | Sequence[int], *, idempotency_key: str,
                   job_priority_value: str | int | None = None, queue_ttl: float | None = None,
                   result_retention: float | None = None, max_attempts: int | None = None,
                   webhook_url: str | None = None, labels: Mapping[str, str] | None = None,
                   options: Mapping[str, Any]) -> jobs_pb2.SubmitJobRequest:
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


def job_states(states: Sequence[str | int] | None) -> list[int]:
    """Job states by enum value or name ("succeeded", "JOB_STATE_SUCCEEDED")."""
    result = []
    for state in states or ():
        if isinstance(state, str):
            name = state.upper()
            name = name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name
            try:
                result.append(jobs_pb2.JobState.Value(name))
            except ValueError:
                raise ValueError(f"unknown job state {state!r}") from None
        else:
            result.append(int(state))
    return result
