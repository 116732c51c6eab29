"""Traces exported over OTLP/gRPC to a real receiver served in the test from the
opentelemetry-proto TraceService definition."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tokenrelay_server.telemetry.config import TelemetryConfig
from tokenrelay import AsyncClient, Client


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []
        self.changed = asyncio.Event()

    async def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
                     context: grpc.aio.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.changed.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    sink = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield sink, f"http://127.0.0.1:{port}"
    await server.stop(0)


def _attrs(span) -> dict:
    out = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = ([x.string_value for x in v.array_value.values] if kind == "array_value"
                       else getattr(v, kind))
    return out


async def test_server_spans_join_the_callers_trace(synthetic_server_factory, receiver) -> None:
    sink, endpoint = receiver
    srv = await synthetic_server_factory(telemetry=TelemetryConfig(otlp_traces_endpoint=endpoint), ttft_ms=20.0)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_id}-01"
    async with AsyncClient(srv.address, timeout=20, retries=0, metadata={"traceparent": traceparent}) as client:
        result = await client.generate("trace me", max_tokens=5, ignore_eos=True, temperature=0.5)
        async for _ in client.stream("and me", max_tokens=3, ignore_eos=True):
            pass
    assert await asyncio.to_thread(srv.handle.telemetry.tracing.force_flush)  # export blocks: not on this loop
    spans = [s for s in sink.spans if s.trace_id.hex() == trace_id]
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    server_spans = by_name["/tokenrelay.v1.TextGenerationService/Generate"]
    assert len(server_spans) == 1 and server_spans[0].parent_span_id.hex() == parent_id
    assert len(by_name["/tokenrelay.v1.TextGenerationService/GenerateStream"]) == 1
    model = srv.engine.info().name
    completions = by_name[f"text_completion {model}"]
    assert len(completions) == 2
    unary = next(c for c in completions if c.parent_span_id == server_spans[0].span_id)
    attrs = _attrs(unary)
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.request.max_tokens"] == 5 and attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.usage.output_tokens"] == 5 == result.usage.completion_tokens
    assert attrs["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    children = {s.name: s for s in spans if s.parent_span_id == unary.span_id}
    assert set(children) == {"queue", "prefill", "decode"}
    q, p, d = children["queue"], children["prefill"], children["decode"]
    assert q.start_time_unix_nano <= q.end_time_unix_nano <= p.start_time_unix_nano + 1
    assert p.end_time_unix_nano <= d.start_time_unix_nano + 1 and d.end_time_unix_nano <= unary.end_time_unix_nano + 1
    assert p.end_time_unix_nano - p.start_time_unix_nano >= 15_000_000  # the engine's 20 ms to first token


async def test_tracing_off_installs_nothing(synthetic_server_factory) -> None:
    srv = await synthetic_server_factory(telemetry=TelemetryConfig(access_log=False))
    assert srv.handle.telemetry.interceptors() == []
    assert srv.handle.engine is srv.engine  # no wrapper around the engine


async def test_job_attempt_is_linked_to_the_submitting_trace(synthetic_server_factory, receiver) -> None:
    sink, endpoint = receiver
    srv = await synthetic_server_factory(telemetry=TelemetryConfig(otlp_traces_endpoint=endpoint))
    trace_id = secrets.token_hex(16)
    async with AsyncClient(srv.address, timeout=20, retries=0,
                           metadata={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}) as client:
        job = (await client.submit("a job", max_tokens=3, ignore_eos=True)).job
        await client.wait(job.job_id, timeout=20)
    assert await asyncio.to_thread(srv.handle.telemetry.tracing.force_flush)
    submit = next(s for s in sink.spans if s.name == "/tokenrelay.v1.JobsService/SubmitJob")
    assert submit.trace_id.hex() == trace_id
    attempt = next(s for s in sink.spans if s.name == "job attempt")
    assert attempt.trace_id.hex() != trace_id  # its own trace (it may run much later, elsewhere) ...
    assert [(link.trace_id.hex(), link.span_id) for link in attempt.links] == [(trace_id, submit.span_id)]
    assert _attrs(attempt)["tokenrelay.job.id"] == job.job_id
    completion = next(s for s in sink.spans if s.name.startswith("text_completion")
                      and s.trace_id == attempt.trace_id)
    assert completion.parent_span_id == attempt.span_id  # ... with the engine's spans under it


async def test_client_tracing_option_propagates_the_current_trace(synthetic_server_factory, receiver) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # the application's provider (set once per process)
    sink, endpoint = receiver
    srv = await synthetic_server_factory(telemetry=TelemetryConfig(otlp_traces_endpoint=endpoint))
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        async with AsyncClient(srv.address, timeout=20, retries=0, tracing=True) as client:
            await client.generate("hi", max_tokens=2)

        def blocking_call() -> None:  # the blocking Client, in a thread that carries the context
            with Client(srv.address, timeout=20, retries=0, tracing=True) as sync_client:
                sync_client.info()

        await asyncio.to_thread(blocking_call)
    assert await asyncio.to_thread(srv.handle.telemetry.tracing.force_flush)
    expected = caller.get_span_context().trace_id.to_bytes(16, "big")
    server_span = next(s for s in sink.spans if s.name == "/tokenrelay.v1.TextGenerationService/Generate")
    assert server_span.trace_id == expected
    info_span = next(s for s in sink.spans if s.name == "/tokenrelay.v1.TextGenerationService/GetModelInfo")
    assert info_span.trace_id == expected
