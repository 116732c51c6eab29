"""Client (blocking) for the tokenrelay.v1 API; AsyncClient (asyncio) has the same methods.

    from tokenrelay import Client
    with Client("localhost:50051", timeout=30) as client:
        result = client.generate("Hello", max_tokens=32, temperature=0)
        for delta in (stream := client.stream("Hello", max_tokens=32)):
            print(delta.text, end="", flush=True)
        print(stream.finish_reason, stream.usage)

Every call takes `timeout=` (seconds, for the whole call including retries; default: the
client's) and `metadata=` (extra (key, value) pairs). UNAVAILABLE is retried with jittered
backoff (streams only before their first event); every other failure raises a TokenRelayError
subclass at once (see tokenrelay.errors).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from tokenrelay import _params
from tokenrelay._aio import AsyncClient
from tokenrelay._retry import UNSET as _UNSET
from tokenrelay._security import ChannelSecurity, PemSource, traced_channel
from tokenrelay._retry import Deadline, JobWait, Metadata, RetryPolicy, merge_metadata
from tokenrelay._streams import GenerationStream, iterate_with_retry
from tokenrelay.errors import TokenRelayError
from tokenrelay.v1 import (
    generation_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    text_generation_pb2,
    text_generation_pb2_grpc,
)

__all__ = ["Client", "AsyncClient", "GenerationStream"]

class Client:
    """Blocking client. `target` is "host:port". TLS: `tls=True` (system roots) or `ca_cert`
    (PEM path or bytes); mTLS adds `client_cert` and `client_key`; `server_name` overrides the
    name checked in the server certificate; or pass ready `credentials`. `api_key` is sent as
    `authorization: Bearer`; `tracing=True` sends the current OpenTelemetry trace
    (opentelemetry-instrumentation-grpc). `retries` is how many times UNAVAILABLE is retried.
    Use as a context manager or call `close()`."""

    def __init__(self, target: str, *, timeout: float | None = None, retries: int = 3,
                 metadata: Metadata | Mapping[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] | None = None,
                 tls: bool = False, ca_cert: PemSource = None, client_cert: PemSource = None,
                 client_key: PemSource = None, server_name: str | None = None,
                 api_key: str | None = None, tracing: bool = False) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 seconds or None")
        self.target = target
        self.timeout = timeout
        self._retry = RetryPolicy(retries=retries)
        security = ChannelSecurity(tls=tls, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
                                   server_name=server_name, api_key=api_key)
        self._metadata = merge_metadata(security.metadata(), metadata)
        channel_options = list(options or ()) + security.options()
        credentials = credentials if credentials is not None else security.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        if tracing:
            self._channel = traced_channel(self._channel)
        self._generation = text_generation_pb2_grpc.TextGenerationServiceStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsServiceStub(self._channel)

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

    def _unary(self, method: Any, request: Any, timeout: float | None, metadata: Any) -> Any:
        deadline = self._deadline(timeout)
        md = merge_metadata(self._metadata, metadata)
        attempt = 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=md)
            except grpc.RpcError as exc:
                delay = self._retry.delay_or_raise(exc, attempt, deadline)
            time.sleep(delay)
            attempt += 1

    def _server_stream(self, method: Any, request: Any, timeout: float | None,
                       metadata: Any) -> Iterator[Any]:
        md = merge_metadata(self._metadata, metadata)
        return iterate_with_retry(lambda t: method(request, timeout=t, metadata=md),
                                  self._retry, self._deadline(timeout))

    # -- text generation --------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = _UNSET,
                 metadata: Metadata | None = None, **options: Any) -> generation_pb2.GenerationResult:
        """Generate the whole answer. Options: see tokenrelay._params.GENERATION_OPTIONS."""
        request = text_generation_pb2.GenerateRequest(
            params=_params.generation_params(prompt, options))
        return self._unary(self._generation.Generate, request, timeout, metadata).result

    def stream(self, prompt: str | Sequence[int], *, timeout: float | None = _UNSET,
               metadata: Metadata | None = None, **options: Any) -> GenerationStream:
        """Start a streaming generation; iterate the returned stream for StreamDelta events."""
        request = text_generation_pb2.GenerateStreamRequest(
            params=_params.generation_params(prompt, options))
        return GenerationStream(self._server_stream(
            self._generation.GenerateStream, request, timeout, metadata))

    def chat(self, messages: Sequence[_params.ChatMessageLike], *, timeout: float | None = _UNSET,
             metadata: Metadata | None = None, **options: Any) -> generation_pb2.GenerationResult:
        """Answer a conversation: messages are {"role": "system"|"user"|"assistant", "content": str}
        (or (role, content) pairs), rendered with the model's chat template. The result's text is
        the assistant's reply. Options as for generate()."""
        request = text_generation_pb2.GenerateRequest(
            params=_params.generation_params(_params.chat_messages(messages), options))
        return self._unary(self._generation.Generate, request, timeout, metadata).result

    def chat_stream(self, messages: Sequence[_params.ChatMessageLike], *, timeout: float | None = _UNSET,
                    metadata: Metadata | None = None, **options: Any) -> GenerationStream:
        """Stream the assistant's reply to a conversation, delta by delta (see chat())."""
        request = text_generation_pb2.GenerateStreamRequest(
            params=_params.generation_params(_params.chat_messages(messages), options))
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
        return self._unary(self._generation.Detokenize, request, timeout, metadata).text

    def info(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None
             ) -> text_generation_pb2.GetModelInfoResponse:
        """Model name, context length, vocab size, eos ids, limits and engine kind."""
        return self._unary(self._generation.GetModelInfo, text_generation_pb2.GetModelInfoRequest(),
                           timeout, metadata)

    def load(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None
             ) -> text_generation_pb2.GetServerLoadResponse:
        """Running / waiting requests, KV cache use, queue depth, draining."""
        return self._unary(self._generation.GetServerLoad,
                           text_generation_pb2.GetServerLoadRequest(), timeout, metadata)

    # -- jobs -------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], *, job_priority: str | int | None = None,
               idempotency_key: str | None = None, queue_ttl: float | None = None,
               result_retention: float | None = None, max_attempts: int | None = None,
               webhook_url: str | None = None, labels: Mapping[str, str] | None = None,
               timeout: float | None = _UNSET, metadata: Metadata | None = None,
               **options: Any) -> jobs_pb2.SubmitJobResponse:
        """Submit a durable job; returns once stored (`.job`, and `.created` False when the
        idempotency key matched an existing job). Without an idempotency key one is made up,
        so a retried submit never creates two jobs. `job_priority`: urgent|standard|bulk."""
        request = _params.submit_request(
            prompt, idempotency_key=idempotency_key or uuid.uuid4().hex,
            job_priority_value=job_priority, queue_ttl=queue_ttl,
            result_retention=result_retention, max_attempts=max_attempts,
            webhook_url=webhook_url, labels=labels, options=options)
        return self._unary(self._jobs.SubmitJob, request, timeout, metadata)

    def get(self, job_id: str, *, timeout: float | None = _UNSET,
            metadata: Metadata | None = None) -> jobs_pb2.Job:
        return self._unary(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id),
                           timeout, metadata).job

    def watch(self, job_id: str, from_token_offset: int = 0, *, timeout: float | None = _UNSET,
              metadata: Metadata | None = None) -> Iterator[jobs_pb2.WatchJobResponse]:
        """State changes and token deltas from `from_token_offset`; ends after `ended`."""
        request = jobs_pb2.WatchJobRequest(job_id=job_id, from_token_offset=from_token_offset)
        return self._server_stream(self._jobs.WatchJob, request, timeout, metadata)

    def cancel(self, job_id: str, *, timeout: float | None = _UNSET,
               metadata: Metadata | None = None) -> jobs_pb2.Job:
        return self._unary(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id),
                           timeout, metadata).job

    def list_jobs(self, states: Sequence[str | int] | None = None, *, page_size: int = 0,
                  page_token: str = "", timeout: float | None = _UNSET,
                  metadata: Metadata | None = None) -> jobs_pb2.ListJobsResponse:
        """One page of jobs (`.jobs`, `.next_page_token`), optionally only in `states`."""
        request = jobs_pb2.ListJobsRequest(states=_params.job_states(states), page_size=page_size,
                                           page_token=page_token)
        return self._unary(self._jobs.ListJobs, request, timeout, metadata)

    def delete(self, job_id: str, *, timeout: float | None = _UNSET,
               metadata: Metadata | None = None) -> None:
        self._unary(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(job_id=job_id),
                    timeout, metadata)

    def wait(self, job_id: str, timeout: float | None = None, *, poll_interval: float = 0.5,
             metadata: Metadata | None = None) -> jobs_pb2.Job:
        """Block until the job reaches a terminal state and return it. Watches the job (polls
        GetJob if the server has no WatchJob); raises DeadlineExceededError after `timeout`."""
        waiting = JobWait(job_id, timeout, self._retry, poll_interval)
        while True:
            try:
                job = self.get(job_id, timeout=waiting.deadline.remaining(), metadata=metadata)
                if job.state in _params.TERMINAL_JOB_STATES:
                    return job
                if waiting.watch_supported:
                    for event in self.watch(job_id, job.completion_tokens,
                                            timeout=waiting.deadline.remaining(), metadata=metadata):
                        waiting.event_seen()
                        if event.WhichOneof("event") == "ended":
                            return event.ended
                    waiting.watch_ended()
            except TokenRelayError as error:
                waiting.failed(error)
            time.sleep(waiting.next_pause())
