"""Client (blocking) for the tokenrelay.v1 API; AsyncClient (asyncio) has the same methods.

    from tokenrelay import Client
    with Client() as client:          # TOKENRELAY_TARGET, else localhost:50051
        result = client.generate("Hello", max_tokens=32, temperature=0)
        print(result.text, result.finish_reason, result.usage)
        with client.stream("Hello", max_tokens=32) as stream:
            for delta in stream:
                print(delta.text, end="", flush=True)
        print(stream.finish_reason, stream.usage)

Every generation option is a typed keyword parameter (unset: the server's default); results
are tokenrelay.types dataclasses with enums (`str(FinishReason.EOS) == "eos"`). Every call
takes `timeout=` (seconds, for the whole call including retries; default: the client's, 600 s
unless TOKENRELAY_TIMEOUT says otherwise) and `metadata=` (extra (key, value) pairs).
UNAVAILABLE and RESOURCE_EXHAUSTED-with-RetryInfo are retried `max_retries` times (default 2)
with jittered exponential backoff, at least the server's hinted delay (see tokenrelay._retry);
every other failure raises a TokenRelayError subclass at once (see tokenrelay.errors).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Any

import grpc

from tokenrelay import _convert, _params
from tokenrelay._aio import AsyncClient
from tokenrelay._params import ChatMessageLike, GenerationOptions, Prompt
from tokenrelay._retry import UNSET as _UNSET
from tokenrelay._retry import Deadline, JobWait, Metadata, merge_metadata
from tokenrelay._security import PemSource, traced_channel
from tokenrelay._settings import ClientSettings
from tokenrelay._streams import GenerationStream, iterate_with_retry
from tokenrelay.errors import NotFoundError, TokenRelayError
from tokenrelay.types import (
    GenerationResult,
    Job,
    JobEvent,
    JobPage,
    JobPriority,
    JobState,
    ModelInfo,
    ServerLoad,
    SubmitResult,
)
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc, text_generation_pb2, text_generation_pb2_grpc

__all__ = ["Client", "AsyncClient", "GenerationStream"]


class Client:
    """Blocking client.

    `target` is "host:port" (default: env TOKENRELAY_TARGET, else localhost:50051). TLS:
    `tls=True` (system roots) or `ca_cert` (PEM path or bytes); mTLS adds `client_cert` and
    `client_key`; `server_name` overrides the name checked in the server certificate; or pass
    ready `credentials`. `api_key` is sent as `authorization: Bearer`. Each of these falls back
    to its TOKENRELAY_* environment variable (tokenrelay._settings). `timeout` (seconds; None:
    no deadline) is every call's default; `max_retries` bounds the retries of one call
    (`retries` is its former name). `tracing=True` sends the current OpenTelemetry trace
    (opentelemetry-instrumentation-grpc). Use as a context manager or call `close()`.
    """

    def __init__(self, target: str | None = None, *, timeout: float | None = _UNSET,
                 max_retries: int | None = None, retries: int | None = None,
                 metadata: Metadata | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] | None = None,
                 tls: bool | None = None, ca_cert: PemSource = None, client_cert: PemSource = None,
                 client_key: PemSource = None, server_name: str | None = None,
                 api_key: str | None = None, tracing: bool = False) -> None:
        settings = ClientSettings.resolve(
            target=target, timeout=timeout, max_retries=max_retries if max_retries is not None else retries,
            tls=tls, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
            server_name=server_name, api_key=api_key)
        self.target = settings.target
        self.timeout = settings.timeout
        self._retry = settings.retry
        security = settings.security
        self._metadata = merge_metadata(security.metadata(), metadata)
        channel_options = list(options or ()) + security.options()
        credentials = credentials if credentials is not None else security.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(self.target, credentials, options=channel_options)
        if tracing:
            self._channel = traced_channel(self._channel)
        self._generation: Any = text_generation_pb2_grpc.TextGenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._jobs: Any = jobs_pb2_grpc.JobsServiceStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def max_retries(self) -> int:
        return self._retry.max_retries

    # -- plumbing ---------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channel(self) -> grpc.Channel:
        """The underlying channel, e.g. for grpc.health.v1 or reflection stubs."""
        return self._channel

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is _UNSET else timeout)

    def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None,
               metadata: Metadata | None, *, done_if_not_found_on_retry: bool = False) -> Any:
        deadline = self._deadline(timeout)
        md = merge_metadata(self._metadata, metadata)
        attempt = 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=md)
            except grpc.RpcError as exc:
                try:
                    delay = self._retry.delay_or_raise(exc, attempt, deadline)
                except NotFoundError:
                    if done_if_not_found_on_retry and attempt > 0:
                        return None  # an earlier attempt did it; its answer was lost
                    raise
            time.sleep(delay)
            attempt += 1

    def _server_stream(self, method: Callable[..., Any], request: Any, timeout: float | None,
                       metadata: Metadata | None) -> Generator[Any, None, None]:
        md = merge_metadata(self._metadata, metadata)
        return iterate_with_retry(lambda t: method(request, timeout=t, metadata=md),
                                  self._retry, self._deadline(timeout))

    # -- text generation --------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *,
                 max_tokens: int | None = None, min_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                 include_stop_in_output: bool = False, logprobs: int | bool | None = None,
                 priority: int | None = None, request_id: str | None = None,
                 timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationResult:
        """Generate the whole answer to a text or token-id prompt."""
        request = text_generation_pb2.GenerateRequest(
            params=_params.generation_params(prompt, GenerationOptions.pick(locals())))
        response = self._unary(self._generation.Generate, request, timeout, metadata)
        return _convert.generation_result(response.result)

    def stream(self, prompt: str | Sequence[int], *,
               max_tokens: int | None = None, min_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               min_p: float | None = None, repetition_penalty: float | None = None,
               presence_penalty: float | None = None, frequency_penalty: float | None = None,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
               include_stop_in_output: bool = False, logprobs: int | bool | None = None,
               priority: int | None = None, request_id: str | None = None,
               timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationStream:
        """Start a streaming generation; iterate the returned stream for StreamDelta events."""
        request = text_generation_pb2.GenerateStreamRequest(
            params=_params.generation_params(prompt, GenerationOptions.pick(locals())))
        return GenerationStream(self._server_stream(
            self._generation.GenerateStream, request, timeout, metadata))

    def chat(self, messages: Sequence[ChatMessageLike], *,
             max_tokens: int | None = None, min_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             presence_penalty: float | None = None, frequency_penalty: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
             include_stop_in_output: bool = False, logprobs: int | bool | None = None,
             priority: int | None = None, request_id: str | None = None,
             timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationResult:
        """Answer a conversation: messages are {"role": "system"|"user"|"assistant", "content": str}
        (or (role, content) pairs), rendered with the model's chat template. The result's text is
        the assistant's reply."""
        request = text_generation_pb2.GenerateRequest(params=_params.generation_params(
            _params.chat_messages(messages), GenerationOptions.pick(locals())))
        response = self._unary(self._generation.Generate, request, timeout, metadata)
        return _convert.generation_result(response.result)

    def chat_stream(self, messages: Sequence[ChatMessageLike], *,
                    max_tokens: int | None = None, min_tokens: int | None = None,
                    temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                    min_p: float | None = None, repetition_penalty: float | None = None,
                    presence_penalty: float | None = None, frequency_penalty: float | None = None,
                    seed: int | None = None, stop: str | Sequence[str] | None = None,
                    stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                    include_stop_in_output: bool = False, logprobs: int | bool | None = None,
                    priority: int | None = None, request_id: str | None = None,
                    timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationStream:
        """Stream the assistant's reply to a conversation, delta by delta (see chat())."""
        request = text_generation_pb2.GenerateStreamRequest(params=_params.generation_params(
            _params.chat_messages(messages), GenerationOptions.pick(locals())))
        return GenerationStream(self._server_stream(
            self._generation.GenerateStream, request, timeout, metadata))

    def tokenize(self, text: str, *, add_special_tokens: bool = False,
                 timeout: float | None = _UNSET, metadata: Metadata | None = None) -> list[int]:
        request = text_generation_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        return list(self._unary(self._generation.Tokenize, request, timeout, metadata).token_ids)

    def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False,
                   timeout: float | None = _UNSET, metadata: Metadata | None = None) -> str:
        request = text_generation_pb2.DetokenizeRequest(
            token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        text: str = self._unary(self._generation.Detokenize, request, timeout, metadata).text
        return text

    def info(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None) -> ModelInfo:
        """Model name, context length, vocab size, eos ids, limits and engine kind."""
        return _convert.model_info(self._unary(
            self._generation.GetModelInfo, text_generation_pb2.GetModelInfoRequest(), timeout, metadata))

    def load(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None) -> ServerLoad:
        """Running / waiting requests, KV cache use, queue depth, draining."""
        return _convert.server_load(self._unary(
            self._generation.GetServerLoad, text_generation_pb2.GetServerLoadRequest(), timeout, metadata))

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, prompt: Prompt, *, job_priority: JobPriority | str | int | None = None,
               idempotency_key: str | None = None, queue_ttl: float | None = None,
               result_retention: float | None = None, max_attempts: int | None = None,
               webhook_url: str | None = None, labels: Mapping[str, str] | None = None,
               max_tokens: int | None = None, min_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               min_p: float | None = None, repetition_penalty: float | None = None,
               presence_penalty: float | None = None, frequency_penalty: float | None = None,
               seed: int | None = None, stop: str | Sequence[str] | None = None,
               stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
               include_stop_in_output: bool = False, logprobs: int | bool | None = None,
               priority: int | None = None, request_id: str | None = None,
               timeout: float | None = _UNSET, metadata: Metadata | None = None) -> SubmitResult:
        """Submit a durable job (text, token ids or chat messages); returns once stored (`.job`,
        and `.created` False when the idempotency key matched an existing job). Without an
        idempotency key one is made up, so a retried submit never creates two jobs.
        `job_priority`: urgent|standard|bulk; durations in seconds."""
        request = _params.submit_request(
            prompt, idempotency_key=idempotency_key or uuid.uuid4().hex,
            job_priority_value=job_priority, queue_ttl=queue_ttl,
            result_retention=result_retention, max_attempts=max_attempts,
            webhook_url=webhook_url, labels=labels, options=GenerationOptions.pick(locals()))
        return _convert.submit_result(self._unary(self._jobs.SubmitJob, request, timeout, metadata))

    def get(self, job_id: str, *, timeout: float | None = _UNSET,
            metadata: Metadata | None = None) -> Job:
        return _convert.job(self._unary(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id),
                                        timeout, metadata).job)

    def watch(self, job_id: str, from_token_offset: int = 0, *, timeout: float | None = _UNSET,
              metadata: Metadata | None = None) -> Generator[JobEvent, None, None]:
        """State changes and token deltas from `from_token_offset`; ends after the `ended` event."""
        request = jobs_pb2.WatchJobRequest(job_id=job_id, from_token_offset=from_token_offset)
        responses = self._server_stream(self._jobs.WatchJob, request, timeout, metadata)
        try:
            for response in responses:
                yield _convert.job_event(response)
        finally:
            responses.close()  # cancels the call when the caller stops early

    def cancel(self, job_id: str, *, timeout: float | None = _UNSET,
               metadata: Metadata | None = None) -> Job:
        return _convert.job(self._unary(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id),
                                        timeout, metadata).job)

    def list_jobs(self, states: Sequence[JobState | str | int] | None = None, *, page_size: int = 0,
                  page_token: str = "", timeout: float | None = _UNSET,
                  metadata: Metadata | None = None) -> JobPage:
        """One page of jobs (`.jobs`, `.next_page_token`), optionally only in `states`."""
        request = jobs_pb2.ListJobsRequest(states=_params.job_states(states), page_size=page_size,
                                           page_token=page_token)
        return _convert.job_page(self._unary(self._jobs.ListJobs, request, timeout, metadata))

    def delete(self, job_id: str, *, timeout: float | None = _UNSET,
               metadata: Metadata | None = None) -> None:
        """Delete an ended job. A retry that finds it gone counts as done."""
        self._unary(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(job_id=job_id), timeout,
                    metadata, done_if_not_found_on_retry=True)

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.5,
             metadata: Metadata | None = None) -> Job:
        """Block until the job reaches a terminal state and return it. Watches the job (polls
        GetJob if the server has no WatchJob); raises DeadlineExceededError after `timeout`."""
        waiting = JobWait(job_id, timeout, self._retry, poll_interval)
        while True:
            try:
                job = self.get(job_id, timeout=waiting.deadline.remaining(), metadata=metadata)
                if job.ended:
                    return job
                if waiting.watch_supported:
                    for event in self.watch(job_id, job.completion_tokens,
                                            timeout=waiting.deadline.remaining(), metadata=metadata):
                        waiting.event_seen()
                        if event.job is not None:
                            return event.job
                    waiting.watch_ended()
            except TokenRelayError as error:
                waiting.failed(error)
            time.sleep(waiting.next_pause())
