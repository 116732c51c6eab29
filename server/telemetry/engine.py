"""The engine as metrics and traces see it: a thin wrapper that watches each request's outputs.

Only built when metrics or tracing is on (otherwise the server holds the engine itself). Per
output it observes the inter-token latency; when the request ends, its generated tokens; on
the final output,
the request's timings (engine RequestMetrics), token counts and finish reason, and it ends the
request's span. It also tells the call's CallInfo the request id and token usage, for the
access log. Everything else is the wrapped engine's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tokenrelay_engines.base import AsyncEngine, EngineStats, ModelInfo, Request, RequestOutput
from tokenrelay_server import call_context

if TYPE_CHECKING:  # OpenTelemetry and prometheus-client are imported only when switched on
    from tokenrelay_server.telemetry.metrics import Metrics
    from tokenrelay_server.telemetry.tracing import Tracing


WARMUP_PREFIX = "warmup-"  # server.app.warm_up's request ids


class InstrumentedEngine:
    def __init__(self, engine: AsyncEngine, metrics: Metrics | None, tracing: Tracing | None) -> None:
        self.engine = engine
        self._metrics = metrics
        self._tracing = tracing

    def __getattr__(self, name: str) -> Any:  # engine-specific attributes (tests, benchmarks)
        return getattr(self.engine, name)

    async def start(self) -> None:
        await self.engine.start()
        if self._metrics is not None:
            self._metrics.set_model(self.engine.info().name)

    def add_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        stream = self.engine.add_request(request)  # InvalidRequest is raised here, as the contract says
        if request.request_id.startswith(WARMUP_PREFIX):
            return stream  # the server's own start-up request is not traffic
        return self._observe(request, stream)

    async def _observe(self, request: Request, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        metrics = self._metrics
        info = call_context.current()
        if info is not None and not info.request_id:
            info.request_id = request.request_id.rpartition("#")[0] or request.request_id
        span = self._tracing.request_span(request, self.engine.info().name) if self._tracing is not None else None
        final: RequestOutput | None = None
        last = 0.0
        generated = 0
        itl = metrics.c_itl if metrics is not None else None
        try:
            async for out in stream:
                if itl is not None and out.token_ids:
                    now = time.monotonic()
                    if last:
                        itl.observe(now - last)
                    last = now
                    generated += len(out.token_ids)
                if out.finished:
                    final = out
                    if metrics is not None:
                        metrics.observe_finished(out)
                    if info is not None and out.usage is not None:
                        info.prompt_tokens += out.usage.prompt_tokens
                        info.completion_tokens += out.usage.completion_tokens
                yield out
        finally:
            try:
                await stream.aclose()  # type: ignore[attr-defined]
            finally:
                if metrics is not None:
                    metrics.observe_generated(generated)
                    if final is None:
                        metrics.observe_cancelled()
                if span is not None:
                    span.finish(final)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    def info(self) -> ModelInfo:
        return self.engine.info()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.engine.detokenize(token_ids, skip_special_tokens)

    async def shutdown(self) -> None:
        await self.engine.shutdown()
