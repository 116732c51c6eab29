"""AsyncClient: the asyncio (grpc.aio) twin of tokenrelay.Client, with the same methods."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from tokenrelay import _convert, _params
from tokenrelay._params import ChatMessageLike, GenerationOptions, Prompt
from tokenrelay._retry import UNSET as _UNSET
from tokenrelay._retry import Deadline, JobWait, Metadata, merge_metadata
from tokenrelay._security import PemSource, tracing_interceptors
from tokenrelay._settings import ClientSettings
from tokenrelay._streams import AsyncGenerationStream, aiterate_with_retry
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


class AsyncClient:
    """Asyncio client; see tokenrelay.Client for the arguments and each method's meaning.
    Create it inside a running event loop; use `async with` or `await close()`."""

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
        interceptors = tracing_interceptors() if tracing else None
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=channel_options,
                                                      interceptors=interceptors)
        else:
            self._channel = grpc.aio.secure_channel(self.target, credentials, options=channel_options,
                                                    interceptors=interceptors)
        self._generation: Any = text_generation_pb2_grpc.TextGenerationServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._jobs: Any = jobs_pb2_grpc.JobsServiceStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def max_retries(self) -> int:
        return self._retry.max_retries

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying channel, e.g. for grpc.health.v1 or reflection stubs."""
        return self._channel

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline(self.timeout if timeout is _UNSET else timeout)

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None,
                     metadata: Metadata | None, *, done_if_not_found_on_retry: bool = False) -> Any:
        deadline = self._deadline(timeout)
        md = merge_metadata(self._metadata, metadata)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(), metadata=md)
            except grpc.RpcError as exc:
                try:
                    delay = self._retry.delay_or_raise(exc, attempt, deadline)
                except NotFoundError:
                    if done_if_not_found_on_retry and attempt > 0:
                        return None  # an earlier attempt did it; its answer was lost
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    def _server_stream(self, method: Callable[..., Any], request: Any, timeout: float | None,
                       metadata: Metadata | None) -> AsyncGenerator[Any, None]:
        md = merge_metadata(self._metadata, metadata)
        return aiterate_with_retry(lambda t: method(request, timeout=t, metadata=md),
                                   self._retry, self._deadline(timeout))

    async def generate(self, prompt: str | Sequence[int], *,
                       max_tokens: int | None = None, min_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       min_p: float | None = None, repetition_penalty: float | None = None,
                       presence_penalty: float | None = None, frequency_penalty: float | None = None,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                       include_stop_in_output: bool = False, logprobs: int | bool | None = None,
                       priority: int | None = None, request_id: str | None = None,
                       timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationResult:
        request = text_generation_pb2.GenerateRequest(
            params=_params.generation_params(prompt, GenerationOptions.pick(locals())))
        response = await self._unary(self._generation.Generate, request, timeout, metadata)
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
               timeout: float | None = _UNSET, metadata: Metadata | None = None) -> AsyncGenerationStream:
        """Not a coroutine: returns a stream to `async for` over (the call starts then)."""
        request = text_generation_pb2.GenerateStreamRequest(
            params=_params.generation_params(prompt, GenerationOptions.pick(locals())))
        return AsyncGenerationStream(self._server_stream(
            self._generation.GenerateStream, request, timeout, metadata))

    async def chat(self, messages: Sequence[ChatMessageLike], *,
                   max_tokens: int | None = None, min_tokens: int | None = None,
                   temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None,
                   presence_penalty: float | None = None, frequency_penalty: float | None = None,
                   seed: int | None = None, stop: str | Sequence[str] | None = None,
                   stop_token_ids: Sequence[int] | None = None, ignore_eos: bool = False,
                   include_stop_in_output: bool = False, logprobs: int | bool | None = None,
                   priority: int | None = None, request_id: str | None = None,
                   timeout: float | None = _UNSET, metadata: Metadata | None = None) -> GenerationResult:
        """Answer a conversation (see Client.chat)."""
        request = text_generation_pb2.GenerateRequest(params=_params.generation_params(
            _params.chat_messages(messages), GenerationOptions.pick(locals())))
        response = await self._unary(self._generation.Generate, request, timeout, metadata)
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
                    timeout: float | None = _UNSET, metadata: Metadata | None = None) -> AsyncGenerationStream:
        """Not a coroutine: returns a stream of the assistant's reply to `async for` over."""
        request = text_generation_pb2.GenerateStreamRequest(params=_params.generation_params(
            _params.chat_messages(messages), GenerationOptions.pick(locals())))
        return AsyncGenerationStream(self._server_stream(
            self._generation.GenerateStream, request, timeout, metadata))

    async def tokenize(self, text: str, *, add_special_tokens: bool = False,
                       timeout: float | None = _UNSET, metadata: Metadata | None = None) -> list[int]:
        request = text_generation_pb2.TokenizeRequest(text=text, add_special_tokens=add_special_tokens)
        response = await self._unary(self._generation.Tokenize, request, timeout, metadata)
        return list(response.token_ids)

    async def detokenize(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False,
                         timeout: float | None = _UNSET, metadata: Metadata | None = None) -> str:
        request = text_generation_pb2.DetokenizeRequest(
            token_ids=token_ids, skip_special_tokens=skip_special_tokens)
        text: str = (await self._unary(self._generation.Detokenize, request, timeout, metadata)).text
        return text

    async def info(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None) -> ModelInfo:
        return _convert.model_info(await self._unary(
            self._generation.GetModelInfo, text_generation_pb2.GetModelInfoRequest(), timeout, metadata))

    async def load(self, *, timeout: float | None = _UNSET, metadata: Metadata | None = None) -> ServerLoad:
        return _convert.server_load(await self._unary(
            self._generation.GetServerLoad, text_generation_pb2.GetServerLoadRequest(), timeout, metadata))

    async def submit(self, prompt: Prompt, *, job_priority: JobPriority | str | int | None = None,
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
        """See Client.submit: an idempotency key is made up when none is given."""
        request = _params.submit_request(
            prompt, idempotency_key=idempotency_key or uuid.uuid4().hex,
            job_priority_value=job_priority, queue_ttl=queue_ttl,
            result_retention=result_retention, max_attempts=max_attempts,
            webhook_url=webhook_url, labels=labels, options=GenerationOptions.pick(locals()))
        return _convert.submit_result(await self._unary(self._jobs.SubmitJob, request, timeout, metadata))

    async def get(self, job_id: str, *, timeout: float | None = _UNSET,
                  metadata: Metadata | None = None) -> Job:
        response = await self._unary(self._jobs.GetJob, jobs_pb2.GetJobRequest(job_id=job_id),
                                     timeout, metadata)
        return _convert.job(response.job)

    async def watch(self, job_id: str, from_token_offset: int = 0, *, timeout: float | None = _UNSET,
                    metadata: Metadata | None = None) -> AsyncGenerator[JobEvent, None]:
        """Not a coroutine: an async iterator of the job's events (see Client.watch)."""
        request = jobs_pb2.WatchJobRequest(job_id=job_id, from_token_offset=from_token_offset)
        responses = self._server_stream(self._jobs.WatchJob, request, timeout, metadata)
        try:
            async for response in responses:
                yield _convert.job_event(response)
        finally:
            await responses.aclose()

    async def cancel(self, job_id: str, *, timeout: float | None = _UNSET,
                     metadata: Metadata | None = None) -> Job:
        response = await self._unary(self._jobs.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id),
                                     timeout, metadata)
        return _convert.job(response.job)

    async def list_jobs(self, states: Sequence[JobState | str | int] | None = None, *,
                        page_size: int = 0, page_token: str = "", timeout: float | None = _UNSET,
                        metadata: Metadata | None = None) -> JobPage:
        request = jobs_pb2.ListJobsRequest(states=_params.job_states(states), page_size=page_size,
                                           page_token=page_token)
        return _convert.job_page(await self._unary(self._jobs.ListJobs, request, timeout, metadata))

    async def delete(self, job_id: str, *, timeout: float | None = _UNSET,
                     metadata: Metadata | None = None) -> None:
        await self._unary(self._jobs.DeleteJob, jobs_pb2.DeleteJobRequest(job_id=job_id), timeout,
                          metadata, done_if_not_found_on_retry=True)

    async def wait(self, job_id: str, timeout: float | None = None, *,
                   poll_interval: float = 0.5, metadata: Metadata | None = None) -> Job:
        waiting = JobWait(job_id, timeout, self._retry, poll_interval)
        while True:
            try:
                job = await self.get(job_id, timeout=waiting.deadline.remaining(), metadata=metadata)
                if job.ended:
                    return job
                if waiting.watch_supported:
                    events = self.watch(job_id, job.completion_tokens,
                                        timeout=waiting.deadline.remaining(), metadata=metadata)
                    try:
                        async for event in events:
                            waiting.event_seen()
                            if event.job is not None:
                                return event.job
                    finally:
                        await events.aclose()
                    waiting.watch_ended()
            except TokenRelayError as error:
                waiting.failed(error)
            await asyncio.sleep(waiting.next_pause())
