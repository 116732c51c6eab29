"""The Jobs gRPC servicer: thin. Validation and conversion live in `server.jobs.convert`, the
work in `server.jobs.manager`, errors map through `server.errors`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable

import grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

from engines.base import AsyncEngine, InvalidRequest
from server.chat import ChatPrompts
from server.errors import AlreadyExists, InvalidRequests, NotFound, ServerDraining, abort_on_error
from server.jobs import convert
from server.jobs.manager import JobManager
from server.jobs.model import Delta, IdempotencyConflict, Job, JobNotFound, JobsConfig, Transition


def _map_error(exc: Exception) -> Exception:
    if isinstance(exc, JobNotFound):
        return NotFound(f"job {exc.job_id!r} not found")
    if isinstance(exc, IdempotencyConflict):
        return AlreadyExists(str(exc), reason="IDEMPOTENCY_KEY_REUSED", job_id=exc.job_id,
                             idempotency_key=exc.key)
    return exc


def _status(context: grpc.aio.ServicerContext):
    """Every failure in the block becomes a proper status, jobs errors mapped first."""
    async def mapped(exc: Exception) -> Exception:
        return _map_error(exc)
    return abort_on_error(context, mapped)


def _job_id(value: str) -> str:
    if not value:
        raise InvalidRequest("job_id", "must not be empty")
    return value


class JobsServiceServicer(jobs_pb2_grpc.JobsServiceServicer):
    def __init__(self, config: JobsConfig, manager: JobManager, engine: AsyncEngine,
                 check_webhook: Callable[[str], None] | None,
                 draining: Callable[[], bool] = lambda: False, chat: ChatPrompts | None = None) -> None:
        self._config = config
        self._chat = chat if chat is not None else ChatPrompts(engine)
        self._draining = draining
        self._manager = manager
        self._engine = engine
        self._check_webhook = check_webhook

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        async with _status(context):
            if self._draining():
                raise ServerDraining("server is draining; submit to another replica")
            submit = functools.partial(
                convert.job_from_submit, request, config=self._config, info=self._engine.info(),
                tokenize=self._engine.tokenize, check_webhook=self._check_webhook, now=time.time(),
                encode_chat=self._chat.encode)
            # Chat messages are rendered (Jinja) and tokenized: CPU work, off the event loop.
            messages = request.params.WhichOneof("prompt") == "messages"
            job = await asyncio.to_thread(submit) if messages else submit()
            stored, created = await self._manager.submit(job)
            return jobs_pb2.SubmitJobResponse(job=convert.job_to_proto(stored), created=created)

    async def GetJob(self, request: jobs_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> jobs_pb2.GetJobResponse:
        async with _status(context):
            job = await self._manager.store.get(_job_id(request.job_id))
            return jobs_pb2.GetJobResponse(job=convert.job_to_proto(job))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        async with _status(context):
            if request.from_token_offset < 0:
                raise InvalidRequest("from_token_offset", "must be >= 0")
            events = self._manager.watch(_job_id(request.job_id), request.from_token_offset)
            try:
                async for ev in events:
                    if isinstance(ev, Transition):
                        yield convert.state_event(ev)
                    elif isinstance(ev, Delta):
                        yield convert.delta_event(ev)
                    elif isinstance(ev, Job):
                        yield convert.ended_event(ev)
            finally:
                await events.aclose()

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.CancelJobResponse:
        async with _status(context):
            job = await self._manager.cancel(_job_id(request.job_id))
            return jobs_pb2.CancelJobResponse(job=convert.job_to_proto(job))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        async with _status(context):
            size = request.page_size or convert.DEFAULT_PAGE_SIZE
            if not 1 <= size <= convert.MAX_PAGE_SIZE:
                raise InvalidRequest("page_size", f"must be in [1, {convert.MAX_PAGE_SIZE}], got {request.page_size}")
            states = convert.states_from_proto(list(request.states))
            try:
                jobs, token = await self._manager.store.list(states, size, request.page_token)
            except ValueError as exc:
                raise InvalidRequests([("page_token", str(exc))]) from exc
            return jobs_pb2.ListJobsResponse(jobs=[convert.job_to_proto(j) for j in jobs], next_page_token=token)

    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.DeleteJobResponse:
        async with _status(context):
            job_id = _job_id(request.job_id)
            job = await self._manager.store.get(job_id)
            if not job.state.terminal:
                await self._manager.cancel(job_id)  # stop it first: nothing keeps running for nobody
            await self._manager.store.delete(job_id)
            return jobs_pb2.DeleteJobResponse()
