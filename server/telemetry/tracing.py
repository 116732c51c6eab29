"""OpenTelemetry tracing: one TracerProvider per server, exported over OTLP/gRPC.

The server span of each call comes from opentelemetry-instrumentation-grpc's aio server
interceptor, which joins the caller's W3C `traceparent`. Under it, each engine request gets a
`text_completion {model}` span with the GenAI semantic-convention attributes and three
children placed at the engine's own timestamps: `queue` (arrival to first scheduled),
`prefill` (to the first token) and `decode` (to the end). A job attempt gets a `job attempt`
span linked to the trace that submitted the job. With no endpoint nothing here is built.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tokenrelay_engines.base import Request, RequestOutput
from tokenrelay_server.telemetry.config import TelemetryConfig

OPERATION = "text_completion"
_PROPAGATOR = TraceContextTextMapPropagator()


def current_trace_id() -> str:
    """The trace id of the current span as 32 hex digits, or "" when there is none."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when none), to link later work to it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


class RequestSpan:
    """The span of one engine request; `finish(out)` adds the phase children and ends it."""

    __slots__ = ("_tracing", "_span", "_request")

    def __init__(self, tracing: Tracing, request: Request, model: str) -> None:
        self._tracing = tracing
        self._request = request
        s, st = request.sampling, request.stopping
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION, "gen_ai.provider.name": "tokenrelay",
            "gen_ai.request.model": model, "gen_ai.request.max_tokens": st.max_tokens,
            "gen_ai.request.temperature": s.temperature, "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.id": request.request_id,
        }
        if s.top_k:
            attributes["gen_ai.request.top_k"] = s.top_k
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        self._span = tracing.tracer.start_span(f"{OPERATION} {model}", kind=SpanKind.INTERNAL,
                                               attributes=attributes)

    def finish(self, out: RequestOutput | None) -> None:
        span = self._span
        if not span.is_recording():
            span.end()
            return
        if out is None:  # the caller went away first
            span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])
            span.end()
            return
        span.set_attribute("gen_ai.response.id", self._request.request_id)
        if out.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [out.finish_reason.value])
        if out.usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", out.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", out.usage.completion_tokens)
        m = out.metrics
        end_ns = None
        if m is not None:
            to_ns = self._tracing.to_epoch_ns
            ctx = trace.set_span_in_context(span)
            marks = [("queue", m.arrival_time, m.first_scheduled_time),
                     ("prefill", m.first_scheduled_time, m.first_token_time),
                     ("decode", m.first_token_time, m.finished_time)]
            for name, start, end in marks:
                if start is not None and end is not None:
                    child = self._tracing.tracer.start_span(name, context=ctx, start_time=to_ns(start))
                    child.end(end_time=to_ns(max(start, end)))
            if m.first_token_time is not None:
                span.set_attribute("gen_ai.response.time_to_first_chunk", m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                span.set_attribute("gen_ai.latency.time_in_queue", m.first_scheduled_time - m.arrival_time)
            end_ns = to_ns(m.finished_time)
        span.end(end_time=end_ns)


class Tracing:
    """Owns the tracer provider (with its OTLP exporter) and makes the server's spans."""

    def __init__(self, config: TelemetryConfig) -> None:
        resource = Resource.create({"service.name": config.service_name})
        sampler = ParentBased(TraceIdRatioBased(config.trace_sample_ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_traces_endpoint)))
        self.tracer = self.provider.get_tracer("tokenrelay")
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def to_epoch_ns(self, monotonic_s: float) -> int:
        return int(monotonic_s * 1e9) + self._offset_ns

    def server_interceptor(self) -> Any:
        return aio_server_interceptor(tracer_provider=self.provider)

    def request_span(self, request: Request, model: str) -> RequestSpan:
        return RequestSpan(self, request, model)

    @contextlib.contextmanager
    def job_attempt(self, job_id: str, attempt: int, traceparent: str) -> Iterator[None]:
        """A `job attempt` span, current while the attempt runs, linked to the submitting trace."""
        links = []
        if traceparent:
            linked = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
            if linked.is_valid:
                links.append(Link(linked))
        with self.tracer.start_as_current_span("job attempt", context=trace.set_span_in_context(
                trace.INVALID_SPAN), links=links, attributes={"tokenrelay.job.id": job_id,
                                                             "tokenrelay.job.attempt": attempt}):
            yield

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        self.provider.shutdown()
