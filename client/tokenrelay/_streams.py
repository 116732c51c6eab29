"""Server-streaming calls with retry-before-first-event, and the generation stream objects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import grpc

from tokenrelay import _convert
from tokenrelay._retry import Deadline, RetryPolicy
from tokenrelay.errors import from_rpc_error
from tokenrelay.types import (
    FinishReason,
    GenerationResult,
    StreamDelta,
    StreamFinished,
    StreamStarted,
    Timing,
    TokenLogprob,
    Usage,
)
from tokenrelay.v1 import text_generation_pb2

StartCall = Callable[[float | None], Any]  # timeout -> a started grpc streaming call


def iterate_with_retry(start: StartCall, policy: RetryPolicy, deadline: Deadline
                       ) -> Generator[Any, None, None]:
    """Yield a server stream's responses; retry UNAVAILABLE only before the first response."""
    attempt = 0
    while True:
        call = start(deadline.remaining())
        received = False
        try:
            for response in call:
                received = True
                yield response
            return
        except grpc.RpcError as exc:
            if received:  # never retried once a response was seen
                raise from_rpc_error(exc) from None
            delay = policy.delay_or_raise(exc, attempt, deadline)
        finally:
            call.cancel()  # a no-op once the call has ended; frees it when the consumer stops
        time.sleep(delay)
        attempt += 1


async def aiterate_with_retry(start: StartCall, policy: RetryPolicy, deadline: Deadline
                              ) -> AsyncGenerator[Any, None]:
    """Async twin of iterate_with_retry, for grpc.aio streaming calls."""
    attempt = 0
    while True:
        call = start(deadline.remaining())
        received = False
        try:
            async for response in call:
                received = True
                yield response
            return
        except grpc.RpcError as exc:
            if received:  # never retried once a response was seen
                raise from_rpc_error(exc) from None
            delay = policy.delay_or_raise(exc, attempt, deadline)
        finally:
            call.cancel()
        await asyncio.sleep(delay)
        attempt += 1


class _StreamState:
    """What a generation stream has seen so far: started, accumulated output, finished."""

    def __init__(self) -> None:
        self.started: StreamStarted | None = None
        self.finished: StreamFinished | None = None
        self._text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []

    def _observe(self, response: text_generation_pb2.GenerateStreamResponse) -> StreamDelta | None:
        kind = response.WhichOneof("event")
        if kind == "started":
            self.started = _convert.stream_started(response.started)
        elif kind == "finished":
            self.finished = _convert.stream_finished(response.finished)
        elif kind == "delta":
            delta = _convert.stream_delta(response.delta)
            self._text.append(delta.text)
            self.token_ids.extend(delta.token_ids)
            self.logprobs.extend(delta.logprobs)
            return delta
        return None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._text)

    @property
    def request_id(self) -> str:
        return self.started.request_id if self.started is not None else ""

    @property
    def finish_reason(self) -> FinishReason | None:
        """Why the generation ended, once the stream has finished; else None."""
        return self.finished.finish_reason if self.finished is not None else None

    @property
    def usage(self) -> Usage | None:
        return self.finished.usage if self.finished is not None else None

    @property
    def timing(self) -> Timing | None:
        return self.finished.timing if self.finished is not None else None

    def _result(self) -> GenerationResult:
        finished = self.finished
        return GenerationResult(
            text=self.text, token_ids=tuple(self.token_ids),
            finish_reason=finished.finish_reason if finished else FinishReason.UNSPECIFIED,
            usage=finished.usage if finished else Usage(),
            timing=finished.timing if finished else Timing(), request_id=self.request_id,
            matched_stop=finished.matched_stop if finished else None,
            logprobs=tuple(self.logprobs), seed=self.started.seed if self.started else 0)


class GenerationStream(_StreamState):
    """Iterate to get each `StreamDelta` (text, token_ids, logprobs) as it arrives.

    `started` (request id, prompt tokens, seed) is set before the first delta; `finished`
    (finish reason, matched stop, usage, timing) once the stream has ended. Iterate once;
    `close()` (or leaving a `with` block) cancels the call on the server.
    """

    def __init__(self, events: Iterator[text_generation_pb2.GenerateStreamResponse]) -> None:
        super().__init__()
        self._events = events

    def __iter__(self) -> Iterator[StreamDelta]:
        for response in self._events:
            delta = self._observe(response)
            if delta is not None:
                yield delta

    def result(self) -> GenerationResult:
        """Read the rest of the stream; the whole output as one GenerationResult."""
        for _ in self:
            pass
        return self._result()

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationStream(_StreamState):
    """The async twin of GenerationStream: `async for delta in stream`."""

    def __init__(self, events: AsyncIterator[text_generation_pb2.GenerateStreamResponse]) -> None:
        super().__init__()
        self._events = events

    async def __aiter__(self) -> AsyncIterator[StreamDelta]:
        async for response in self._events:
            delta = self._observe(response)
            if delta is not None:
                yield delta

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._result()

    async def aclose(self) -> None:
        aclose: Callable[[], Awaitable[None]] | None = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
