"""The Jobs gRPC servicer: thin. Validation and conversion live in `server.jobs.convert`, the
work in `server.jobs.manager`, errors map through `server.errors`.

SubmitJob is refused (UNAVAILABLE) while draining and once the engine is dead; during start-up
it waits for the engine (bounded by the call's deadline), then validates against its tokenizer
and stores the job, which runs once claiming starts. Validation tokenizes: it runs off the
event loop. A store outage answers UNAVAILABLE on every call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc

from tokenrelay_engines.base import AsyncEngine, EngineDeadError, InvalidRequest
from tokenrelay_server import call_context
from tokenrelay_server.chat import ChatPrompts
from tokenrelay_server.convert import REQUEST_ID_METADATA, request_id_from
from tokenrelay_server.errors import (
    AlreadyExists, InvalidRequests, NotFound, NotReady, ServerDraining, ServerError, abort_on_error,
)
from tokenrelay_server.health import Phase, ServingState
from tokenrelay_server.jobs import convert
from tokenrelay_server.jobs.manager import JobManager
from tokenrelay_server.jobs.model import Delta, IdempotencyConflict, Job, JobNotFound, JobsConfig, JobState, Transition
from tokenrelay_server.jobs.store import StoreUnavailable
from tokenrelay_server.limits import InputLimits
from tokenrelay_server.tenants import check_queued_jobs


class JobsStoreUnavailable(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


def _map_error(exc: Exception) -> Exception:
    if isinstance(exc, JobNotFound):
        return NotFound(f"job {exc.job_id!r} not found")
    if isinstance(exc, IdempotencyConflict):
        return AlreadyExists(str(exc), reason="IDEMPOTENCY_KEY_REUSED", job_id=exc.job_id,
                             idempotency_key=exc.key)
    if isinstance(exc, StoreUnavailable):
        return JobsStoreUnavailable("the jobs store is unavailable; retry shortly")
    return exc


def _status(context: grpc.aio.ServicerContext):
    """Every failure in the block becomes a proper status, jobs errors mapped first."""
    async def mapped(exc: Exception) -> Exception:
        return _map_error(exc)
    return abort_on_error(context, mapped)


def _job_id(value: str, limits: InputLimits) -> str:
    bad: list[tuple[str, str]] = []
    if not limits.check_job_id(bad, "job_id", value):
        raise InvalidRequests(bad)
    return value


def _header_request_id(request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext,
                       limits: InputLimits) -> jobs_pb2.SubmitJobRequest:
    """params.request_id, else the `x-request-id` header (validated: InvalidRequests): the
    request to validate and store. Without either, the job id stands in for it."""
    metadata = context.invocation_metadata() or ()
    if request.params.request_id or not any(k == REQUEST_ID_METADATA and v for k, v in metadata):
        return request
    with_id = jobs_pb2.SubmitJobRequest()
    with_id.CopyFrom(request)
    with_id.params.request_id = request_id_from(request.params, metadata, limits)
    return with_id


async def _until(events: AsyncIterator, stopping: asyncio.Event) -> AsyncIterator:
    """`events` until the server starts draining; then UNAVAILABLE, so the watcher resumes from
    its last offset on another replica instead of holding this one for the whole grace period."""
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            step = asyncio.ensure_future(anext(events))
            await asyncio.wait({step, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                await asyncio.wait({step})  # the generator is idle again before it is closed
                raise ServerDraining("server is draining: resume the watch from your last offset")
            try:
                event = step.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        stopped.cancel()


class JobsServiceServicer(jobs_pb2_grpc.JobsServiceServicer):
    def __init__(self, config: JobsConfig, manager: JobManager, engine: AsyncEngine,
                 check_webhook: Callable[[str], None] | None, health: ServingState | None = None,
                 engine_started: asyncio.Event | None = None, limits: InputLimits = InputLimits(),
                 chat: ChatPrompts | None = None) -> None:
        self._config = config
        self._health = health
        self._limits = limits
        self._chat = chat if chat is not None else ChatPrompts(engine)
        self._manager = manager
        self._engine = engine
        self._check_webhook = check_webhook
        self._engine_started = engine_started

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        """Refuse a submit while draining or once the engine is dead; during start-up, wait
        (bounded by the call's deadline) until the engine can validate it."""
        health = self._health
        if health is not None and health.phase is Phase.DEAD:
            raise EngineDeadError(health.dead_reason or "engine is dead")
        if health is not None and health.phase is Phase.DRAINING:
            raise ServerDraining("server is draining; submit to another replica")
        started = self._engine_started
        if started is not None and not started.is_set():
            left = context.time_remaining()
            try:
                await asyncio.wait_for(started.wait(), None if left is None else max(0.0, left - 0.5))
            except TimeoutError:
                raise NotReady("the engine is still starting; retry shortly") from None
            await self._admit(context)  # it may have died or begun draining meanwhile
            return
        await self._engine.check_health()  # EngineDeadError: dead before the watchdog noticed

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        async with _status(context):
            await self._admit(context)
            sent = _header_request_id(request, context, self._limits)
            info, now = self._engine.info(), time.time()

            def build() -> Job:  # tokenizes and hashes the request: off the event loop
                job = convert.job_from_submit(sent, config=self._config, info=info, tokenize=self._engine.tokenize,
                                              check_webhook=self._check_webhook, now=now, limits=self._limits,
                                              encode_chat=self._chat.encode)
                if sent is not request:  # idempotency compares the body the client sent: a retry
                    job.fingerprint = convert.fingerprint(request)  # with a fresh x-request-id is the same
                return job

            job = await asyncio.to_thread(build)
            caller = call_context.current()
            if caller is not None:  # the job belongs to the caller's tenant; attempts link to its trace
                job.tenant, job.trace_parent = caller.tenant, caller.traceparent
                await self._check_queue_quota(caller)
            stored, created = await self._manager.submit(job)
            return jobs_pb2.SubmitJobResponse(job=convert.job_to_proto(stored), created=created)

    async def _check_queue_quota(self, caller: call_context.CallInfo) -> None:
        cap = caller.limits.max_queued_jobs
        if cap:
            queued, _ = await self._manager.store.list(frozenset({JobState.QUEUED}), cap, "", caller.tenant)
            check_queued_jobs(caller.tenant, caller.limits, len(queued), retry_after_s=1.0)

    async def _owned(self, job_id: str) -> Job:
        """The caller's job; another tenant's job is JobNotFound, exactly as a missing one."""
        job = await self._manager.store.get(_job_id(job_id, self._limits))
        if job.tenant != call_context.current_tenant():
            raise JobNotFound(job.job_id)
        return job

    async def GetJob(self, request: jobs_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> jobs_pb2.GetJobResponse:
        async with _status(context):
            job = await self._owned(request.job_id)
            return jobs_pb2.GetJobResponse(job=convert.job_to_proto(job))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        async with _status(context):
            if request.from_token_offset < 0:
                raise InvalidRequest("from_token_offset", "must be >= 0")
            await self._owned(request.job_id)
            events = self._manager.watch(_job_id(request.job_id, self._limits), request.from_token_offset)
            stopping = self._health.stopping if self._health is not None else asyncio.Event()
            try:
                async for ev in _until(events, stopping):
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
            await self._owned(request.job_id)
            job = await self._manager.cancel(_job_id(request.job_id, self._limits))
            return jobs_pb2.CancelJobResponse(job=convert.job_to_proto(job))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        async with _status(context):
            size = request.page_size or convert.DEFAULT_PAGE_SIZE
            if not 1 <= size <= convert.MAX_PAGE_SIZE:
                raise InvalidRequest("page_size", f"must be in [1, {convert.MAX_PAGE_SIZE}], got {request.page_size}")
            states = convert.states_from_proto(list(request.states))
            try:
                jobs, token = await self._manager.store.list(states, size, request.page_token,
                                                             call_context.current_tenant())
            except ValueError as exc:
                raise InvalidRequests([("page_token", str(exc))]) from exc
            return jobs_pb2.ListJobsResponse(jobs=[convert.job_to_proto(j) for j in jobs], next_page_token=token)

    async def DeleteJob(self, request: jobs_pb2.DeleteJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.DeleteJobResponse:
        async with _status(context):
            job_id = _job_id(request.job_id, self._limits)
            job = await self._owned(job_id)
            if not job.state.terminal:
                await self._manager.cancel(job_id)  # stop it first: nothing keeps running for nobody
            await self._manager.store.delete(job_id)
            return jobs_pb2.DeleteJobResponse()
