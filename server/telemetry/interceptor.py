"""The outermost of the server's own interceptors: binds the call's CallInfo, then on the way
out counts the call (method, status code) and writes its access-log line."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc

from tokenrelay_server import call_context
from tokenrelay_server.interceptors import WrappedHandlers, metadata_value

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
        self._handlers = WrappedHandlers(self._around_for)

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method, await continuation(handler_call_details))

    def _around_for(self, method: str):
        def around(request: Any, context: grpc.aio.ServicerContext) -> _CallScope:
            return _CallScope(self, method, request, context)
        return around

    def _finish(self, info: call_context.CallInfo, code: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_call(info.method, code, info.tenant)
        if self._access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info("%s %s %.1fms", info.method, code, seconds * 1000, extra={"access": {
                "method": info.method, "status": code, "duration_ms": round(seconds * 1000, 3),
                "prompt_tokens": info.prompt_tokens, "completion_tokens": info.completion_tokens}})


class _CallScope:
    """One call inside the telemetry interceptor: binds its CallInfo, then counts and logs it."""

    __slots__ = ("_owner", "_method", "_request", "_context", "_info", "_token", "_start")

    def __init__(self, owner: TelemetryInterceptor, method: str, request: Any,
                 context: grpc.aio.ServicerContext) -> None:
        self._owner, self._method, self._request, self._context = owner, method, request, context

    async def __aenter__(self) -> None:
        info, self._token = call_context.enter(self._method)
        request, owner = self._request, self._owner
        params = getattr(request, "params", None)
        info.request_id = (getattr(params, "request_id", "") or getattr(request, "job_id", "")
                           or metadata_value(self._context.invocation_metadata(), REQUEST_ID_METADATA))
        if owner._tracing:
            info.trace_id = owner._trace_id()
            info.traceparent = owner._traceparent()
        self._info = info
        self._start = time.perf_counter()

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._owner._finish(self._info, _code_name(self._context, exc), time.perf_counter() - self._start)
        finally:
            call_context.leave(self._token)
