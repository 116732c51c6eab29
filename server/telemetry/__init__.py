"""Telemetry of one server: Prometheus metrics, OpenTelemetry traces, the access log.

    telemetry = Telemetry(config.telemetry)
    server = grpc.aio.server(interceptors=telemetry.interceptors())  # [] when all is off
    engine = telemetry.instrument_engine(engine)                     # the engine itself when off
    store = telemetry.instrument_store(store)
    telemetry.start(host, engine)                                    # /metrics HTTP server
    telemetry.stop()                                                 # flush spans, close /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_server.jobs.model import Job
from tokenrelay_server.jobs.store import JobStore
from tokenrelay_server.telemetry.config import TelemetryConfig

log = logging.getLogger(__name__)


class Telemetry:
    def __init__(self, config: TelemetryConfig) -> None:
        self.config = config
        self.metrics = None
        self.tracing = None
        if config.metrics:
            from tokenrelay_server.telemetry.metrics import Metrics

            self.metrics = Metrics(tenant_labels=config.metrics_tenant_labels)
        if config.tracing:
            from tokenrelay_server.telemetry.tracing import Tracing

            self.tracing = Tracing(config)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Outermost first: the tracing server span, then call counting and the access log."""
        out: list[Any] = []
        if self.tracing is not None:
            out.append(self.tracing.server_interceptor())
        if self.metrics is not None or self.config.access_log:
            from tokenrelay_server.telemetry.interceptor import TelemetryInterceptor

            out.append(TelemetryInterceptor(self.metrics, access_log_on=self.config.access_log,
                                            tracing_on=self.tracing is not None))
        return out

    def instrument_engine(self, engine: AsyncEngine) -> AsyncEngine:
        if self.metrics is None and self.tracing is None:
            return engine
        from tokenrelay_server.telemetry.engine import InstrumentedEngine

        return InstrumentedEngine(engine, self.metrics, self.tracing)  # type: ignore[return-value]

    def instrument_store(self, store: JobStore) -> JobStore:
        if self.metrics is None:
            return store
        from tokenrelay_server.telemetry.jobs import InstrumentedJobStore

        return InstrumentedJobStore(store, self.metrics)  # type: ignore[return-value]

    def job_attempt_context(self, job: Job) -> contextlib.AbstractContextManager:
        """Around a job attempt: a span linked to the trace that submitted the job."""
        if self.tracing is None:
            return contextlib.nullcontext()
        return self.tracing.job_attempt(job.job_id, job.attempts, job.trace_parent)

    def start(self, host: str, engine: AsyncEngine) -> None:
        """Serve /metrics (engine gauges sampled on this event loop)."""
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics.watch_engine(engine.stats, asyncio.get_running_loop())
            port = self.metrics.start_http(host, self.config.metrics_port)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the spans still queued
