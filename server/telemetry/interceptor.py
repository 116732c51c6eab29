"""The outermost of the server's own interceptors: binds the call's CallInfo, then on the way
out counts the call (method, status code) and writes its access-log line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from tokenrelay_server import call_context
from tokenrelay_server.interceptors import metadata_value, wrap_handler

if TYPE_CHECKING:
    from tokenrelay_server.telemetry.metrics import Metrics

access_log = logging.getLogger("tokenrelay.access")
REQUEST_ID_METADATA = "x-request-id"


def _code_name(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions keep the raw value
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    if exc is None:
        return "OK"
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None, *, access_log_on: bool, tracing_on: bool) -> None:
        self._metrics = metrics
        self._access_log = access_log_on
        self._tracing = tracing_on
        if tracing_on:  # OpenTelemetry is imported only when tracing is on
            from tokenrelay_server.telemetry.tracing import current_trace_id, current_traceparent

            self._trace_id, self._traceparent = current_trace_id, current_traceparent

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        handler = await continuation(handler_call_details)

        @contextlib.asynccontextmanager
        async def around(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            info, token = call_context.enter(method)
            params = getattr(request, "params", None)
            info.request_id = (getattr(params, "request_id", "") or getattr(request, "job_id", "")
                               or metadata_value(metadata, REQUEST_ID_METADATA))
            if self._tracing:
                info.trace_id = self._trace_id()
                info.traceparent = self._traceparent()
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._finish(info, _code_name(context, failure), time.perf_counter() - start)
                call_context.leave(token)

        return wrap_handler(handler, around)

    def _finish(self, info: call_context.CallInfo, code: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_call(info.method, code, info.tenant)
        if self._access_log:
            access_log.info("%s %s %.1fms", info.method, code, seconds * 1000, extra={"access": {
                "method": info.method, "status": code, "duration_ms": round(seconds * 1000, 3),
                "prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens}})
