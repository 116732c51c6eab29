"""Build, start, drain and stop the grpc.aio server around one engine.

`start_server(config)` listens first (health answers NOT_SERVING), then runs start-up in the
background: engine.start(), one warm-up generation, readiness SERVING, and the engine watchdog.
The returned `ServerHandle` is what `server.main` and the in-process tests drive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tokenrelay.v1 import jobs_pb2, jobs_pb2_grpc, text_generation_pb2, text_generation_pb2_grpc

from tokenrelay_engines.base import AsyncEngine, FinishReason, Request, SamplingParams, StoppingCriteria
from tokenrelay_server.admission import AdmissionController
from tokenrelay_server.config import ServerConfig
from tokenrelay_server.health import ServingState, watch_engine
from tokenrelay_server.jobs.component import JobsComponent
from tokenrelay_server.jobs.store import open_store
from tokenrelay_server.security import Security
from tokenrelay_server.telemetry import Telemetry
from tokenrelay_server.text_generation import TextGenerationServiceServicer

log = logging.getLogger(__name__)


def build_engine(config: ServerConfig) -> AsyncEngine:
    """The engine `config.engine` names, built from its typed config (torch imported lazily)."""
    if config.engine == "synthetic":
        from tokenrelay_engines.synthetic import SyntheticEngine

        return SyntheticEngine(config.synthetic)
    if config.engine == "trtllm":
        from tokenrelay_engines.trtllm.engine import TrtllmEngine

        return TrtllmEngine(config.trtllm)
    if config.engine_process:
        from tokenrelay_engines.core.client import EngineCoreClient

        return EngineCoreClient(config.torch, address=config.engine_core_address)
    from tokenrelay_engines.torch.engine import TorchEngine

    return TorchEngine(config.torch)


async def warm_up(engine: AsyncEngine) -> None:
    """One short greedy generation through the whole engine path; raises if it fails."""
    request = Request(request_id=f"warmup-{uuid.uuid4().hex[:8]}",
                      prompt_token_ids=engine.tokenize("warm up") or [0],
                      sampling=SamplingParams(temperature=0.0, seed=0),
                      stopping=StoppingCriteria(max_tokens=2, ignore_eos=True),
                      arrival_time=time.monotonic())
    final = None
    async for out in engine.add_request(request):
        if out.finished:
            final = out
    if final is None or final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
        raise RuntimeError(f"warm-up generation failed: {final.error if final else 'no final output'}")


def _jobs_component(engine: AsyncEngine, config: ServerConfig, state: ServingState,
                    telemetry: Telemetry) -> JobsComponent | None:
    # ---- JOBS SERVICE WIRING: the one place the Jobs servicer is chosen. ------------------
    # With config.jobs (server.main sets it) the durable jobs component serves the Jobs API;
    # without it the base servicer answers UNIMPLEMENTED.
    if config.jobs is None:
        return None
    store = telemetry.instrument_store(open_store(config.jobs.store_url)) if telemetry.metrics else None
    return JobsComponent(config.jobs, engine, store=store, health=state,
                         attempt_context=telemetry.job_attempt_context if telemetry.tracing else None,
                         limits=config.limits)


@dataclass(slots=True, eq=False)
class ServerHandle:
    server: grpc.aio.Server
    port: int
    engine: AsyncEngine
    health: ServingState
    admission: AdmissionController
    config: ServerConfig
    startup: asyncio.Task | None = None  # engine.start + warm-up; set by start_server
    jobs: JobsComponent | None = None  # claims jobs once the engine is ready
    security: Security | None = None  # TLS, auth, tenants, the health-only port
    telemetry: Telemetry | None = None  # metrics, traces, access log
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _stopped: bool = False

    @property
    def address(self) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
        return f"{host}:{self.port}"

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for start-up (engine.start + warm-up); re-raises its failure."""
        assert self.startup is not None
        await asyncio.wait_for(asyncio.shield(self.startup), timeout)

    async def drain(self, grace: float | None = None) -> bool:
        """Readiness NOT_SERVING at once, then GOAWAY: clients take new calls elsewhere while the
        calls in flight finish, within `grace`; calls still running then are cancelled.

        Returns True when every call finished within the grace period.
        """
        grace = self.config.drain_grace_seconds if grace is None else grace
        await self.health.set_draining()
        return await self._stop_server(grace)

    async def _stop_server(self, grace: float) -> bool:
        """grpc core stops listening and sends GOAWAY; it returns once no call is left. True when
        every interactive call finished within the grace (none had to be cancelled)."""
        stopping = asyncio.ensure_future(self.server.stop(grace))
        drained = await self.admission.wait_idle(grace)
        await stopping
        return drained

    async def stop(self, grace: float = 0.0) -> None:
        """Stop serving (cancelling calls still running after `grace`) and shut the engine down."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.set_draining()
        await self._stop_server(grace)
        if self.security is not None:
            await self.security.stop()
        if self.jobs is not None:
            await self.jobs.stop()  # stop claiming; running jobs finish or go back to the queue
        for task in (self.startup, *self._tasks):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await self.engine.shutdown()
        if self.telemetry is not None:
            await asyncio.to_thread(self.telemetry.stop)  # flushes spans: blocking network I/O


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def _start_up(handle: ServerHandle) -> None:
    try:
        await handle.engine.start()
        if handle.config.warmup:
            await warm_up(handle.engine)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await handle.health.set_dead(f"start-up failed: {type(exc).__name__}: {exc}")
        raise
    await handle.health.set_serving()
    if handle.jobs is not None:
        await handle.jobs.start()
    handle._tasks.append(asyncio.create_task(
        watch_engine(handle.engine, handle.health, handle.config.health_check_interval_seconds),
        name="tokenrelay-engine-watchdog"))
    log.info("ready: engine %s warmed up", handle.engine.info().engine or type(handle.engine).__name__)


async def start_server(config: ServerConfig, engine: AsyncEngine | None = None, *,
                       wait_ready: bool = True) -> ServerHandle:
    """Listen on config.host:config.port (0: ephemeral), then start the engine and warm up.

    With `wait_ready` it returns once SERVING (raising if start-up failed); otherwise at once,
    with start-up running in `handle.startup`.
    """
    engine = engine if engine is not None else build_engine(config)
    state = ServingState()
    await state.initialize()
    admission = AdmissionController(config.admission)
    security = Security(config.security, retry_after_ms=config.admission.retry_after_ms)
    telemetry = Telemetry(config.telemetry)
    engine = telemetry.instrument_engine(engine)  # the engine itself unless metrics or tracing is on
    options = config.grpc.channel_options()
    if config.engine_core_address:  # one of --api-server-count front ends: share the port
        options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in options]
    server = grpc.aio.server(interceptors=telemetry.interceptors() + security.interceptors() or None,
                             options=options)
    text_generation_pb2_grpc.add_TextGenerationServiceServicer_to_server(
        TextGenerationServiceServicer(engine, state, admission, config.limits), server)
    jobs = _jobs_component(engine, config, state, telemetry)
    if jobs is None:
        jobs_pb2_grpc.add_JobsServiceServicer_to_server(jobs_pb2_grpc.JobsServiceServicer(), server)
    else:
        jobs.register(server)
        await jobs.open()
    health_pb2_grpc.add_HealthServicer_to_server(state.servicer, server)
    reflection.enable_server_reflection((
        text_generation_pb2.DESCRIPTOR.services_by_name["TextGenerationService"].full_name,
        jobs_pb2.DESCRIPTOR.services_by_name["JobsService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ), server)
    try:
        port = security.add_serving_port(server, _bind_address(config.host, config.port))
        if port == 0:
            raise OSError(f"could not bind {config.host}:{config.port}")
    except BaseException:
        if jobs is not None:
            await jobs.stop()  # the store and its watch task, opened above
        raise
    try:
        await security.start_health_port(state.servicer, config.host)
        telemetry.start(config.host, engine)
    except BaseException:
        await security.stop()
        telemetry.stop()
        raise
    await server.start()
    handle = ServerHandle(server=server, port=port, engine=engine, health=state, admission=admission,
                          config=config, jobs=jobs, security=security, telemetry=telemetry)
    handle.startup = asyncio.create_task(_start_up(handle), name="tokenrelay-startup")
    if wait_ready:
        try:
            await handle.startup
        except BaseException:
            await server.stop(0)
            raise
    return handle
